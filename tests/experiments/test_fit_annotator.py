"""`cellcontrast fit` / `cc.fit_annotator`: chains trained on one split, chosen on validation by
the one-SE rule, exported with a model card, tracked in MLflow; test cells unread unless asked."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

import cellcontrast as cc
from cellcontrast.cli.entry import main
from cellcontrast.experiments import fit_annotator, fit_candidates
from cellcontrast.experiments.fit_annotator import _hold_out_test, parse_chains

FAST = {"lr": {"n_hvg": 100, "l2_path": [1e-2, 1e-3]}, "mlp": {"max_epochs": 3}}


@pytest.fixture(scope="module")
def reference(small_atlas):
    return small_atlas[:1500].copy()


def test_fit_chooses_exports_and_writes_the_card(reference, tmp_path, mlflow_store):
    out = tmp_path / "annotator.onnx"
    result = cc.fit_annotator(reference, "cell_type", chains="lr,lr+mlp", params=FAST, out=out)
    assert result.chosen in ("lr", "lr+mlp", "ensemble") and set(result.scores["chain"]) >= {"lr", "lr+mlp"}
    assert result.n_cells["train"] + result.n_cells["val"] == reference.n_obs  # every cell used
    assert result.test_metrics is None
    card = (tmp_path / "annotator.card.md").read_text()
    assert f"**{result.chosen}**" in card and "validation F1" in card and "annotator.card.png" in card
    assert (tmp_path / "annotator.card.png").stat().st_size > 10_000
    annotator = cc.Annotator.load(out)
    assert annotator.classes == result.chain.classes
    runs = mlflow.search_runs(experiment_names=["cellcontrast-fit"], output_format="list")
    parent = [r for r in runs if r.data.tags.get("cellcontrast.kind") == "fit-annotator"]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert len(parent) == 1 and parent[0].data.tags["chosen_chain"] == result.chosen
    assert {r.data.tags.get("chain") for r in nested} >= {"lr", "lr+mlp"}
    assert mlflow.MlflowClient().get_registered_model("cellcontrast-annotator").latest_versions


def test_the_test_part_is_held_out_and_never_read_by_the_choice(reference):
    kw = {"chains": "lr,lr+mlp", "params": FAST, "test_fraction": 0.2, "experiment": None}
    first = cc.fit_annotator(reference, "cell_type", **kw)
    _, test = _hold_out_test(cc.fit_annotator.__globals__["prepare_atlas"](reference), 0.2, 0)
    assert first.n_cells["test"] == test.n_obs > 0
    assert first.n_cells["train"] + first.n_cells["val"] + first.n_cells["test"] == reference.n_obs
    # The split reads every label (it is stratified); the test cells' counts are never read:
    # replaced by other cells' counts, nothing before the report changes.
    scrambled = reference.copy()
    rows = scrambled.obs_names.get_indexer(test.obs_names)
    X = scrambled.X.tolil()
    X[rows] = reference.X[np.random.default_rng(0).permutation(reference.n_obs)[:len(rows)]]
    scrambled.X = X.tocsr()
    again = cc.fit_annotator(scrambled, "cell_type", **kw)
    assert again.chosen == first.chosen
    pd.testing.assert_frame_equal(again.scores, first.scores)
    assert again.test_metrics["test_macro_f1"] != first.test_metrics["test_macro_f1"]  # only the report moved


def test_chains_are_named_or_all():
    assert parse_chains("lr, scdae+mlp") == ["lr", "scdae+mlp"]
    assert len(parse_chains("all")) == 12
    with pytest.raises(cc.InputError, match="unknown chain lr\\+foo"):
        parse_chains("lr+foo")


def test_bad_references_are_refused_in_one_line(reference, tmp_path, capsys):
    one_type = reference.copy()
    one_type.obs["cell_type"] = "T cell"
    path = tmp_path / "one.h5ad"
    one_type.write_h5ad(path)
    out = tmp_path / "a.onnx"
    assert main(["fit", "--reference", str(path), "--out", str(out), "--chains", "lr"]) == 2
    assert "at least 2 cell types" in capsys.readouterr().err
    tiny = reference[:0].copy()
    singletons = reference[[0, 400, 800]].copy()
    singletons.obs["cell_type"] = pd.Categorical(["a", "b", "c"])
    singletons.write_h5ad(path)
    assert main(["fit", "--reference", str(path), "--out", str(out)]) == 2
    assert main(["fit", "--reference", str(path), "--out", str(out), "--chains", "lr,nope"]) == 2
    assert main(["fit", "--reference", str(path), "--out", str(out), "--label-key", "nope"]) == 2
    assert not out.exists() and tiny.n_obs == 0


def test_kept_candidates_are_each_chain_as_its_own_fit_would_export_it(small_atlas, monkeypatch):
    reference = small_atlas[::2].copy()  # both individuals: grouped validation, then refits on every cell
    kw = {"params": FAST, "batch_key": "individual", "experiment": None, "ensemble": False}
    alone = cc.fit_annotator(reference, "cell_type", chains="lr", **kw)
    assert alone.candidates == {}  # only when asked
    # lr+mlp chosen: its --flag-unseen energy is lr's refit, which is then the kept lr, not a second one
    monkeypatch.setattr(fit_annotator, "choose", lambda found, folds: "lr+mlp")
    refits, refit = [], fit_candidates.refit_on_every_cell
    monkeypatch.setattr(fit_candidates, "refit_on_every_cell", lambda ref, grouped, name, **o: (
        refits.append(name), refit(ref, grouped, name, **o))[1])
    both = cc.fit_annotator(reference, "cell_type", chains="lr,lr+mlp", keep_candidates=True, **kw)
    assert set(both.candidates) == {"lr", "lr+mlp"} and both.candidates["lr+mlp"] is both.chain
    assert sorted(refits) == ["lr", "lr+mlp"]
    np.testing.assert_allclose(both.candidates["lr"].predict_proba(reference[:300]),
                               alone.chain.predict_proba(reference[:300]), atol=1e-5)
