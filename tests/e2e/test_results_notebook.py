"""notebooks/results.ipynb runs top to bottom on a tiny MLflow store of fake grid runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from notebook_kernel import kernel_manager, output_texts

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "results.ipynb"
CLASSES = [f"type_{i:02d}" for i in range(12)]


def _fake_store(tmp_path: Path) -> None:
    """A few finished runs with the grid's tags, test metrics and per_class_f1.csv (no training)."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("cellcontrast")
    for setting in ("default", "scarce"):
        for seed in (0, 1):
            for b, base in enumerate(("lr", "actinn")):
                for c, component in enumerate(("none", "mls")):
                    top1 = 0.9 - 0.05 * b + 0.01 * c + 0.005 * seed - (0.1 if setting == "scarce" else 0)
                    with mlflow.start_run(run_name=f"{setting}-seed{seed}-{base}-{component}"):
                        mlflow.set_tags({"setting": setting, "seed": str(seed), "base": base,
                                         "component": component})
                        mlflow.log_metrics({"test_top1": top1, "test_top3": top1 + 0.05,
                                            "test_macro_f1": top1 - 0.05})
                        table = pd.DataFrame({
                            "class": CLASSES,
                            "f1": [round(0.3 + 0.05 * i + 0.02 * c, 3) for i in range(len(CLASSES))],
                            "precision": 0.5, "recall": 0.5,
                            "support": [3 + i for i in range(len(CLASSES))],
                        })
                        path = tmp_path / "per_class_f1.csv"
                        table.to_csv(path, index=False)
                        mlflow.log_artifact(str(path))
    # the report's own run has no grid tags and must be ignored
    with mlflow.start_run(run_name="report", tags={"kind": "report"}):
        mlflow.log_metric("default.lr-none.top1", 0.9)


def test_notebook_is_stored_without_outputs():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert any(c.cell_type == "markdown" for c in nb.cells)


def test_notebook_runs_on_a_tiny_store(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    _fake_store(tmp_path)

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(tmp_path), kernel_name="python3", timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    if dump := os.environ.get("CELLCONTRAST_NOTEBOOK_DUMP"):  # to look at the executed notebook
        nbformat.write(nb, dump)

    texts = "\n".join(output_texts(nb))
    assert "16 grid runs" in texts
    assert "| Model | Top-1 | Top-3 | F1 | n |" in texts and "| ACTINN + MLS |" in texts
    assert "## Data Scarce" in texts
    assert any("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert "setting 'scarce': per-class F1 of 8 runs, 12 classes" in texts
    rarest = "\n".join(output_texts(nbformat.from_dict(
        {"cells": [c for c in nb.cells if "rarest_classes(" in c.source]})))
    assert "type_00" in rarest and "type_09" in rarest  # the ten rarest classes are listed
    assert "type_10" not in rarest and "type_11" not in rarest  # the two most common are not


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
