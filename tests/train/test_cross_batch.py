"""Cross-batch contrastive positives: the loss never pairs an anchor with its own batch, the
sampler's minibatches hold two batches, and the same seed gives the same component."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from cellcontrast.nn.losses import supcon_loss
from cellcontrast.train.component import train_component
from cellcontrast.train.cross_batch import CrossBatchSampler


def _reference_loss(z: torch.Tensor, labels, groups, tau: float) -> float:
    """Eq. 1 written out, positives = same label, other group."""
    total, anchors = 0.0, 0
    for i in range(len(labels)):
        positives = [p for p in range(len(labels)) if p != i and labels[p] == labels[i] and groups[p] != groups[i]]
        if not positives:
            continue
        denominator = math.log(sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(len(labels)) if a != i))
        total += -sum(float(z[i] @ z[p]) / tau - denominator for p in positives) / len(positives)
        anchors += 1
    return total / anchors


def test_positives_never_come_from_the_anchors_own_batch():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(12, 5), dim=1)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 2, 2])
    groups = torch.tensor([0, 0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0])  # type 2 in one batch: no anchor
    expected = _reference_loss(z, labels.tolist(), groups.tolist(), 0.5)
    assert abs(float(supcon_loss(z, labels, 0.5, groups)) - expected) < 1e-5
    # without groups, same-batch pairs of a type are positives too: another loss
    assert abs(float(supcon_loss(z, labels, 0.5)) - float(supcon_loss(z, labels, 0.5, groups))) > 1e-4


def test_the_sampler_puts_two_batches_in_every_minibatch_and_in_every_block_it_can():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 600)
    groups = rng.integers(0, 3, 600)
    sampler = CrossBatchSampler(labels, groups, batch_size=64, samples_per_class=4, seed=1)
    batches = list(sampler)
    assert len(batches) == math.ceil(600 / 64)
    for batch in batches:
        assert len(set(groups[batch])) >= 2
        for c in set(labels[batch]):
            members = [i for i in batch if labels[i] == c]
            assert len(set(groups[members])) >= 2  # every type here spans two batches
    sampler.set_epoch(0)
    again = CrossBatchSampler(labels, groups, batch_size=64, samples_per_class=4, seed=1)
    assert list(again) == batches  # same seed, same epoch, same minibatches


def test_same_seed_same_cross_batch_component():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 300)
    groups = rng.integers(0, 2, 300)
    z = torch.randn(300, 16) + torch.nn.functional.one_hot(torch.as_tensor(y), 16).float() * 3
    params = {"max_epochs": 3, "positives": "cross_batch", "batch_size": 64}
    first, second = (train_component(z, y, z[:60], y[:60], 4, "mlp", params, seed=5, train_groups=groups)
                     for _ in range(2))
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    plain = train_component(z, y, z[:60], y[:60], 4, "mlp", {**params, "positives": "labels"}, seed=5,
                            train_groups=groups)
    assert any(not torch.equal(a, b) for a, b in zip(first.state_dict().values(), plain.state_dict().values(),
                                                     strict=True))
