"""notebooks/python_api.ipynb runs top to bottom: cc.fit, export, cc.annotate in memory."""

from pathlib import Path

import pytest

from notebook_kernel import kernel_manager, output_texts

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "python_api.ipynb"


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_python_api_notebook_trains_exports_and_annotates(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.chdir(tmp_path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(tmp_path), kernel_name="python3", timeout=180,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    texts = "\n".join(output_texts(nb))
    assert "Chain(lr + none: 300 genes -> 12 types)" in texts
    assert "annotator.onnx: 300 genes -> 12 types" in texts and (tmp_path / "annotator.onnx").exists()
    assert "cellcontrast_label" in texts and "cellcontrast_confidence" in texts
    accuracy = float(texts.split("accuracy on them ")[1].split(";")[0])
    assert accuracy > 0.8, texts
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])
