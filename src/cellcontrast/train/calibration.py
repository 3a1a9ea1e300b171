"""Calibrated confidence: temperature scaling fitted on validation, ECE, accuracy vs coverage.

`annotate` reports the highest class probability as the cell's confidence and marks cells
below ``--min-confidence`` as ``Unassigned``. That threshold means something only if the
confidence is calibrated (of the cells given 0.8, about 80% are right). Networks trained to
convergence are often over-confident (Guo et al. 2017), so every trained chain gets one
scalar temperature ``T`` on its logits, ``softmax(logits / T)``, fitted by minimising the
negative log-likelihood on the VALIDATION cells; ``T`` changes no prediction, only the
confidences. The expected calibration error (ECE) and the accuracy of the cells kept at each
confidence threshold (against the fraction kept, "coverage") are reported on test.
"""

from __future__ import annotations

import numpy as np

# Confidence thresholds at which coverage and accuracy are logged (0.0 keeps every cell).
COVERAGE_THRESHOLDS = (0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
TEMPERATURE_BOUNDS = (0.05, 20.0)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under ``softmax(logits / temperature)``."""
    logp = _log_softmax(np.asarray(logits, dtype=np.float64) / float(temperature))
    return float(-logp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in TEMPERATURE_BOUNDS that minimises the NLL of (validation) `labels`.

    One parameter, a smooth convex-in-practice objective on log T: a bounded scalar search.
    Returns 1.0 for fewer than two cells.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    if len(labels) < 2:
        return 1.0
    lo, hi = (np.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(lambda log_t: nll(logits, labels, np.exp(log_t)), bounds=(lo, hi),
                             method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(result.x))
    # Never worse than no scaling on the data it was fitted on.
    return best if nll(logits, labels, best) <= nll(logits, labels, 1.0) else 1.0


def expected_calibration_error(proba: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE: the cell-weighted mean |accuracy - mean confidence| over equal-width confidence bins."""
    proba = np.asarray(proba)
    if len(proba) == 0:
        return float("nan")
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(labels)
    bins = np.minimum((confidence * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def coverage_metrics(proba: np.ndarray, labels: np.ndarray,
                     thresholds=COVERAGE_THRESHOLDS) -> dict[str, float]:
    """For each threshold t: the fraction of cells with confidence >= t (``coverage_tNN``) and
    the accuracy among them (``accuracy_tNN``; left out where no cell is kept)."""
    proba = np.asarray(proba)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(labels)
    out = {}
    for t in thresholds:
        kept = confidence >= t
        key = f"t{round(100 * t):02d}"
        out[f"coverage_{key}"] = float(kept.mean()) if len(kept) else float("nan")
        if kept.any():
            out[f"accuracy_{key}"] = float(correct[kept].mean())
    return out
