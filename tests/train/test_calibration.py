"""Temperature scaling, ECE and accuracy vs coverage on synthetic predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcontrast.train.calibration import (
    coverage_metrics,
    expected_calibration_error,
    fit_temperature,
    nll,
)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _calibrated_sample(n=20000, k=6, seed=0):
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, k))
    p = _softmax(logits)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return logits, labels


def test_fit_temperature_undoes_overconfidence():
    logits, labels = _calibrated_sample()
    assert fit_temperature(logits * 3.0, labels) == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(logits * 3.0, labels) > 1.0 and fit_temperature(logits * 0.5, labels) < 1.0


def test_fitted_temperature_never_raises_the_fitting_nll():
    rng = np.random.default_rng(1)
    logits, labels = rng.normal(size=(50, 4)), rng.integers(0, 4, 50)
    t = fit_temperature(logits, labels)
    assert nll(logits, labels, t) <= nll(logits, labels, 1.0) + 1e-12


def test_ece_small_when_calibrated_large_when_overconfident():
    logits, labels = _calibrated_sample()
    assert expected_calibration_error(_softmax(logits), labels) < 0.02
    assert expected_calibration_error(_softmax(logits * 3.0), labels) > 0.1


def test_coverage_curve_is_monotone_and_starts_at_the_accuracy():
    logits, labels = _calibrated_sample(seed=2)
    proba = _softmax(logits)
    out = coverage_metrics(proba, labels, thresholds=(0.0, 0.5, 0.9))
    assert out["coverage_t00"] == 1.0
    assert out["accuracy_t00"] == pytest.approx(float((proba.argmax(1) == labels).mean()))
    assert out["coverage_t00"] >= out["coverage_t50"] >= out["coverage_t90"]
    # Calibrated confidences: keeping the confident cells raises the accuracy.
    assert out["accuracy_t90"] > out["accuracy_t50"] > out["accuracy_t00"]


def test_no_cell_kept_leaves_the_accuracy_out():
    proba = np.full((4, 4), 0.25)
    out = coverage_metrics(proba, np.zeros(4, dtype=int), thresholds=(0.9,))
    assert out == {"coverage_t90": 0.0}


def test_chain_temperature_changes_confidence_not_predictions(tiny_split):
    from cellcontrast.data.split_data import load_split_data
    from cellcontrast.nn.chain import load_chain, predict_logits, predict_proba, save_chain
    from cellcontrast.train.base_model import fit_base
    from cellcontrast.train.chain import build_chain

    data = load_split_data(tiny_split)
    base = fit_base(data.X["train"], data.y["train"], data.X["val"], data.y["val"], len(data.classes),
                    "lr", {"epochs": 3}, 0, None)
    chain = build_chain(base)
    before = predict_proba(chain, data.X["test"])
    chain.temperature.fill_(2.0)
    after = predict_proba(chain, data.X["test"])
    np.testing.assert_array_equal(before.argmax(1), after.argmax(1))
    assert after.max(1).mean() < before.max(1).mean()
    z = predict_logits(chain, data.X["test"])
    np.testing.assert_allclose(after, torch.softmax(torch.as_tensor(z) / 2.0, -1).numpy(), atol=1e-6)
    loaded, _ = load_chain(save_chain(chain, {"genes": data.genes, "class_names": data.classes},
                                      tiny_split.parent / "calibrated_chain"))
    np.testing.assert_allclose(predict_proba(loaded, data.X["test"]), after, atol=1e-6)
