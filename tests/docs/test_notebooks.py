"""The tutorials are stored without outputs (the site build executes them: tests/docs/test_site.py
checks what they print), so their diffs stay readable and no stale output is published."""

from pathlib import Path

import nbformat
import pytest

TUTORIALS = sorted((Path(__file__).resolve().parents[2] / "docs" / "tutorials").glob("*.ipynb"))


def test_there_are_the_three_tutorials_of_the_site():
    assert {p.stem for p in TUTORIALS} == {"python_api", "reference_to_annotator", "heldout_donors"}


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
