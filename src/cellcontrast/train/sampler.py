"""Class-aware batch sampler for supervised contrastive training.

With many classes and a modest batch (50 classes, batch 128) a random batch leaves many
anchors without a positive, and those anchors contribute nothing to the contrastive loss.
:class:`ClassAwareBatchSampler` builds batches out of groups of ``samples_per_class`` cells of
one class, so that (almost) every anchor has a positive in its batch.

One epoch:

1. every class's indices are shuffled into a per-class pool and cut into groups of
   ``samples_per_class`` (``ceil(n_c / samples_per_class)`` groups, so a class is drawn in
   proportion to its size and each cell is visited about once per epoch). The last, short
   group of a class is topped up from its refilled pool (rare cells are re-used: intended);
   a class with a single cell contributes it alone;
2. the groups (i.e. the classes) are put into a shuffled order and packed into batches of
   ``batch_size``; a group that does not fit is split across two batches, never leaving a lone
   cell of a class behind when the class has another cell to pair it with;
3. ``ceil(n / batch_size)`` batches are emitted (``n // batch_size`` with ``drop_last``).

With ``balanced``, every class gets the same number of groups (``ceil(n / (C x
samples_per_class))``) instead of a number in proportion to its size: rare classes are drawn
as often as common ones, re-using their cells, and common ones are subsampled each epoch.

Deterministic for ``seed``; successive ``iter()`` calls (epochs) differ and are reproducible,
epoch ``e`` depending only on ``(seed, e)`` (see :meth:`ClassAwareBatchSampler.set_epoch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["ClassAwareBatchSampler", "ClassPool"]


class ClassPool:
    """Shuffled pool of one class's indices, refilled with a new permutation when exhausted."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator) -> None:
        self.indices = indices
        self.rng = rng
        self.perm = rng.permutation(indices)
        self.pos = 0

    def take(self, k: int, exclude: set[int] | frozenset[int] = frozenset()) -> list[int]:
        """Up to ``k`` distinct indices, none in ``exclude``, without replacement."""
        out: list[int] = []
        k = min(k, len(self.indices))
        budget = 2 * len(self.indices) + k  # enough to see every index at least once more
        while len(out) < k and budget > 0:
            if self.pos == len(self.perm):
                self.perm = self.rng.permutation(self.indices)
                self.pos = 0
            value = int(self.perm[self.pos])
            self.pos += 1
            budget -= 1
            if value not in exclude and value not in out:
                out.append(value)
        return out


class ClassAwareBatchSampler(Sampler[list[int]]):
    """Yields batches (lists of indices) made of groups of same-class samples.

    Args:
        labels: ``[n]`` integer class labels.
        batch_size: the largest batch size (every batch but possibly the last is full).
        samples_per_class: cells of one class placed together in a batch.
        seed: seed; epoch ``e`` is drawn from ``numpy.random.default_rng([seed, e])``.
        drop_last: emit ``n // batch_size`` full batches instead of ``ceil(n / batch_size)``.
        balanced: draw every class equally often (see the module docstring).
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        samples_per_class: int = 4,
        seed: int = 0,
        drop_last: bool = False,
        balanced: bool = False,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(samples_per_class) < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        self.labels = labels
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.balanced = bool(balanced)
        self.epoch = 0
        classes, inverse = np.unique(labels, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse, minlength=len(classes)))[:-1]
        self._class_indices = [part.astype(np.int64) for part in np.split(order, bounds)]
        if len(labels) == 0:
            self._class_indices = []

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch`` (then ``epoch + 1``, ...)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.labels)
        if self.drop_last:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches(self.epoch)
        self.epoch += 1
        yield from batches

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        n_batches = len(self)
        if n_batches == 0:
            return []
        rng = np.random.default_rng([self.seed, epoch])
        spc = self.samples_per_class
        pools = [ClassPool(idx, rng) for idx in self._class_indices]

        # 1. groups of one class each; the pool's first pass covers every cell once.
        groups: list[tuple[int, list[int]]] = []
        per_class = math.ceil(len(self.labels) / (max(len(self._class_indices), 1) * spc))
        for c, idx in enumerate(self._class_indices):
            size = min(spc, len(idx))
            for _ in range(per_class if self.balanced else math.ceil(len(idx) / spc)):
                groups.append((c, pools[c].take(size)))

        # 2. shuffled order, packed into batches.
        batches: list[list[int]] = []
        current: list[int] = []
        in_current: set[int] = set()
        count: dict[int, int] = {}  # class -> cells of it in the current batch

        def add(c: int, members: list[int]) -> None:
            current.extend(members)
            in_current.update(members)
            count[c] = count.get(c, 0) + len(members)

        def close() -> None:
            batches.append(list(current))
            current.clear()
            in_current.clear()
            count.clear()

        for g in rng.permutation(len(groups)):
            c, members = groups[g]
            while members and len(batches) < n_batches:
                # topped-up groups may repeat cells already in this batch: never twice
                members = [m for m in members if m not in in_current]
                if len(members) == 1 and c not in count and len(self._class_indices[c]) > 1:
                    # a lone cell of its class here: pair it with another one
                    members = members + pools[c].take(1, in_current | set(members))
                if not members:
                    break
                room = self.batch_size - len(current)
                if len(members) <= room:
                    add(c, members)
                    members = []
                elif room == 1 and len(members) > 1:
                    # A lone cell of class c would have no positive: give the slot to an
                    # extra cell of a class already in the batch, if one has a cell to spare.
                    extra: list[int] = []
                    for other in count:
                        extra = pools[other].take(1, in_current)
                        if extra:
                            add(other, extra)
                            break
                    if not extra:
                        add(c, members[:1])
                        members = members[1:]
                else:
                    add(c, members[:room])
                    members = members[room:]
                if len(current) == self.batch_size:
                    close()
            if len(batches) == n_batches:
                break
        if current and len(batches) < n_batches:
            close()
        return batches
