"""The held-out-batch setting: no cell of the held-out batch reaches training or validation."""

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellcontrast.cli import main
from cellcontrast.data.heldout import kept_types, make_heldout_split

PARAMS = """settings:
  heldout: {batch_key: donor, min_cells: 3, cap: 100, val_fraction: 0.2}
  default: {k: 2, cap: 10}
"""


def _labels_and_batches():
    # type a: many cells everywhere; b: only in d1 and d2; c: 2 cells in d3 only (dropped)
    labels = ["a"] * 30 + ["b"] * 12 + ["c"] * 2
    batches = ["d1"] * 10 + ["d2"] * 10 + ["d3"] * 10 + ["d1"] * 6 + ["d2"] * 6 + ["d3"] * 2
    return np.array(labels), np.array(batches)


def test_kept_types_need_min_cells_in_the_training_batches_of_every_fold():
    labels, batches = _labels_and_batches()
    # b has 6 training cells when d1 or d2 is held out, 12 when d3 is; c has 0 when d3 is held out
    assert kept_types(labels, batches, 3) == (["a", "b"], ["c"])
    assert kept_types(labels, batches, 7) == (["a"], ["b", "c"])


@pytest.mark.parametrize("holdout", ["d1", "d2", "d3"])
def test_no_cell_of_the_held_out_batch_reaches_train_or_validation(holdout):
    labels, batches = _labels_and_batches()
    split = make_heldout_split(labels, batches, holdout, min_cells=3, val_fraction=0.2, seed=0)
    train, val, test = split.indices["train"], split.indices["val"], split.indices["test"]
    assert not np.isin(train, test).any() and not np.isin(val, test).any() and not np.isin(train, val).any()
    assert set(batches[train]) | set(batches[val]) == {"d1", "d2", "d3"} - {holdout}
    # the test part: every cell of the held-out batch whose type is kept, nothing else
    expected = np.flatnonzero((batches == holdout) & np.isin(labels, ["a", "b"]))
    np.testing.assert_array_equal(np.sort(test), expected)
    for name in split.classes:  # every kept type is in training and in validation
        assert (labels[train] == name).any() and (labels[val] == name).any()
    assert split.dropped == ["c"] and split.batches == ["d1", "d2", "d3"]


def test_the_same_seed_draws_the_same_split():
    labels, batches = _labels_and_batches()
    a = make_heldout_split(labels, batches, "d1", min_cells=3, seed=4)
    b = make_heldout_split(labels, batches, "d1", min_cells=3, seed=4)
    for part in ("train", "val", "test"):
        np.testing.assert_array_equal(a.indices[part], b.indices[part])


def _atlas(path, donors, labels):
    rng = np.random.default_rng(0)
    n = len(labels)
    obs = pd.DataFrame({"cell_type": labels, "donor": donors}, index=[f"c{i}" for i in range(n)])
    ad.AnnData(X=sp.csr_matrix(rng.poisson(2.0, (n, 20)).astype(np.float32)), obs=obs,
               var=pd.DataFrame(index=[f"g{i}" for i in range(20)])).write_h5ad(path)
    return path


def _split(tmp_path, atlas, *extra):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    return main(["split", "--atlas", str(atlas), "--setting", "heldout", "--params", str(params),
                 "--out-dir", str(tmp_path / "out"), *map(str, extra)])


def test_split_command_writes_one_fold(tmp_path, capsys):
    labels, batches = _labels_and_batches()
    atlas = _atlas(tmp_path / "a.h5ad", batches, labels)
    assert _split(tmp_path, atlas, "--holdout", "d2") == 0
    info = json.loads((tmp_path / "out" / "split.json").read_text())
    assert info["holdout"] == "d2" and info["batch_key"] == "donor" and info["dropped_types"] == ["c"]
    test = ad.read_h5ad(tmp_path / "out" / "test.h5ad")
    assert set(test.obs["donor"]) == {"d2"}
    for part in ("train", "val"):
        assert "d2" not in set(ad.read_h5ad(tmp_path / "out" / f"{part}.h5ad").obs["donor"])
    err = capsys.readouterr().err
    assert err.count("are left out: c") == 1  # the dropped type, named once
    assert _split(tmp_path, atlas, "--seed", "2") == 0  # fold 2 = the third batch, sorted
    assert json.loads((tmp_path / "out" / "split.json").read_text())["holdout"] == "d3"


@pytest.mark.parametrize(("case", "message"), [
    ("unknown key", "no obs column 'batch'"),
    ("one value", "has one value"),
    ("not a batch", "is not a batch"),
    ("no kept cell", "has no cell of a kept type"),
    ("no such fold", "fold 7 does not exist"),
    ("random setting", "is a random split"),
])
def test_bad_heldout_input_is_one_line_and_writes_nothing(case, message, tmp_path, capsys):
    labels, batches = _labels_and_batches()
    if case == "one value":
        batches = np.array(["d1"] * len(labels))
    if case == "no kept cell":  # d4 holds only cells of the dropped type
        batches = batches.copy()
        batches[labels == "c"] = "d4"
    atlas = _atlas(tmp_path / "a.h5ad", batches, labels)
    extra = {"unknown key": ["--batch-key", "batch"], "not a batch": ["--holdout", "d9"],
             "no kept cell": ["--holdout", "d4"], "no such fold": ["--seed", "7"]}.get(case, [])
    if case == "random setting":
        params = tmp_path / "params.yaml"
        params.write_text(PARAMS)
        code = main(["split", "--atlas", str(atlas), "--setting", "default", "--params", str(params),
                     "--out-dir", str(tmp_path / "out"), "--batch-key", "donor"])
    else:
        code = _split(tmp_path, atlas, *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_benchmark_runs_one_fold_per_batch_and_reports_each(tmp_path, small_atlas_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    (tmp_path / "params.yaml").write_text(BENCH_PARAMS)
    assert main(["benchmark", "--atlas", str(small_atlas_path), "--settings", "heldout", "--batch-key",
                 "individual", "--out-dir", str(tmp_path / "bench")]) == 0
    results = pd.read_csv(tmp_path / "bench" / "results.csv")
    assert sorted(results["holdout"]) == ["L1", "L2"] and sorted(results["seed"]) == [0, 1]
    table = (tmp_path / "bench" / "table1.md").read_text()
    assert "per held-out batch" in table and "L1 (F1 / top-1)" in table and "L2 (F1 / top-1)" in table


BENCH_PARAMS = """settings:
  heldout: {batch_key: null, min_cells: 10, cap: 200, val_fraction: 0.1}
  default: {k: 5, cap: 50}
grid: {bases: [lr], components: [none], workers: 1, threads: 1}
model_params: {lr: {n_hvg: 100, l2_path: [0.01]}}
"""


def test_each_fold_is_tuned_on_its_own_split_and_its_grid_reads_that(tmp_path, small_atlas_path, monkeypatch):
    """A fold's test batch is in every other fold's training batches: one study per fold, each on
    its own split, and each fold's grid task reads its own parameters."""
    import cellcontrast.experiments.benchmark as benchmark
    from cellcontrast.experiments.grid import grid_tasks

    (tmp_path / "params.yaml").write_text(BENCH_PARAMS)
    studied, grids = [], []

    def fake_tune_setting(setting, cfg, tcfg, space, seed=None):
        if seed is None:  # a random-split setting: one study, on its tuning split
            root = Path(cfg["split_root"]) / setting
            tuned_on = {n for part in ("train", "val") for n in ad.read_h5ad(root / "tuning" / f"{part}.h5ad").obs_names}
            for evaluated in cfg["seeds_by_setting"][setting]:
                assert not tuned_on & set(ad.read_h5ad(root / f"seed{evaluated}" / "test.h5ad").obs_names)
            studied.append((setting, None, None))
            return
        split = json.loads((Path(cfg["split_root"]) / setting / f"seed{seed}" / "split.json").read_text())
        studied.append((setting, seed, split["holdout"]))
        out = Path(cfg["tuned_dir"]) / setting / f"seed{seed}"
        out.mkdir(parents=True)
        (out / "lr.json").write_text(json.dumps({"lr": {"n_hvg": 50 + seed}}))

    monkeypatch.setattr(benchmark, "tune_setting", fake_tune_setting)
    monkeypatch.setattr(benchmark, "run_grid", lambda cfg: grids.append(grid_tasks(cfg)) or pd.DataFrame())
    monkeypatch.setattr(benchmark, "make_report", lambda *a, **k: {})
    benchmark.benchmark(small_atlas_path, out_dir=tmp_path / "bench", settings=["heldout", "default"], seeds=2,
                        tune_trials=1, params_path=tmp_path / "params.yaml", batch_key="individual")
    assert set(studied) == {("heldout", 0, "L1"), ("heldout", 1, "L2"), ("default", None, None)}
    (tasks,) = grids
    n_hvg = {Path(t["split_dir"]).name: t["params"]["lr"]["n_hvg"] for t in tasks if "heldout" in t["split_dir"]}
    assert n_hvg == {"seed0": 50, "seed1": 51}
