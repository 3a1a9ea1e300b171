"""Tuning: a study on the validation split, resumable, shared by workers, safe to kill."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
from optuna.trial import TrialState

from cellcontrast import cli
from cellcontrast.core.errors import InputError
from cellcontrast.experiments.search_space import resolve_search_space
from cellcontrast.experiments.tuning import TrialLog, tune
from cellcontrast.train.recipes import resolve_params

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Tiny models and epoch budgets: a trial takes well under a second.
SPACE = {"hidden_dim": [16, 32], "out_dim": [8, 16], "max_epochs": 5}
BASE = {"epochs": 5}
# Slower trials (about a second each), for the tests that race or kill processes.
SLOW_PARAMS_YAML = """\
grid: {threads: 1}
model_params:
  lr: {epochs: 5}
tune:
  seed: 0
  hidden_dim: [16, 32]
  out_dim: [8, 16]
  max_epochs: %d
  patience: null
"""


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    from cellcontrast.data.simulate import simulate_atlas
    from cellcontrast.data.splits import split_atlas_to_dir

    root = tmp_path_factory.mktemp("tune_split")
    simulate_atlas(n_cells=1500, n_types=8, n_genes=120, seed=0).write_h5ad(root / "atlas.h5ad")
    out = root / "default" / "seed0"
    split_atlas_to_dir(root / "atlas.h5ad", "default", 0, out,
                       settings={"settings": {"default": {"k": 6, "cap": 80}}})
    return out


@pytest.fixture
def work(tmp_path, monkeypatch):
    """cwd = tmp_path, an MLflow sqlite store there; returns (tmp_path, optuna storage URL)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    return tmp_path, f"sqlite:///{tmp_path}/optuna.db"


_STORAGES: dict = {}


def _trials(storage: str, name: str, states=None):
    # One storage object per URL: a new one per poll would open a connection pool each time
    # and exhaust a PostgreSQL server's connections.
    if storage not in _STORAGES:
        _STORAGES[storage] = optuna.storages.RDBStorage(storage)
    study = optuna.load_study(study_name=name, storage=_STORAGES[storage])
    return study.get_trials(deepcopy=False, states=states)


def _child_env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    return env


def _tune_cmd(split_dir, storage, name, n_trials, params_path) -> list[str]:
    return [sys.executable, "-m", "cellcontrast", "tune", "--split-dir", str(split_dir),
            "--base", "lr", "--component", "mlp", "--n-trials", str(n_trials), "--storage", storage,
            "--study-name", name, "--params", str(params_path), "--out", f"{name}.json"]


# ---------------------------------------------------------------- a study


def test_study_writes_train_params_and_nested_mlflow_runs(split_dir, work):
    import mlflow

    tmp_path, storage = work
    out = tmp_path / "best.json"
    best = tune(split_dir, "lr", "mlp", 3, storage=storage, out=out, search_space=SPACE,
                base_params=BASE, experiment="tune-test", progress=False)
    written = json.loads(out.read_text())
    assert written == best and set(best) == {"lr", "mlp"}
    for name, values in best.items():  # the `cellcontrast train --params` format, fully resolved
        assert resolve_params(name, values) == values
    assert best["lr"]["epochs"] == 5 and best["mlp"]["max_epochs"] == 5
    assert best["mlp"]["hidden_dim"] in (16, 32) and 0.02 <= best["mlp"]["temperature"] <= 1.0

    trials = _trials(storage, "default-lr-mlp")  # default name: setting-base-component
    assert len(trials) == 3 and all(t.state == TrialState.COMPLETE for t in trials)
    top = max(trials, key=lambda t: t.value)
    assert top.user_attrs["params"] == best
    assert all(t.intermediate_values for t in trials)  # the head stage is reported to the pruner

    exp = mlflow.get_experiment_by_name("tune-test")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "default-lr-mlp" and parent.info.status == "FINISHED"
    assert {k: parent.data.tags[k] for k in ("study_name", "base", "component", "setting")} == {
        "study_name": "default-lr-mlp", "base": "lr", "component": "mlp", "setting": "default"}
    assert "worker" in parent.data.tags
    assert parent.data.metrics["best_val_macro_f1"] == pytest.approx(top.value)
    assert parent.data.params["best.mlp.temperature"] == str(best["mlp"]["temperature"])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["state"] == "COMPLETE"
        assert {"val_macro_f1", "val_top1"} <= set(child.data.metrics)
        assert "mlp.temperature" in child.data.params
    assert sorted(c.data.metrics["val_macro_f1"] for c in children) == pytest.approx(
        sorted(t.value for t in trials))


@pytest.mark.parametrize("base,fixed", [("lr", {"epochs": 4}), ("actinn", {"epochs": 3}),
                                        ("scdae", {"ae_epochs": 1, "classifier_epochs": 3,
                                                   "finetune_epochs": 1, "encoder_dims": [64, 32, 16],
                                                   "classifier_dims": [16, 16]})])
def test_base_study_tunes_the_base_own_sizes(split_dir, work, base, fixed):
    from cellcontrast.train.recipes import DEFAULT_PARAMS

    tmp_path, storage = work
    if "min_steps" in DEFAULT_PARAMS[base]:  # keep the tiny epoch budget tiny
        fixed = {**fixed, "min_steps": 0}
    best = tune(split_dir, base, "none", 1, storage=storage, out=tmp_path / "b.json",
                base_params=fixed, experiment="tune-test", progress=False)
    assert set(best) == {base}
    assert resolve_params(base, best[base]) == best[base]
    (trial,) = _trials(storage, f"default-{base}-none")
    assert set(trial.params) == set(resolve_search_space(base, "none"))
    assert trial.intermediate_values  # the pruner sees this base's validation F1
    assert all(best[base][k] == v for k, v in fixed.items())


def test_a_component_study_takes_the_base_its_base_study_trained(split_dir, work, monkeypatch):
    """The base study's best trial trained the very base a component study freezes (same
    data, parameters and seed): the component study takes it instead of fitting it again."""
    from cellcontrast.experiments import tuning

    tmp_path, storage = work
    fits = []
    real_fit_base = tuning.fit_base
    monkeypatch.setattr(tuning, "fit_base", lambda *a, **k: fits.append(a[5]) or real_fit_base(*a, **k))
    monkeypatch.setattr(tuning, "_BASE_CACHE", {})
    fixed = {"epochs": 3, "min_steps": 0, "hidden_dims": [16, 8]}
    best = tune(split_dir, "actinn", "none", 2, storage=storage, out=tmp_path / "b.json",
                base_params=fixed, experiment="tune-test", progress=False)
    assert fits == ["actinn", "actinn"]  # one fit a trial
    tune(split_dir, "actinn", "mlp", 1, storage=storage, out=tmp_path / "m.json", search_space=SPACE,
         base_params=best["actinn"], experiment="tune-test", progress=False)
    assert fits == ["actinn", "actinn"]  # the best trial's base, not a third fit
    study = optuna.load_study(study_name="default-actinn-none", storage=storage)
    runs = mlflow.search_runs(experiment_names=["tune-test"], filter_string="tags.component = 'mlp'",
                              output_format="list")
    parent = next(r for r in runs if "trial" not in r.data.tags)
    assert parent.data.metrics["base_val_macro_f1"] == pytest.approx(study.best_value)
    monkeypatch.setattr(tuning, "_BASE_CACHE", {})  # another process: the base is fitted again
    tune(split_dir, "actinn", "mls", 1, storage=storage, out=tmp_path / "s.json",
         search_space={"temperature": [0.1, 0.2], "max_epochs": 3}, base_params=best["actinn"],
         experiment="tune-test", progress=False)
    assert fits == ["actinn", "actinn", "actinn"]


def test_resume_runs_only_the_missing_trials(split_dir, work):
    tmp_path, storage = work
    kw = dict(storage=storage, study_name="s", out=tmp_path / "s.json", search_space=SPACE,
              base_params=BASE, experiment="tune-test", progress=False)
    tune(split_dir, "lr", "mlp", 2, **kw)
    first = {t.number: t.value for t in _trials(storage, "s")}
    tune(split_dir, "lr", "mlp", 3, **kw)
    trials = _trials(storage, "s")
    # the third trial finishes (the median pruner may stop it early: that is finished too)
    assert len(trials) == 3 and all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    assert trials[0].state == trials[1].state == TrialState.COMPLETE
    assert trials[2].params != trials[0].params  # the resumed sampler does not replay trial 0
    assert {t.number: t.value for t in trials if t.number in first} == first
    tune(split_dir, "lr", "mlp", 3, **kw)  # already finished: no new trial
    assert len(_trials(storage, "s")) == 3


def test_never_reads_the_test_part(split_dir, work):
    tmp_path, _ = work
    no_test = tmp_path / "no_test"
    shutil.copytree(split_dir, no_test)
    (no_test / "test.h5ad").unlink()
    values = []
    for i, folder in enumerate((split_dir, no_test)):
        storage = f"sqlite:///{tmp_path}/optuna{i}.db"
        best = tune(folder, "lr", "mlp", 2, storage=storage, study_name="s", out=tmp_path / f"{i}.json",
                    search_space=SPACE, base_params=BASE, experiment="tune-test", progress=False)
        values.append(([t.value for t in _trials(storage, "s")], best))
    assert values[0] == values[1]  # same study without test.h5ad at all


def test_pruner_gets_the_best_head_score_so_far(monkeypatch):
    from cellcontrast.experiments import tuning

    monkeypatch.setattr(tuning, "PRUNER_WARMUP_STEPS", 1)
    monkeypatch.setattr(tuning, "PRUNE_CHECK_EVERY", 1)
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=1))
    good = study.ask()
    for epoch in range(4):
        good.report(0.9, epoch)
    study.tell(good, 0.9)
    trial = study.ask()
    log = TrialLog(trial, "mlp_head")
    log("mlp_component", 0, {"loss": 1.0, "val_loss": 2.0})  # other stages are not reported
    log("mlp_head", 0, {"loss": 1.0, "val_macro_f1": 0.5})  # warm-up step: not pruned
    assert trial.storage.get_trial(trial._trial_id).intermediate_values == {0: 0.5}
    with pytest.raises(optuna.TrialPruned):
        log("mlp_head", 1, {"loss": 1.0, "val_macro_f1": 0.4})
    assert trial.storage.get_trial(trial._trial_id).intermediate_values[1] == 0.5  # best so far
    assert len(log.history) == 3


def test_search_space_overrides():
    space = resolve_search_space("lr", "mlp", {
        "temperature": ["1e-2", "5e-1"], "hidden_dim": [32, 64], "max_epochs": 60, "n_trials": 9,
        "mlp": {"lr": {"low": 1e-3, "high": 1e-2, "log": False}, "out_dim": {"choices": [8]}}})
    assert space["temperature"] == ("float", 0.01, 0.5, True)  # YAML reads 1e-2 as a string
    assert space["hidden_dim"] == ("categorical", [32, 64])
    assert space["out_dim"] == ("categorical", [8])
    assert space["lr"] == ("float", 1e-3, 1e-2, False)
    assert space["max_epochs"] == ("fixed", 60)
    mls = resolve_search_space("lr", "mls", {"out_dim": [8, 16]})
    assert "out_dim" not in mls and set(mls) == {"temperature", "hidden_dim", "lr"}
    assert {64, 128, 256} <= set(mls["hidden_dim"][1])
    # Flat keys are for components; a base is tuned by its own section.
    assert resolve_search_space("actinn", "none", {"lr": [0.1, 0.2]})["lr"] == ("float", 1e-5, 1e-3, True)
    assert resolve_search_space("actinn", "none", {"actinn": {"lr": [0.1, 0.2]}})["lr"][1:3] == (0.1, 0.2)
    assert resolve_search_space("scdae", "none")["dropout"] == ("float", 0.0, 0.7, False)
    for bad in ({"temperature": [1.0, 0.1]}, {"temperature": {"low": 0.0, "high": 1.0, "log": True}},
                {"mlp": {"nonsense": [1, 2]}}, {"hidden_dim": []}):
        with pytest.raises(InputError):
            resolve_search_space("lr", "mlp", bad)


# ---------------------------------------------------------------- bad input


def test_bad_inputs_exit_2_with_one_line(split_dir, work, capsys):
    tmp_path, storage = work
    base = ["tune", "--split-dir", str(split_dir), "--base", "lr", "--params", str(tmp_path / "none.yaml")]
    cases = [
        (["tune", "--split-dir", str(tmp_path / "missing"), "--base", "lr", "--storage", storage], "no such split folder"),
        ([*base[:-2], "--n-trials", "0", "--storage", storage], "n_trials"),
        ([*base[:-2], "--storage", "not a url"], "storage URL"),
        ([*base[:-2], "--storage", "nosuchdb://x/y"], "storage"),
        ([*base[:-2], "--storage", f"sqlite:///{tmp_path}/no/such/dir/o.db"], "does not exist"),
        ([*base, "--storage", storage], "no params file"),
    ]
    for argv, text in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and text in err, err
    with pytest.raises(InputError, match="unknown base"):
        tune(split_dir, "rf", "none", 1, storage=storage)
    with pytest.raises(InputError, match="unknown component"):
        tune(split_dir, "lr", "mlx", 1, storage=storage)


# ---------------------------------------------------------------- processes


def test_two_workers_share_one_study(split_dir, tmp_path, optuna_storage):
    params = tmp_path / "params.yaml"
    params.write_text(SLOW_PARAMS_YAML % 200)
    storage = optuna_storage
    env = _child_env(tmp_path)
    procs = [subprocess.Popen(_tune_cmd(split_dir, storage, "shared", 4, params), cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert json.loads(out.strip().splitlines()[-1])["study"] == "shared"
    finished = _trials(storage, "shared", FINISHED)
    assert 4 <= len(finished) <= 5
    assert not _trials(storage, "shared", (TrialState.RUNNING,))
    workers = {t.user_attrs["worker"].rsplit(":", 1)[1] for t in finished}
    assert workers == {str(p.pid) for p in procs}  # both processes ran trials
    # The two seeded samplers did not suggest the same parameters trial for trial.
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == len(finished)


@pytest.mark.parametrize("optuna_storage", ["postgresql"], indirect=True)
def test_killed_worker_resumes_without_redoing_trials(split_dir, tmp_path, monkeypatch, optuna_storage):
    """A worker SIGKILLed in the middle of a trial; the study still completes, every trial
    COMPLETE, PRUNED or FAILED, none RUNNING, none lost. On PostgreSQL, the storage of many
    machines: what the restart does (fail the stale trial, run the missing ones) is the same
    code on every storage, and test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed
    runs it on sqlite too."""
    import mlflow

    params = tmp_path / "params.yaml"
    params.write_text(SLOW_PARAMS_YAML % 250)
    storage = optuna_storage
    heartbeat = {"CELLCONTRAST_TUNE_HEARTBEAT": "1", "CELLCONTRAST_TUNE_GRACE": "3"}
    n_trials = 3
    cmd = _tune_cmd(split_dir, storage, "killed", n_trials, params)
    log = open(tmp_path / "worker.log", "w")  # noqa: SIM115 - closed below, read on failure
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_child_env(tmp_path, **heartbeat),
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 300  # a generous bound on shared cores; the trial takes seconds alone
    done: dict = {}
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                trials = _trials(storage, "killed")
            except Exception:  # the study does not exist yet
                trials = []
            complete = [t for t in trials if t.state == TrialState.COMPLETE]
            # Killed once the next trial is under way: its MLflow run is open (a trial killed
            # before its first heartbeat: test_a_trial_whose_worker_died_before_its_first_heartbeat...).
            if complete and any(t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs for t in trials):
                done = {t.number: t.value for t in complete}
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
    assert done, f"the first trial did not complete in time: {(tmp_path / 'worker.log').read_text()[-1500:]}"
    assert len(done) < n_trials
    killed_at = time.time()
    assert _trials(storage, "killed", (TrialState.RUNNING,))  # the trial it was running

    # Restart with the same target, after the grace period has passed.
    time.sleep(max(0.0, killed_at + 3.5 - time.time()))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for key, value in heartbeat.items():
        monkeypatch.setenv(key, value)
    assert cli.main(cmd[3:]) == 0
    trials = _trials(storage, "killed")
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert len([t for t in trials if t.state in FINISHED]) == n_trials
    assert {t.number: t.value for t in trials if t.number in done} == done  # not redone
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(failed) == 1  # the killed trial, failed by the heartbeat
    run_id = failed[0].user_attrs["mlflow_run_id"]  # its MLflow run was closed too
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed(tmp_path, monkeypatch, optuna_storage):
    """The heartbeat gap: Optuna skips RUNNING trials with no heartbeat; they are failed once
    older than the grace period, and a young one (a worker still starting it) is left alone."""
    import optuna

    from cellcontrast.experiments.optuna_storage import fail_stale, open_storage

    monkeypatch.setenv("CELLCONTRAST_TUNE_HEARTBEAT", "1")
    monkeypatch.setenv("CELLCONTRAST_TUNE_GRACE", "2")
    study = optuna.create_study(study_name="gap", storage=open_storage(optuna_storage))
    orphan = study.ask()  # created, never beaten: its worker was killed right here
    time.sleep(2.5)
    young = study.ask()
    fail_stale(study)
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[orphan.number] == TrialState.FAIL
    assert states[young.number] == TrialState.RUNNING


def test_a_base_with_nothing_to_search_runs_no_study(split_dir, work):
    """A base whose space is all fixed values (``lr: {n_hvg: 40}`` under ``tune:``) would
    repeat one fit: tuning a setting writes those values and creates no study; a searched
    entry brings the study back."""
    import optuna

    from cellcontrast.experiments.setting_tuning import _tune_base

    tmp_path, storage = work
    job = {"base": "lr", "components": ["none"], "split_dir": str(split_dir), "out": str(tmp_path / "lr.json"),
           "search_space": {"lr": {"n_hvg": 40}}, "model_params": {}, "threads": 1,
           "tune": {"base_trials": 2, "n_trials": 2, "storage": storage, "seed": 0, "experiment": "tune-test"}}
    assert _tune_base(job)["params"] == {"lr": {"n_hvg": 40}}
    assert json.loads((tmp_path / "lr.json").read_text()) == {"lr": {"n_hvg": 40}}
    assert optuna.get_all_study_names(storage) == []
    job["search_space"] = {"lr": {"n_hvg": [20, 40], "epochs": 3}}
    job["tune"]["base_trials"] = 1
    assert _tune_base(job)["params"]["lr"]["n_hvg"] in (20, 40)
    assert len(optuna.get_all_study_names(storage)) == 1
