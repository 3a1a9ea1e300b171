"""Grouped validation (`model.grouped`): folds of whole batches, choices made on batches the
candidate never trained on, one refit on every cell, and the fallbacks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import cellcontrast as cc
from cellcontrast.cli.entry import main
from cellcontrast.data.atlas import prepare_atlas
from cellcontrast.data.simulate import simulate_atlas
from cellcontrast.model import grouped
from cellcontrast.model.grouped import batch_folds, refit_params

FAST = {"lr": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]}}


@pytest.fixture(scope="module")
def reference():
    return simulate_atlas(n_cells=900, n_types=6, n_genes=120, n_individuals=3, seed=3)


def _obs(batches, labels):
    return pd.DataFrame({"donor": batches, "cell_type": labels}, index=[f"c{i}" for i in range(len(labels))])


def test_leave_one_batch_out_never_trains_on_the_held_out_batch(reference):
    obs = prepare_atlas(reference).obs
    folds = batch_folds(obs, "individual")
    batches = obs["individual"].astype(str).to_numpy()
    assert [held for held, _, _ in folds.folds] == [["L1"], ["L2"], ["L3"]] and not folds.single_batch_types
    for held, train, val in folds.folds:
        assert set(batches[val]) == set(held) and not set(batches[train]) & set(held)
        assert train.size + val.size == obs.shape[0]  # every cell of a kept type trains or validates


def test_many_batches_make_five_folds_of_whole_batches():
    rng = np.random.default_rng(0)
    batches = rng.choice([f"d{i}" for i in range(12)], 2000)
    folds = batch_folds(_obs(batches, rng.choice(list("abc"), 2000)), "donor")
    assert len(folds.folds) == grouped.MAX_FOLDS
    held = [name for names, _, _ in folds.folds for name in names]
    assert sorted(held) == sorted(set(batches))  # each batch held out exactly once
    for names, train, _ in folds.folds:
        assert not set(batches[train]) & set(names)


def test_a_type_of_one_batch_is_validated_within_it_and_named():
    batches = np.repeat(["d1", "d2"], 50)
    labels = np.array(["a", "b"] * 25 + ["a", "b", "c", "c", "c"] * 10)
    folds = batch_folds(_obs(batches, labels), "donor", val_fraction=0.2)
    assert folds.single_batch_types == ["c"]
    _, train, val = folds.folds[1]  # d2 held out: c lives there only
    assert (labels[train] == "c").sum() == 24 and (labels[val] == "c").sum() == 6
    assert set(batches[train][labels[train] != "c"]) == {"d1"}
    assert "1 types live in one donor only" in grouped.say_fallbacks(folds, "donor")


def test_a_key_with_one_value_falls_back_to_what_a_fit_without_one_does(reference, capsys, monkeypatch):
    """A small reference: cross-validation, as without a key (mouse pancreas, one training donor:
    0.862 / 0.906 on the held-out donor with a 10% part, 0.942 / 0.947 cross-validated); a large one: one part."""
    from cellcontrast.experiments import fit_annotator as module

    one = reference.copy()
    one.obs["individual"] = "L1"
    kw = {"chains": "lr", "params": FAST, "batch_key": "individual", "experiment": None}
    monkeypatch.setattr(module, "CV_MAX_CELLS", one.n_obs)  # the shipped rule, at this size
    result = cc.fit_annotator(one, "cell_type", **kw)
    assert "has one value; validating on 5 stratified cross-validation folds" in capsys.readouterr().err
    assert set(result.fold_scores["held_out"]) == {f"fold {k}" for k in range(1, 6)}
    assert "one value" in result.chain.config["fit"]["validation_note"]
    monkeypatch.setattr(module, "CV_MAX_CELLS", one.n_obs - 1)
    large = cc.fit_annotator(one, "cell_type", **kw)
    assert "has one value; validating on a stratified random part" in capsys.readouterr().err
    assert large.fold_scores is None


@pytest.fixture
def fit_splits(monkeypatch):
    """Every split `model.grouped` trains chains on, in order."""
    calls = []
    real = grouped.fit_chains

    def spy(atlas, chains, **kw):
        calls.append(kw["split"])
        return real(atlas, chains, **kw)

    monkeypatch.setattr(grouped, "fit_chains", spy)
    return calls


def test_choices_are_scored_out_of_fold_and_the_refit_uses_every_cell(reference, fit_splits):
    calls = fit_splits
    result = cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, batch_key="individual",
                              experiment=None)
    batches = reference.obs["individual"].astype(str).to_numpy()
    *fold_calls, refit = calls
    assert len(fold_calls) == 3
    for train, val, _ in fold_calls:  # each candidate validated on a batch it never trained on
        assert not set(batches[train]) & set(batches[val])
    assert np.array_equal(refit[0], np.arange(reference.n_obs)) and result.n_cells["train"] == reference.n_obs
    fit = result.chain.config["fit"]
    assert fit["validation"] == "grouped" and [f["held_out"] for f in fit["folds"]] == ["L1", "L2", "L3"]
    assert result.chain.metrics["val_macro_f1"] == pytest.approx(np.mean([f["val_macro_f1"] for f in fit["folds"]]))
    assert np.isfinite(result.chain.metrics["val_confidence_q05"]) and result.validation[0].size == reference.n_obs
    # the refit's L2 is the one the folds chose (geometric mean), kept at the end of its path: nothing left to pick
    refit = result.chain.config["params"]["lr"]
    assert refit["path_keep"] == "last" and result.chain.config["fit"]["choices"]["chosen_l2"] == refit["l2_path"][-1]


def test_refit_params_take_the_folds_majority_and_geometric_mean_l2():
    choices = [{"n_hvg": 2000, "standardize": False, "chosen_l2": 1e-2},
               {"n_hvg": "all", "standardize": False, "chosen_l2": 1e-4},
               {"n_hvg": 2000, "standardize": True, "chosen_l2": 1e-3}]
    fixed = refit_params("lr", {"lr": {"clip": 5.0}}, choices)["lr"]
    # the geometric mean, reached down the stronger values of the path and kept
    assert fixed == {"clip": 5.0, "n_hvg": 2000, "standardize": False, "path_keep": "last",
                     "l2_path": [1e-1, 3e-2, 1e-2, 3e-3, pytest.approx(1e-3)]}
    assert refit_params("svm", {"svm": {"l2_path": [1e-2, 1e-5]}}, choices[:1])["svm"]["l2_path"] == [pytest.approx(1e-2)]
    assert refit_params("scdae", None, [{}]) == {}


def test_same_seed_same_grouped_annotator(reference):
    kw = {"chains": "lr", "params": FAST, "batch_key": "individual", "experiment": None}
    first, again = (cc.fit_annotator(reference, "cell_type", **kw) for _ in range(2))
    pd.testing.assert_frame_equal(first.fold_scores, again.fold_scores)
    assert first.chain.metrics == again.chain.metrics


def test_the_card_shows_each_held_out_batch(reference, tmp_path):
    out = tmp_path / "a.onnx"
    cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, batch_key="individual", out=out,
                     experiment=None)
    card = (tmp_path / "a.card.md").read_text()
    assert "## Validation by held-out individual" in card and "| L2 |" in card
    assert "grouped by `individual`, 3 folds" in card


def test_bad_batch_keys_are_refused_in_one_line(reference, tmp_path, capsys):
    path, out = tmp_path / "ref.h5ad", tmp_path / "a.onnx"
    reference.write_h5ad(path)
    assert main(["fit", "--reference", str(path), "--out", str(out), "--chains", "lr", "--batch-key", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--batch-key nope: no obs column 'nope'" in err and "Traceback" not in err
    missing = reference.copy()
    missing.obs["donor"] = pd.Series(["a", None] * (reference.n_obs // 2), index=reference.obs_names, dtype=object)
    missing.write_h5ad(path)
    assert main(["fit", "--reference", str(path), "--out", str(out), "--chains", "lr", "--batch-key", "donor"]) == 2
    assert "cells have no value" in capsys.readouterr().err
    assert not out.exists()


def test_components_under_grouped_validation_take_cross_batch_positives(reference):
    params = {**FAST, "mlp": {"max_epochs": 2}}
    result = cc.fit_annotator(reference, "cell_type", chains="lr+mlp", params=params, batch_key="individual",
                              experiment=None, ensemble=False)
    assert result.chain.config["params"]["mlp"]["positives"] == "cross_batch"
    plain = cc.fit_annotator(reference, "cell_type", chains="lr+mlp", params=params, experiment=None, ensemble=False)
    assert plain.chain.config["params"]["mlp"]["positives"] == "labels"


def test_cross_validation_folds_validate_every_cell_once_with_every_type_in_each():
    labels = np.array(["a"] * 23 + ["b"] * 7 + ["c"] * 5)
    obs = _obs(np.zeros(labels.size), labels)
    folds = grouped.stratified_folds(obs, 5, seed=1)
    validated = np.concatenate([val for _, _, val in folds.folds])
    assert np.array_equal(np.sort(validated), np.arange(labels.size))  # each cell validated exactly once
    for _, train, val in folds.folds:
        assert not set(train) & set(val) and train.size + val.size == labels.size
        assert set(labels[val]) == {"a", "b", "c"}  # 5+ cells a type: every fold holds every type
    assert folds.groups is None and not folds.single_batch_types  # no cross-batch positives from random folds
    again = grouped.stratified_folds(obs, 5, seed=1)
    assert all(np.array_equal(v1, v2) for (_, _, v1), (_, _, v2) in zip(folds.folds, again.folds, strict=True))


def test_val_folds_choose_on_cross_validation_and_refit_on_every_cell(reference, tmp_path):
    out = tmp_path / "a.onnx"
    params = {**FAST, "mlp": {"max_epochs": 2}}
    result = cc.fit_annotator(reference, "cell_type", chains="lr+mlp", params=params, val_folds=3, out=out,
                              experiment=None, ensemble=False)
    fit = result.chain.config["fit"]
    assert fit["validation"] == "grouped" and len(fit["folds"]) == 3 and result.n_cells["train"] == reference.n_obs
    assert result.validation[0].size == reference.n_obs  # thresholds from every cell, each predicted out of fold
    assert "3 cross-validation folds" in fit["chosen_by"]
    assert "3 stratified cross-validation folds" in (tmp_path / "a.card.md").read_text()
    assert result.chain.config["params"]["mlp"]["positives"] == "labels"  # random folds share batches


def test_val_folds_with_a_batch_key_or_below_two_are_refused(reference, tmp_path, capsys):
    path, out = tmp_path / "ref.h5ad", tmp_path / "a.onnx"
    reference.write_h5ad(path)
    base = ["fit", "--reference", str(path), "--out", str(out), "--chains", "lr"]
    assert main([*base, "--batch-key", "individual", "--val-folds", "5"]) == 2
    assert "both set the validation; give one" in capsys.readouterr().err
    assert main([*base, "--val-folds", "1"]) == 2
    err = capsys.readouterr().err
    assert "needs at least 2 folds" in err and "Traceback" not in err and not out.exists()


def test_a_small_reference_is_cross_validated_by_default_and_a_large_one_is_not(reference, monkeypatch):
    from cellcontrast.experiments import fit_annotator as module

    monkeypatch.setattr(module, "CV_MAX_CELLS", reference.n_obs)  # the shipped rule, at this size
    small = cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, experiment=None, ensemble=False)
    assert small.chain.config["fit"]["batch_key"] == "cross-validation fold"
    assert len(small.chain.config["fit"]["folds"]) == module.CV_FOLDS
    monkeypatch.setattr(module, "CV_MAX_CELLS", reference.n_obs - 1)
    large = cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, experiment=None, ensemble=False)
    assert large.fold_scores is None and large.n_cells["val"] < reference.n_obs // 5  # one stratified part


def test_checkpoints_on_the_training_batches_never_touch_the_scored_batch(reference, fit_splits):
    calls = fit_splits
    atlas = prepare_atlas(reference)
    folds = batch_folds(atlas.obs, "individual")
    found = grouped.fit_folds(atlas, folds, [("lr", "none")], params=FAST, checkpoints_on="training_batches")
    batches = atlas.obs["individual"].astype(str).to_numpy()
    for (held, train, val), (inner_train, inner_val, _) in zip(folds.folds, calls, strict=True):
        # the choices are made on part of the training batches; the held-out batch is only scored
        assert set(np.concatenate([inner_train, inner_val])) == set(train) and not set(inner_train) & set(inner_val)
        assert not set(batches[inner_val]) & set(held) and not set(inner_train) & set(val)
    scored = found.fold_scores.set_index("held_out")
    assert list(scored.index) == ["L1", "L2", "L3"] and (scored["n_val"] == [v.size for _, _, v in folds.folds]).all()
    assert scored["val_macro_f1"].between(0, 1).all()
    with pytest.raises(cc.InputError, match="--checkpoints-on 'test': must be one of held_out, training_batches"):
        grouped.fit_folds(atlas, folds, [("lr", "none")], params=FAST, checkpoints_on="test")


def test_fit_picks_checkpoints_on_the_training_batches_when_asked(reference, fit_splits, tmp_path, capsys):
    calls = fit_splits
    result = cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, batch_key="individual",
                              checkpoints_on="training_batches", experiment=None, ensemble=False)
    batches = reference.obs["individual"].astype(str).to_numpy()
    *fold_calls, refit = calls
    assert len(fold_calls) == 3 and refit[0].size == reference.n_obs
    for fold, (inner_train, inner_val, _) in zip(result.chain.config["fit"]["folds"], fold_calls, strict=True):
        # no fold picks anything on the batch it is scored on, and that batch is still what it reports
        assert fold["held_out"] not in set(batches[inner_val]) | set(batches[inner_train])
        assert fold["n_val"] == (batches == fold["held_out"]).sum()
    assert [f["held_out"] for f in result.chain.config["fit"]["folds"]] == ["L1", "L2", "L3"]
    assert "on a part of its training batches" in result.chain.config["fit"]["chosen_by"]
    with pytest.raises(cc.InputError, match="--checkpoints-on 'test'"):  # refused before the path is read
        cc.fit_annotator(tmp_path / "missing.h5ad", checkpoints_on="test", experiment=None)
    out = tmp_path / "a.onnx"
    argv = ["fit", "--reference", str(tmp_path / "missing.h5ad"), "--out", str(out), "--checkpoints-on", "test"]
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert "--checkpoints-on: invalid choice: 'test'" in err and "Traceback" not in err and not out.exists()
