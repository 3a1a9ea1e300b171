"""--unseen-types: N types leave training and validation, their test cells stay."""

import json

import anndata as ad
import numpy as np
import pytest

from cellcontrast.cli.entry import main
from cellcontrast.data.split_data import load_split_data
from cellcontrast.data.splits import split_atlas_to_dir


@pytest.mark.parametrize("setting", ["default", "natural"])
def test_removed_types_are_absent_from_training_and_kept_in_the_test(small_atlas_path, small_params, tmp_path,
                                                                        setting):
    info = split_atlas_to_dir(small_atlas_path, setting, 1, tmp_path, params_path=small_params, unseen_types=3)
    unseen = info["unseen_types"]
    assert len(unseen) == 3 and not set(unseen) & set(info["classes"])
    for part in ("train", "val"):
        assert not set(ad.read_h5ad(tmp_path / f"{part}.h5ad").obs["cell_type"].astype(str)) & set(unseen)
    test = ad.read_h5ad(tmp_path / "test.h5ad").obs["cell_type"].astype(str)
    assert set(unseen) <= set(test)
    data = load_split_data(tmp_path)
    assert data.unseen_types == unseen and data.classes == info["classes"]
    assert data.X["unseen"].shape[0] == int(test.isin(unseen).sum()) == data.y["unseen"].size
    assert data.X["test"].shape[0] == int((~test.isin(unseen)).sum())
    assert data.y["test"].max() < len(data.classes)  # the seen test cells keep the model's codes
    # the same seed removes the same types; another seed others
    again = split_atlas_to_dir(small_atlas_path, setting, 1, tmp_path / "again", params_path=small_params,
                               unseen_types=3)
    other = split_atlas_to_dir(small_atlas_path, setting, 2, tmp_path / "other", params_path=small_params,
                               unseen_types=3)
    assert again["unseen_types"] == unseen and other["unseen_types"] != unseen


@pytest.mark.parametrize("n", [7, -1])
def test_too_many_unseen_types_is_one_line_and_writes_nothing(small_atlas_path, small_params, tmp_path, capsys, n):
    code = main(["split", "--atlas", str(small_atlas_path), "--setting", "default", "--params", str(small_params),
                 "--out-dir", str(tmp_path / "out"), "--unseen-types", str(n)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "it must leave at least two" in err, err
    assert not (tmp_path / "out").exists()


def test_benchmark_refuses_unseen_types_before_writing(small_atlas_path, small_params, tmp_path, capsys):
    code = main(["benchmark", "--atlas", str(small_atlas_path), "--settings", "default", "--seeds", "1",
                 "--params", str(small_params), "--out-dir", str(tmp_path / "bench"), "--unseen-types", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--unseen-types 8 would leave 0" in err, err
    assert not (tmp_path / "bench").exists()


def test_a_chain_trained_without_the_unseen_types_is_scored_on_them(small_atlas_path, small_params, tmp_path,
                                                                   monkeypatch):
    from cellcontrast.experiments.cell import train_cell

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    split = tmp_path / "split"
    info = split_atlas_to_dir(small_atlas_path, "default", 0, split, params_path=small_params, unseen_types=2)
    (row,) = train_cell(split, "lr", ["none"], {"lr": {"epochs": 5}}, out_root=tmp_path / "models", quiet=True)
    for score in ("max_prob", "energy", "knn", "centroid"):
        assert 0.0 <= row[f"test_unseen_auroc_{score}"] <= 1.0
        assert 0.0 <= row[f"test_unseen_flagged_{score}"] <= 1.0
    assert 0.0 <= row["test_unseen_unassigned"] <= 1.0 and 0.0 <= row["test_seen_unassigned"] <= 1.0
    for group in ("unseen", "seen"):  # --flag-unseen only ever adds Unassigned cells
        assert row[f"test_{group}_unassigned"] <= row[f"test_{group}_unassigned_flag_unseen"] <= 1.0
    config = json.loads((tmp_path / "models" / "lr-none" / "config.json").read_text())
    assert config["class_names"] == info["classes"]  # the model never heard of the unseen types


def test_auroc_orders_novelty():
    from cellcontrast.train.open_set import auroc

    assert auroc(np.array([0.1, 0.2]), np.array([0.8, 0.9])) == 1.0
    assert auroc(np.array([0.8, 0.9]), np.array([0.1, 0.2])) == 0.0
    assert np.isnan(auroc(np.array([]), np.array([0.5])))
