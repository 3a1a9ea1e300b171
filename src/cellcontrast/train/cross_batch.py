"""Minibatches for cross-batch positives: cells of one type from two of the reference's
batches side by side, so that the contrastive loss (``groups``: positives from other batches
only) has pairs that differ in donor, depth or study and agree in type.

Each epoch, every type's cells are cut into blocks of ``samples_per_class`` (``ceil(n_c /
samples_per_class)`` blocks, as `ClassAwareBatchSampler` does): a type found in two or more
batches gets blocks of half from one batch and half from another (the two drawn in proportion to
their cells, without replacement from per-batch pools that refill); a type of one batch only
gets blocks from it (its cells are negatives of the others, never anchors with a positive).
Blocks are shuffled and dealt to ``ceil(n / batch_size)`` minibatches, the two-batch blocks
first, one per minibatch in turn, so that every minibatch holds two batches whenever there are
enough such blocks. Same seed and epoch, same minibatches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from cellcontrast.train.sampler import ClassPool


class CrossBatchSampler:
    """Yields minibatches (lists of cell indices) of same-type blocks drawn across batches.

    Args:
        labels: ``[n]`` integer types.
        groups: ``[n]`` integer batches (donors, studies).
        batch_size: the target minibatch size.
        samples_per_class: cells of one type placed together (split over two batches).
        seed: epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e])``.
    """

    def __init__(self, labels: np.ndarray, groups: np.ndarray, batch_size: int, samples_per_class: int = 4,
                 seed: int = 0) -> None:
        self.labels, self.groups = np.asarray(labels), np.asarray(groups)
        if self.labels.shape != self.groups.shape or self.labels.ndim != 1:
            raise ValueError("labels and groups must be 1-D and of the same length")
        if int(batch_size) < 2 or int(samples_per_class) < 2:
            raise ValueError("batch_size and samples_per_class must be at least 2 for cross-batch pairs")
        self.batch_size, self.samples_per_class, self.seed, self.epoch = int(batch_size), int(samples_per_class), \
            int(seed), 0
        self._members = {int(c): {int(g): np.flatnonzero((self.labels == c) & (self.groups == g))
                                  for g in np.unique(self.groups[self.labels == c])}
                         for c in np.unique(self.labels)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        self.epoch += 1
        yield from batches

    def _blocks(self, rng: np.random.Generator) -> tuple[list[list[int]], list[list[int]]]:
        """(blocks spanning two batches, blocks of one batch)."""
        spc, crossing, single = self.samples_per_class, [], []
        for by_group in self._members.values():
            pools = {g: ClassPool(idx, rng) for g, idx in by_group.items()}
            names = list(pools)
            sizes = np.array([len(by_group[g]) for g in names], dtype=float)
            for _ in range(math.ceil(sizes.sum() / spc)):
                if len(names) >= 2:
                    first, second = rng.choice(len(names), 2, replace=False, p=sizes / sizes.sum())
                    half = spc // 2
                    crossing.append(pools[names[first]].take(half) + pools[names[second]].take(spc - half))
                else:
                    single.append(pools[names[0]].take(spc))
        return crossing, single

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if len(self.labels) == 0:
            return []
        rng = np.random.default_rng([self.seed, epoch])
        crossing, single = self._blocks(rng)
        order = [crossing[i] for i in rng.permutation(len(crossing))] + [single[i] for i in rng.permutation(len(single))]
        batches: list[list[int]] = [[] for _ in range(len(self))]
        for i, block in enumerate(order[:len(batches)]):  # a two-batch block first in each, while they last
            batches[i].extend(block)
        for block in order[len(batches):]:  # the rest to the emptiest minibatch
            min(batches, key=len).extend(block)
        return [b for b in batches if b]
