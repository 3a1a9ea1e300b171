"""The documentation site: it builds with --strict and no warning, its CLI page is the parser's,
its API page documents every public name, its tutorials carry their outputs, its column table
is what annotation writes, and its pages open in a headless browser.

The site is built once, into a temporary folder, by the first test that needs it (about a
minute: the tutorials execute); under `make test` (pytest-xdist) every test of this module runs
in one worker, so the build overlaps with the other worker's tests. CELLCONTRAST_SITE_DIR
points at a site already built (`make docs`) instead.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from html import unescape
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest

from conftest import marker_counts

REPO = Path(__file__).resolve().parents[2]

# One worker builds the site and runs every test on it (`--dist loadgroup`).
pytestmark = pytest.mark.xdist_group("site")


@pytest.fixture(scope="session")  # module scope rebuilt it when xdist interleaved other modules
def site(tmp_path_factory) -> Path:
    given = os.environ.get("CELLCONTRAST_SITE_DIR")
    if given:
        path = Path(given)
        assert (path / "index.html").exists(), f"CELLCONTRAST_SITE_DIR={given} holds no built site"
        return path
    out = tmp_path_factory.mktemp("site")
    mkdocs = Path(sys.executable).with_name("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([str(mkdocs), "build", "--strict", "--site-dir", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    # mkdocs's own warnings (a kernel's "[IPKernelApp] WARNING" about its local TCP socket is not one)
    assert not [line for line in log.splitlines() if line.startswith("WARNING")], log[-4000:]
    return out


def page_text(path: Path) -> str:
    """The visible text of a built page, tags dropped, entities decoded."""
    html = path.read_text()
    html = re.sub(r"<(script|style)\b.*?</\1>", " ", html, flags=re.S)
    return unescape(re.sub(r"<[^>]+>", " ", html))


def sections(path: Path, level: int) -> dict[str, str]:
    """Heading id -> the HTML up to the next heading of the same level."""
    html = path.read_text()
    parts = re.split(rf'(<h{level} id="[^"]+")', html)
    return {re.search(r'id="([^"]+)"', parts[i]).group(1): parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_cli_page_lists_every_command_and_option_of_the_parser(site):
    from cellcontrast.cli.parser import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = sections(site / "reference" / "cli" / "index.html", 2)
    assert set(found) == {f"cellcontrast-{name}" for name in sub.choices}
    for name, command in sub.choices.items():
        text = unescape(re.sub(r"<[^>]+>", " ", found[f"cellcontrast-{name}"]))
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for flag in action.option_strings or [action.metavar or action.dest]:
                assert flag in text, f"{name}: {flag} is not on the CLI page"
            if action.help:  # compared without spaces and backticks (the page renders `x` as code)
                assert re.sub(r"[\s`]", "", action.help)[:40] in re.sub(r"\s", "", text), (name, action.dest)


def test_api_page_documents_every_public_name(site):
    import cellcontrast as cc

    ids = set(re.findall(r'<h3 id="([^"]+)"', (site / "reference" / "api" / "index.html").read_text()))
    for name in set(cc.__all__) - {"__version__"}:
        assert any(i.endswith(f".{name}") for i in ids), f"cc.{name} is not on the API page"
    methods = set(re.findall(r'<h4 id="([^"]+)"', (site / "reference" / "api" / "index.html").read_text()))
    for method in ("save", "load", "export", "predict_proba"):
        assert any(m.endswith(f"Chain.{method}") for m in methods), method


def test_tutorials_are_rendered_with_their_outputs(site):
    python_api = page_text(site / "tutorials" / "python_api" / "index.html")
    assert "Chain(lr + none: 300 genes -> 12 types)" in python_api
    assert "annotator.onnx: 300 genes -> 12 types" in python_api
    assert float(python_api.split("accuracy on them ")[-1].split(";")[0]) > 0.8  # the output, not the code
    assert "data:image/png" in (site / "tutorials" / "python_api" / "index.html").read_text()
    reference = page_text(site / "tutorials" / "reference_to_annotator" / "index.html")
    assert "chosen: lr" in reference and "Model card" in reference
    heldout = page_text(site / "tutorials" / "heldout_donors" / "index.html")
    assert "held-out individual L4" in heldout and "types the reference lacks" in heldout
    for name in ("python_api", "reference_to_annotator", "heldout_donors"):  # no warning published
        html = re.sub(r"<style\b.*?</style>", "", (site / "tutorials" / name / "index.html").read_text(), flags=re.S)
        assert 'data-mime-type="application/vnd.jupyter.stderr"' not in html, name


def test_obs_columns_page_is_what_annotation_writes(site, tmp_path):
    import cellcontrast as cc

    x, y = marker_counts(n_classes=4, per_class=40, n_genes=60)
    genes = [f"g{i}" for i in range(x.shape[1])]
    reference = ad.AnnData(X=x, obs=pd.DataFrame({"cell_type": [f"t{v}" for v in y]}), var=pd.DataFrame(index=genes))
    path = cc.fit(reference, "cell_type", params={"lr": {"l2_path": [1e-2]}}).export(tmp_path / "m.onnx")
    query, other = reference.copy(), reference.copy()
    cc.annotate(query, path, flag_unseen=True, majority_voting=True, probabilities=True)
    cc.annotate(other, path, flag_unseen="expression", coverage=0.9)  # the other novelty score's column, the sets
    # an annotator with fold models (cross-validated) adds the energy's p-value
    cc.fit_annotator(reference, "cell_type", chains="lr", params={"lr": {"l2_path": [1e-2]}}, val_folds=2,
                     out=tmp_path / "c.onnx", experiment=None, register=False)
    third = reference.copy()
    cc.annotate(third, str(tmp_path / "c.onnx"), flag_unseen=True)
    written = {c for frame in (query.obs, other.obs, third.obs) for c in frame if c.startswith("cellcontrast_")}
    table = re.findall(r"<td><code>(cellcontrast_[a-z0-9_]+)</code></td>",
                       (site / "reference" / "obs-columns" / "index.html").read_text())
    assert set(table) == written
    assert "cellcontrast_probabilities" in query.obsm


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_pages_open_in_a_headless_browser(site):
    browser = chromium()
    if browser is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    for page, heading in [("index.html", "cellcontrast"),
                          ("tutorials/python_api/index.html", "cellcontrast from Python")]:
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                               "--dump-dom", (site / page).as_uri()], capture_output=True, text=True, timeout=120)
        dom = done.stdout
        assert done.returncode == 0 and "<h1" in dom, (page, done.stderr[-2000:])
        h1 = unescape(re.sub(r"<[^>]+>", "", re.search(r"<h1[^>]*>(.*?)</h1>", dom, flags=re.S).group(1)))
        assert heading in h1, (page, h1)
        assert 'class="md-nav' in dom  # the theme's navigation was laid out, not a bare file


def test_readme_fits_on_two_screens_and_links_into_the_site():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 150
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "README links into the site"
    for link in links:
        assert (REPO / link).exists(), link
