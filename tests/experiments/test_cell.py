"""`cellcontrast train`: one MLflow run per training with params, metrics and artifacts."""

import json

import mlflow
import numpy as np

from cellcontrast.cli.entry import main
from conftest import FAST_PARAMS


def _train(split, tmp_path, base, component, capsys):
    params = tmp_path / "params.json"
    params.write_text(json.dumps(FAST_PARAMS))
    code = main(["train", "--split-dir", str(split), "--base", base, "--component", component,
                 "--params", str(params), "--out-dir", str(tmp_path / "models")])
    assert code == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("{")]
    assert len(lines) == 1
    return json.loads(lines[0])


def test_train_logs_one_complete_run(tiny_split, tmp_path, mlflow_store, capsys):
    result = _train(tiny_split, tmp_path, "lr", "mls", capsys)
    assert {"test_top1", "test_top3", "test_macro_f1", "val_macro_f1", "run_id"} <= set(result)
    assert 0 <= result["test_top1"] <= result["test_top3"] <= 1

    runs = mlflow.search_runs(experiment_names=["cellcontrast"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_id == result["run_id"]
    p = run.data.params
    assert p["split.setting"] == "default" and p["split.seed"] == "0" and len(p["split.source_sha256"]) == 64
    assert p["lr.epochs"] == "5" and p["mls.max_epochs"] == "4" and "mls.temperature" in p
    assert run.data.tags["base"] == "lr" and run.data.tags["component"] == "mls"
    assert abs(run.data.metrics["test_top1"] - result["test_top1"]) <= 5e-5  # the printed line is rounded
    history = mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "mls_component.loss")
    assert len(history) >= 2  # one value per epoch
    # under a component LR's head goes unused: only its preprocessing is fitted, no LR curve
    assert not mlflow.tracking.MlflowClient().get_metric_history(run.info.run_id, "lr.loss")
    names = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"confusion_matrix.png", "per_class_f1.csv", "embedding.png", "chain"} <= names


def test_saved_chain_reproduces_the_logged_metrics(tiny_split, tmp_path, mlflow_store, capsys):
    from cellcontrast.data.split_data import load_split_data
    from cellcontrast.nn.chain import load_chain, predict_proba
    from cellcontrast.train.metrics import classification_metrics

    result = _train(tiny_split, tmp_path, "actinn", "mlp", capsys)
    chain, config = load_chain(tmp_path / "models" / "actinn-mlp")
    data = load_split_data(tiny_split)
    got = classification_metrics(data.y["test"], predict_proba(chain, data.X["test"]), len(data.classes))
    assert abs(got["top1"] - result["test_top1"]) <= 5e-5  # the printed line is rounded
    assert config["class_names"] == data.classes and config["run_id"] == result["run_id"]


def test_finished_cells_are_skipped_and_bases_shared(tiny_split, tmp_path, mlflow_store):
    from cellcontrast.experiments.cell import train_cell

    first = train_cell(tiny_split, "lr", ["none", "mlp"], FAST_PARAMS, out_root=tmp_path / "m", quiet=True,
                       skip_finished=True)
    assert [r["skipped"] for r in first] == [False, False]
    again = train_cell(tiny_split, "lr", ["none", "mlp"], FAST_PARAMS, out_root=tmp_path / "m", quiet=True,
                       skip_finished=True)
    assert [r["skipped"] for r in again] == [True, True]
    assert [r["run_id"] for r in again] == [r["run_id"] for r in first]
    assert np.isclose(again[1]["test_top1"], first[1]["test_top1"])
    # A skipped cell reports what the run logged, calibration included (the report needs it).
    for fresh, skipped in zip(first, again, strict=True):
        assert set(skipped) == set(fresh)
        assert np.isclose(skipped["temperature"], fresh["temperature"])
    # other parameters: a new run
    changed = train_cell(tiny_split, "lr", ["none"], {**FAST_PARAMS, "lr": {"epochs": 6}}, out_root=tmp_path / "m",
                         quiet=True, skip_finished=True)
    assert changed[0]["skipped"] is False
    mlp_run = mlflow.get_run(first[1]["run_id"])
    assert mlp_run.data.tags["base_run_id"] == first[0]["run_id"]


def test_runs_recorded_by_other_training_code_are_trained_again(tiny_split, tmp_path, mlflow_store, monkeypatch):
    """Equal parameters and data are not an equal model once the training code changed: a grid
    resumed after an edit must not report chains (and metrics) the old code trained."""
    from cellcontrast.experiments import cell

    first = cell.train_cell(tiny_split, "lr", ["none"], FAST_PARAMS, out_root=tmp_path / "m", quiet=True,
                            skip_finished=True)
    monkeypatch.setattr(cell, "code_digest", lambda *paths: "other-code")
    again = cell.train_cell(tiny_split, "lr", ["none"], FAST_PARAMS, out_root=tmp_path / "m", quiet=True,
                            skip_finished=True)
    assert again[0]["skipped"] is False and again[0]["run_id"] != first[0]["run_id"]


def test_same_seed_same_metrics(tiny_split, tmp_path, mlflow_store):
    from cellcontrast.experiments.cell import train_cell

    a = train_cell(tiny_split, "lr", ["mlp"], FAST_PARAMS, out_root=tmp_path / "a", quiet=True)
    b = train_cell(tiny_split, "lr", ["mlp"], FAST_PARAMS, out_root=tmp_path / "b", quiet=True)
    for key in ("test_top1", "test_top3", "test_macro_f1", "val_macro_f1"):
        assert abs(a[0][key] - b[0][key]) < 1e-6


def test_bad_params_file_is_one_line(tiny_split, tmp_path, mlflow_store, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"lr": {"no_such_knob": 1}}')
    assert main(["train", "--split-dir", str(tiny_split), "--base", "lr", "--params", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no_such_knob" in err
    assert main(["train", "--split-dir", str(tmp_path), "--base", "lr"]) == 2
    assert "not a split folder" in capsys.readouterr().err
