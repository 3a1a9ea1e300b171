"""The ensemble chain: weights on validation, offered and chosen like a chain, one ONNX graph
equal to torch; and the paired choice on folds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import cellcontrast as cc
from cellcontrast.data.simulate import simulate_atlas
from cellcontrast.experiments.fit_candidates import ENERGY_SOURCE
from cellcontrast.model.ensemble import (
    ENSEMBLE,
    best_weight,
    candidate,
    ensemble_chain,
    with_energy_of,
)
from cellcontrast.model.grouped import choose_on_folds

FAST = {"lr": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]}, "svm": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]},
        "scdae": {"n_hvg": 60, "encoder_dims": [48, 24, 12], "classifier_dims": [12, 12], "ae_epochs": 1,
                  "classifier_epochs": 8, "finetune_epochs": 1, "min_steps": 0}}


@pytest.fixture(scope="module")
def reference():
    return simulate_atlas(n_cells=900, n_types=6, n_genes=120, n_individuals=3, seed=4)


def test_the_weight_is_the_one_validation_prefers():
    y = np.array([0, 1, 0, 1])
    right = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    wrong = right[:, ::-1]
    assert best_weight(right, wrong, y) == 1.0 and best_weight(wrong, right, y) == 0.0
    # one right on half the cells each: the mixture beats both
    a = np.array([[0.9, 0.1], [0.1, 0.9], [0.45, 0.55], [0.55, 0.45]])
    b = np.array([[0.55, 0.45], [0.45, 0.55], [0.9, 0.1], [0.1, 0.9]])
    assert 0.0 < best_weight(a, b, y) < 1.0


def test_no_ensemble_when_one_member_takes_all_the_weight():
    y = np.array([0, 1, 0, 1])
    right = np.array([[0.9, 0.1], [0.1, 0.9], [0.9, 0.1], [0.1, 0.9]])
    scores = pd.DataFrame({"chain": ["lr", "svm"], "val_macro_f1": [1.0, 0.0]})
    assert candidate(scores, {"lr": right, "svm": right[:, ::-1]}, y, 2) is None


def test_the_ensemble_exports_to_one_onnx_graph_equal_to_torch(reference, tmp_path):
    members = [cc.fit(reference, "cell_type", base=base, params=FAST) for base in ("lr", "scdae")]
    chain = ensemble_chain(members, [0.3, 0.7], ["lr", "scdae"], {"val_macro_f1": 0.5})
    counts = reference.X[:64].toarray()
    with torch.no_grad():
        mixed = chain.module(torch.as_tensor(counts, dtype=torch.float32)).numpy()
    separate = 0.3 * members[0].predict_proba(reference[:64]) + 0.7 * members[1].predict_proba(reference[:64])
    np.testing.assert_allclose(mixed, separate, atol=1e-6)
    path = chain.export(tmp_path / "e.onnx")
    annotator = cc.Annotator.load(path)
    np.testing.assert_allclose(annotator.predict_proba(counts), mixed, atol=1e-5)
    assert annotator.metadata["base"] == ENSEMBLE and "energy" in annotator.novelty_scores
    with pytest.raises(cc.InputError, match="kept as its ONNX file"):
        chain.save(tmp_path / "folder")


def test_the_energy_comes_from_another_chain_while_the_rest_stays_the_chosen_ones(reference, tmp_path):
    svm, lr = (cc.fit(reference, "cell_type", base=base, params=FAST) for base in ("svm", "lr"))
    chain = with_energy_of(svm, lr, "lr")
    x = torch.as_tensor(reference.X[:64].toarray(), dtype=torch.float32)
    t = lr.module.temperature
    with torch.no_grad():
        assert torch.equal(chain.module(x), svm.module(x))
        assert torch.equal(chain.module.logits(x), svm.module.logits(x))  # the attribution's
        lr_energy = (-t * torch.logsumexp(lr.module.logits(x) / t, dim=-1)).numpy()
        np.testing.assert_allclose(chain.module.energy(x).numpy(), lr_energy, rtol=1e-6)
    assert chain.metrics["val_energy_q95"] == lr.metrics["val_energy_q95"] != svm.metrics["val_energy_q95"]
    assert chain.metrics["val_macro_f1"] == svm.metrics["val_macro_f1"] and chain.config["energy_from"] == "lr"
    annotator = cc.Annotator.load(chain.export(tmp_path / "svm.onnx"))
    probs, energy = annotator.predict(x.numpy(), "energy")
    np.testing.assert_allclose(probs, svm.predict_proba(reference[:64]), atol=1e-5)
    np.testing.assert_allclose(energy, lr_energy, atol=1e-4)
    assert annotator.metadata["base"] == "svm"
    component = cc.fit(reference, "cell_type", base="lr", component="mlp", params={**FAST, "mlp": {"max_epochs": 2}})
    assert with_energy_of(component, lr, "lr").module.energy_weights.tolist() == [0.0, 1.0]
        # an ensemble keeps its weights; LR joins it for the energy only
    mixed = ensemble_chain([svm, lr], [0.4, 0.6], ["svm", "scdae"], {"val_energy_q95": 0.0})
    joined = with_energy_of(mixed, lr, "lr")
    assert joined.module.weights.tolist() == pytest.approx([0.4, 0.6, 0.0])
    assert joined.module.energy_weights.tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize("batch_key", [None, "individual"])
def test_fit_reads_the_energy_of_its_lr_candidate_whatever_it_chooses(reference, batch_key):
    weak_lr = {**FAST, "lr": {**FAST["lr"], "l2_path": [30.0]}}  # so that svm is chosen
    result = cc.fit_annotator(reference, "cell_type", chains="lr,svm", params=weak_lr, experiment=None,
                              ensemble=False, batch_key=batch_key)
    assert result.chosen == "svm" and result.chain.config["energy_from"] == ENERGY_SOURCE == "lr"
    lr_row = result.scores.set_index("chain").loc["lr"]
    if batch_key is None:  # the split's LR, its validation quantile
        assert result.chain.metrics["val_energy_q95"] == lr_row["val_energy_q95"]
    assert result.chain.metrics["val_energy_q95"] != result.scores.set_index("chain").loc["svm", "val_energy_q95"]
    alone = cc.fit_annotator(reference, "cell_type", chains="svm", params=FAST, experiment=None)
    assert "energy_from" not in alone.chain.config


def test_fit_offers_the_ensemble_and_chooses_it_by_the_same_rule(reference):
    result = cc.fit_annotator(reference, "cell_type", chains="lr,scdae", params=FAST, experiment=None)
    names = result.scores["chain"].tolist()
    assert names[:2] == ["lr", "scdae"]
    if ENSEMBLE in names:  # offered unless one member takes every weight
        row = result.scores.set_index("chain").loc[ENSEMBLE]
        assert 0.0 <= row["val_macro_f1"] <= 1.0 and row["val_macro_f1_se"] >= 0
    alone = cc.fit_annotator(reference, "cell_type", chains="lr,scdae", params=FAST, experiment=None,
                             ensemble=False)
    assert ENSEMBLE not in alone.scores["chain"].tolist()


def test_the_paired_choice_sees_a_consistent_gap_that_the_spread_of_folds_hides():
    # folds of very different difficulty; svm better by 0.02 on every fold
    folds = pd.DataFrame({"held_out": ["a", "b", "c"] * 2, "chain": ["lr"] * 3 + ["svm"] * 3,
                          "val_macro_f1": [0.60, 0.80, 0.95, 0.62, 0.82, 0.97]})
    chosen, gap_se = choose_on_folds(folds, ["lr", "svm"])
    assert chosen == "svm" and gap_se["lr"] == pytest.approx(0.0)
    # a gap that changes sign across folds is noise: the simpler chain stays
    noisy = folds.assign(val_macro_f1=[0.60, 0.84, 0.95, 0.64, 0.80, 0.97])
    assert choose_on_folds(noisy, ["lr", "svm"])[0] == "lr"
