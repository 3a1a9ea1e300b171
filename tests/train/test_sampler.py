"""Tests for ClassAwareBatchSampler."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellcontrast.train.sampler import ClassAwareBatchSampler


def imbalanced_labels(n_classes: int = 50, seed: int = 0) -> np.ndarray:
    """Long-tailed class sizes (150 down to 1), shuffled."""
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, (150 / np.arange(1, n_classes + 1, dtype=float)).astype(int))
    sizes[-1] = 1  # one singleton class
    labels = np.repeat(np.arange(n_classes), sizes)
    return rng.permutation(labels)


def positive_fraction(batches: list[list[int]], labels: np.ndarray) -> float:
    with_pos = total = 0
    for batch in batches:
        counts = np.bincount(labels[batch], minlength=labels.max() + 1)
        with_pos += int((counts[labels[batch]] >= 2).sum())
        total += len(batch)
    return with_pos / total


def test_deterministic_for_seed():
    y = imbalanced_labels()
    a = list(ClassAwareBatchSampler(y, 128, seed=3))
    b = list(ClassAwareBatchSampler(y, 128, seed=3))
    c = list(ClassAwareBatchSampler(y, 128, seed=4))
    assert a == b
    assert a != c


def test_epochs_differ_and_are_reproducible():
    y = imbalanced_labels()
    s = ClassAwareBatchSampler(y, 128, seed=0)
    e0, e1, e2 = list(s), list(s), list(s)
    assert e0 != e1 and e1 != e2
    t = ClassAwareBatchSampler(y, 128, seed=0)
    t.set_epoch(1)
    assert list(t) == e1
    assert list(t) == e2  # the counter moves on after set_epoch
    t.set_epoch(0)
    assert list(t) == e0


@pytest.mark.parametrize(
    "batch_size,spc,drop_last", [(128, 4, False), (50, 3, True), (7, 2, False)]
)
def test_indices_in_range_sizes_and_len(batch_size, spc, drop_last):
    y = imbalanced_labels(seed=1)
    n = len(y)
    s = ClassAwareBatchSampler(y, batch_size, samples_per_class=spc, seed=2, drop_last=drop_last)
    for _ in range(2):
        batches = list(s)
        assert len(batches) == len(s)
        expected = n // batch_size if drop_last else math.ceil(n / batch_size)
        assert len(s) == expected
        for batch in batches:
            assert 0 < len(batch) <= batch_size
            assert all(isinstance(i, int) and 0 <= i < n for i in batch)
            assert len(set(batch)) == len(batch)  # no cell twice in a batch
        if drop_last:
            assert all(len(b) == batch_size for b in batches)
        # one epoch visits about n cells
        total = sum(len(b) for b in batches)
        assert n - batch_size < total <= len(batches) * batch_size


def test_most_anchors_have_a_positive_and_beat_random():
    y = imbalanced_labels(50)
    n = len(y)
    s = ClassAwareBatchSampler(y, 128, samples_per_class=4, seed=0)
    batches = [b for _ in range(3) for b in s]
    frac = positive_fraction(batches, y)
    rng = np.random.default_rng(0)
    perm = rng.permutation(n)
    random_batches = [perm[i : i + 128].tolist() for i in range(0, n, 128)]
    frac_random = positive_fraction(random_batches, y)
    assert frac >= 0.95
    assert frac > frac_random + 0.1  # random batching leaves far more anchors alone


def test_every_sample_visited_over_a_few_epochs():
    y = imbalanced_labels(50, seed=5)
    s = ClassAwareBatchSampler(y, 128, seed=1)
    seen = np.zeros(len(y), dtype=bool)
    for _ in range(4):
        for batch in s:
            seen[batch] = True
    assert seen.all()


def test_singleton_class_and_small_inputs():
    y = np.array([0, 0, 0, 1, 2, 2])  # class 1 has a single cell
    s = ClassAwareBatchSampler(y, 4, samples_per_class=4, seed=0)
    batches = list(s)
    assert len(batches) == 2
    flat = [i for b in batches for i in b]
    assert all(0 <= i < 6 for i in flat)
    assert ClassAwareBatchSampler(np.array([5]), 8).__len__() == 1
    exact = ClassAwareBatchSampler(np.repeat(np.arange(4), 2), 4)  # n divisible by batch
    assert len(exact) == 2 and [len(b) for b in exact] == [4, 4]
    assert list(ClassAwareBatchSampler(np.array([5]), 8)) == [[0]]
    assert list(ClassAwareBatchSampler(np.array([1, 2]), 8, drop_last=True)) == []


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ClassAwareBatchSampler(np.array([0, 1]), 0)
    with pytest.raises(ValueError):
        ClassAwareBatchSampler(np.array([0, 1]), 2, samples_per_class=0)
    with pytest.raises(TypeError):
        ClassAwareBatchSampler(np.array([0.5, 1.0]), 2)


def test_balanced_batches_draw_rare_classes_as_often_as_common_ones():
    labels = np.repeat(np.arange(3), [400, 40, 8])
    drawn = {}
    for balanced in (False, True):
        s = ClassAwareBatchSampler(labels, batch_size=32, samples_per_class=4, seed=0, balanced=balanced)
        counts = np.bincount(labels[np.concatenate([np.asarray(b) for b in s])], minlength=3)
        drawn[balanced] = counts / counts.sum()
        assert 0 < len(list(s)) <= len(s)  # a rare class cannot fill batches with its few cells twice
    assert drawn[False][2] < 0.05 and drawn[True][2] > 0.15  # 8 cells: at most 8 of them a batch
