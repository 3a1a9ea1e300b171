"""Classification metrics of the paper: top-1 and top-3 accuracy, macro F1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def top_k_accuracy(y_true: np.ndarray, proba: np.ndarray, k: int) -> float:
    """Share of cells whose true class is among the k most probable.

    Ties at the k-th place are broken towards the lower class index (stable sort), so the
    result does not depend on the platform's sort.
    """
    y_true = np.asarray(y_true)
    proba = np.asarray(proba)
    if y_true.size == 0:
        return float("nan")
    k = min(k, proba.shape[1])
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float((top == y_true[:, None]).any(axis=1).mean())


def classification_metrics(y_true: np.ndarray, proba: np.ndarray, n_classes: int) -> dict:
    """``{"top1", "top3", "macro_f1"}``; macro F1 is averaged over ALL ``n_classes`` labels
    (a class never predicted and absent from ``y_true`` counts as F1 0, sklearn's rule)."""
    y_true = np.asarray(y_true, dtype=int)
    proba = np.asarray(proba)
    if proba.ndim != 2 or proba.shape[1] != n_classes or proba.shape[0] != y_true.shape[0]:
        raise ValueError(f"proba must be [{y_true.shape[0]}, {n_classes}], got {proba.shape}")
    y_pred = proba.argmax(axis=1)
    return {
        "top1": top_k_accuracy(y_true, proba, 1),
        "top3": top_k_accuracy(y_true, proba, 3),
        "macro_f1": float(f1_score(y_true, y_pred, labels=np.arange(n_classes), average="macro",
                                   zero_division=0)),
    }


def per_class_f1(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per class: class, f1, precision, recall, support (true cells of that class)."""
    labels = np.arange(len(class_names))
    precision, recall, f1, support = precision_recall_fscore_support(
        np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int), labels=labels, zero_division=0)
    return pd.DataFrame({"class": list(class_names), "f1": f1, "precision": precision,
                         "recall": recall, "support": support.astype(int)})


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` counts; rows are true classes, columns predictions."""
    return confusion_matrix(np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int),
                            labels=np.arange(n_classes))


def macro_f1_standard_error(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int, n_boot: int = 200,
                            seed: int = 0) -> float:
    """The bootstrap standard error of macro F1 over the cells (resampled with replacement,
    ``n_boot`` times, seeded): how much the score of a small validation set could move.

    The one-standard-error rule (``experiments.selection``) reads it. Classes absent from a
    resample count as F1 0, as in `classification_metrics`.
    """
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    n = y_true.size
    if n < 2:
        return float("nan")
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    truth, guess = np.eye(n_classes)[y_true], np.eye(n_classes)[y_pred]
    true_positive = weights @ (truth * guess)  # [n_boot, n_classes]
    denominator = weights @ truth + weights @ guess
    f1 = np.divide(2.0 * true_positive, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return float(f1.mean(axis=1).std(ddof=1))
