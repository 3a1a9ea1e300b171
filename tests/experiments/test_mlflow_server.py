"""`train`, `export` (registry) and `export --best` against a real MLflow tracking server over
HTTP, as a team shares runs: nothing may land in a local ./mlruns."""

import json

import pytest

from cellcontrast.cli.entry import main
from cellcontrast.experiments.registry import REGISTERED_MODEL_NAME
from cellcontrast.export.onnx import read_onnx_metadata


def test_train_export_and_register_over_http(mlflow_server, tiny_split, tmp_path, monkeypatch, capsys):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"lr": {"l2_path": [1e-2], "n_hvg": 100}}))
    assert main(["train", "--split-dir", str(tiny_split), "--base", "lr", "--params", str(params),
                 "--out-dir", "m", "--experiment", "shared"]) == 0
    assert main(["export", "--best", "--experiment", "shared", "--out", "best.onnx"]) == 0
    best_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["export", "--model-dir", "m", "--out", "folder.onnx", "--experiment", "shared"]) == 0

    client = mlflow.MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("shared")
    trained = [r for r in client.search_runs([experiment.experiment_id]) if "val_macro_f1" in r.data.metrics
               and r.data.tags.get("cellcontrast.kind") != "export"]
    assert trained, "the training run is on the server"
    run = trained[0]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # artifacts went over HTTP
    assert any(a.path == "chain" for a in client.list_artifacts(run.info.run_id))
    assert run.info.run_id in best_line and REGISTERED_MODEL_NAME in best_line
    assert read_onnx_metadata(tmp_path / "best.onnx")["run_id"] == run.info.run_id
    assert read_onnx_metadata(tmp_path / "folder.onnx")["genes"] == read_onnx_metadata(tmp_path / "best.onnx")["genes"]
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
    assert len(versions) == 2  # one per export, each with its ONNX file on the server
    for version in versions:
        assert client.list_artifacts(version.run_id)
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
