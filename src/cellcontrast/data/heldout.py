"""The held-out-batch setting: annotate a donor (batch, lab, study) the model never saw.

Leave one batch out: the test part is every cell of the held-out batch whose type is kept;
training and validation come from the other batches only (validation stratified by type, drawn
from the training batches), so no choice is ever made on the held-out donor. A type is kept
when the training batches of EVERY fold hold at least ``min_cells`` of its cells, so that all
folds of a benchmark share one set of types; the others are listed once, in a note.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError

PARTS = ("train", "val", "test")


@dataclass
class HeldoutSplit:
    indices: dict[str, np.ndarray]  # part -> row indices into the atlas
    classes: list[str]  # kept types, most frequent in training first
    dropped: list[str]  # types left out (too few cells in some fold's training batches)
    holdout: str  # the held-out batch
    batches: list[str]  # every batch, sorted: fold i holds out batches[i]


def batch_values(obs: pd.DataFrame, batch_key: str, where: str = "the atlas") -> np.ndarray:
    """The batch of every cell, as strings; a missing column or a single batch is refused."""
    if batch_key not in obs.columns:
        shown = ", ".join(map(str, obs.columns[:15])) or "(none)"
        raise InputError(f"no obs column {batch_key!r} in {where} (--batch-key); columns are: {shown}")
    values = obs[batch_key]
    if values.isna().any():
        raise InputError(f"{int(values.isna().sum())} cells of {where} have no {batch_key!r}; "
                         "give every cell a batch or filter them out")
    values = values.astype(str).to_numpy()
    if len(set(values)) < 2:
        raise InputError(f"--batch-key {batch_key!r} has one value ({values[0]!r}) in {where}: "
                         "leaving one batch out needs at least two")
    return values


def kept_types(labels: np.ndarray, batches: np.ndarray, min_cells: int) -> tuple[list[str], list[str]]:
    """Types with ``min_cells`` cells in the training batches of every fold (most frequent
    first, ties by name), and the dropped ones."""
    table = pd.crosstab(pd.Series(labels, name="type"), pd.Series(batches, name="batch"))
    total = table.sum(axis=1)
    worst_fold = table.rsub(total, axis=0).min(axis=1)  # the fewest training cells over folds
    order = sorted(total.index, key=lambda t: (-int(total[t]), str(t)))
    kept = [str(t) for t in order if worst_fold[t] >= min_cells]
    return kept, [str(t) for t in order if worst_fold[t] < min_cells]


def make_heldout_split(labels, batches, holdout: str, min_cells: int = 10, val_fraction: float = 0.1,
                       cap: int | None = None, seed: int = 0) -> HeldoutSplit:
    """Train/val from every batch but ``holdout``; test = ``holdout``'s cells of the kept types.

    ``cap`` bounds a type's training + validation cells (sampled, seeded); validation takes
    ``val_fraction`` of each type's training-batch cells (at least one).
    """
    labels, batches = np.asarray(labels).astype(str), np.asarray(batches).astype(str)
    names = sorted(set(batches))
    if str(holdout) not in names:
        raise InputError(f"--holdout {holdout!r} is not a batch; the batches are: {', '.join(names)}")
    if int(min_cells) < 2:
        raise InputError(f"min_cells {min_cells} must be at least 2 (a training and a validation cell)")
    if not 0.0 < float(val_fraction) < 1.0:
        raise InputError(f"val_fraction {val_fraction} must lie between 0 and 1")
    kept, dropped = kept_types(labels, batches, int(min_cells))
    if len(kept) < 2:
        raise InputError(f"only {len(kept)} cell types have {min_cells}+ cells in the training batches of "
                         "every fold; lower min_cells or use other batches")
    if dropped:
        print(f"note: {len(dropped)} types with fewer than {min_cells} cells in some fold's training batches "
              f"are left out: {', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}", file=sys.stderr)
    test = np.flatnonzero((batches == str(holdout)) & np.isin(labels, kept))
    if test.size == 0:
        raise InputError(f"the held-out batch {holdout!r} has no cell of a kept type; hold out another batch")
    rng = np.random.default_rng(seed)
    members = [rng.permutation(np.flatnonzero((batches != str(holdout)) & (labels == name)))[:cap]
               for name in kept]
    train, val = validation_split(members, val_fraction)
    return HeldoutSplit({"train": train, "val": val, "test": test}, kept, dropped, str(holdout), names)


def validation_split(members: list[np.ndarray], val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows from each type's shuffled rows: ``val_fraction`` of a type for
    validation, at least one, and at least one left for training (sorted rows)."""
    train, val = [], []
    for rows in members:
        n_val = min(len(rows) - 1, max(1, int(round(len(rows) * float(val_fraction)))))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
