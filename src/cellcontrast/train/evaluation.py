"""Evaluation of a trained chain: temperature scaling fitted on validation, then the paper's
metrics, ECE and accuracy against coverage on each part given (validation, and test)."""

from __future__ import annotations

import numpy as np
import torch

from cellcontrast.nn.chain import ChainModule, predict_logits, predict_proba
from cellcontrast.train.calibration import (
    coverage_metrics,
    expected_calibration_error,
    fit_temperature,
)
from cellcontrast.train.metrics import classification_metrics, macro_f1_standard_error
from cellcontrast.train.open_set import energy, unexplained_expression


def calibrate(chain: ChainModule, X: dict, y: dict[str, np.ndarray]) -> dict:
    """Fit the chain's temperature on ``X["val"]`` (calibration.py) and set it; returns it with
    the ECE before scaling on every part."""
    logits = {part: predict_logits(chain, matrix) for part, matrix in X.items()}
    temperature = fit_temperature(logits["val"], y["val"])
    chain.temperature.fill_(temperature)
    out = {"temperature": temperature}
    for part, z in logits.items():
        proba = torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=-1).numpy()
        out[f"{part}_ece_uncalibrated"] = expected_calibration_error(proba, y[part])
    return out


def evaluate(chain: ChainModule, X: dict, y: dict[str, np.ndarray], n_classes: int) -> tuple[dict, dict]:
    """Calibrate on validation, then ``{part}_top1/top3/macro_f1/ece`` for every part, and the
    test part's accuracy against coverage. Returns (metrics, probabilities by part)."""
    metrics, proba = calibrate(chain, X, y), {}
    for part in X:
        proba[part] = predict_proba(chain, X[part])
        for key, value in classification_metrics(y[part], proba[part], n_classes).items():
            metrics[f"{part}_{key}"] = value
        metrics[f"{part}_ece"] = expected_calibration_error(proba[part], y[part])
    if "val" in X and len(proba["val"]) > 1:  # for the one-standard-error choice of chain
        metrics["val_macro_f1_se"] = macro_f1_standard_error(y["val"], proba["val"].argmax(axis=1), n_classes)
    if "test" in X:
        metrics.update({f"test_{k}": v for k, v in coverage_metrics(proba["test"], y["test"]).items()})
    if "val" in X and len(proba["val"]):
        expression = unexplained_expression(chain, X["val"]) if getattr(chain, "novelty", None) is not None else None
        metrics.update(annotate_thresholds(proba["val"], energy(predict_logits(chain, X["val"]),
                                                                float(chain.temperature)), expression))
    return metrics, proba


def annotate_thresholds(probabilities: np.ndarray, energies: np.ndarray, expression: np.ndarray | None) -> dict:
    """The thresholds `annotate` reads, from validation cells: ``--min-confidence auto`` (the top
    probability that flags 5% of them), ``--flag-unseen`` (the energy above which 5% lie) and
    ``--flag-unseen expression`` (1% above it; only where the chain has the score)."""
    out = {"val_confidence_q05": float(np.quantile(probabilities.max(axis=1), 0.05)),
           "val_energy_q95": float(np.quantile(energies, 0.95))}
    if expression is not None and expression.size:
        out["val_expression_q99"] = float(np.quantile(expression, 0.99))
    return out
