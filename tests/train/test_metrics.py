"""Metrics on small hand-computed examples."""

import numpy as np
import pytest

from cellcontrast.train.metrics import (
    classification_metrics,
    confusion,
    per_class_f1,
    top_k_accuracy,
)

# 4 cells, 4 classes. Ranked classes per row:
#   row 0 (true 0): 0 > 1 > 2 > 3    -> top1 hit
#   row 1 (true 1): 2 > 3 > 1 > 0    -> top1 miss, top3 hit (3rd)
#   row 2 (true 2): 0 > 1 > 3 > 2    -> top3 miss (4th)
#   row 3 (true 3): 3 > 0 > 1 > 2    -> top1 hit
PROBA = np.array([
    [0.70, 0.20, 0.07, 0.03],
    [0.05, 0.20, 0.45, 0.30],
    [0.40, 0.30, 0.10, 0.20],
    [0.30, 0.10, 0.05, 0.55],
])
Y = np.array([0, 1, 2, 3])


def test_top_k_by_hand():
    assert top_k_accuracy(Y, PROBA, 1) == pytest.approx(0.5)
    assert top_k_accuracy(Y, PROBA, 2) == pytest.approx(0.5)
    assert top_k_accuracy(Y, PROBA, 3) == pytest.approx(0.75)
    assert top_k_accuracy(Y, PROBA, 4) == pytest.approx(1.0)


def test_classification_metrics_by_hand():
    m = classification_metrics(Y, PROBA, n_classes=4)
    assert set(m) == {"top1", "top3", "macro_f1"}
    assert m["top1"] == pytest.approx(0.5)
    assert m["top3"] == pytest.approx(0.75)
    # Predictions 0, 2, 0, 3. F1 per class: class 0: P=1/2 R=1 -> 2/3; class 1: 0;
    # class 2: P=0 R=0 -> 0; class 3: 1. Macro = (2/3 + 0 + 0 + 1) / 4.
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1) / 4)


def test_macro_f1_counts_classes_absent_from_the_data():
    proba = np.eye(3)[[0, 1]]  # perfect on classes 0 and 1; class 2 never seen
    m = classification_metrics(np.array([0, 1]), proba, n_classes=3)
    assert m["top1"] == 1.0
    assert m["macro_f1"] == pytest.approx(2 / 3)


def test_top3_with_fewer_than_three_classes_is_one():
    proba = np.array([[0.9, 0.1], [0.8, 0.2]])
    assert classification_metrics(np.array([1, 1]), proba, 2)["top3"] == 1.0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        classification_metrics(Y, PROBA[:, :3], n_classes=4)


def test_per_class_f1_and_confusion():
    y_pred = PROBA.argmax(axis=1)
    table = per_class_f1(Y, y_pred, ["a", "b", "c", "d"])
    assert list(table.columns) == ["class", "f1", "precision", "recall", "support"]
    assert list(table["class"]) == ["a", "b", "c", "d"]
    np.testing.assert_allclose(table["f1"], [2 / 3, 0, 0, 1])
    np.testing.assert_allclose(table["precision"], [0.5, 0, 0, 1])
    np.testing.assert_allclose(table["recall"], [1, 0, 0, 1])
    assert list(table["support"]) == [1, 1, 1, 1]
    cm = confusion(Y, y_pred, 4)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = expected[1, 2] = expected[2, 0] = expected[3, 3] = 1
    np.testing.assert_array_equal(cm, expected)
