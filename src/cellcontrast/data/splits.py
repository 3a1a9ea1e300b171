"""The paper's settings and splits (section 4.1).

Take the K most frequent cell types; downsample every one at random to the same count
n = min(count of the K-th type, cap) (or keep every cell up to `cap` when `equalize` is off,
the `natural` setting); split each type 80/10/10 into train/val/test. One seed gives one
downsample and one split.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError, notes_held
from cellcontrast.core.files import atomic_path
from cellcontrast.core.fingerprint import file_sha256
from cellcontrast.core.names import LABEL
from cellcontrast.core.params import load_params, setting_params
from cellcontrast.data.atlas import read_atlas
from cellcontrast.data.heldout import batch_values, make_heldout_split

PARTS = ("train", "val", "test")
# What training and tuning read from split.json.
SPLIT_KEYS = ("setting", "k", "n_per_type", "seed", "n_cells", "classes", "source")


@dataclass
class Split:
    indices: dict[str, np.ndarray]  # part -> row indices into the atlas
    classes: list[str]  # the K types, most frequent first
    n_per_type: dict[str, int]  # type -> cells sampled (before the 80/10/10 split)


def part_sizes(n: int, fractions) -> tuple[int, int, int]:
    """Cells of one type in train/val/test: val and test rounded, train the rest."""
    n_val = int(round(n * fractions[1]))
    n_test = int(round(n * fractions[2]))
    return n - n_val - n_test, n_val, n_test


def least_cells(fractions) -> int:
    """The fewest cells of a type that `part_sizes` splits with one cell in every part."""
    return next(n for n in range(3, 10_000) if min(part_sizes(n, fractions)) >= 1)


def make_split(
    labels: pd.Series | np.ndarray,
    k: int,
    cap: int,
    seed: int,
    fractions=(0.8, 0.1, 0.1),
    equalize: bool = True,
    exclude: np.ndarray | None = None,
) -> Split:
    """Choose the top-K types, downsample and split them; returns row indices per part.

    ``exclude`` (row indices) are never drawn: the types and their counts are still chosen on
    every cell, and a type with fewer free cells than its count keeps the free ones; a type
    with too few free cells to split is left out, with one note (the tuning split of a small
    dataset: its hyperparameters are then chosen on the other types).
    """
    if abs(sum(fractions) - 1.0) > 1e-6 or len(fractions) != 3 or min(fractions) <= 0:
        raise InputError(f"split fractions {list(fractions)} must be three positive numbers summing to 1")
    labels = pd.Series(np.asarray(labels).astype(str))
    counts = labels.value_counts()
    # Ties in abundance are broken by name, so the choice of types never depends on file order.
    order = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if k > len(order):
        print(f"warning: K={k} but the atlas has {len(order)} types; using all {len(order)}", file=sys.stderr)
        k = len(order)
    chosen = order[:k]
    kth_count = chosen[-1][1]
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {p: [] for p in PARTS}
    n_per_type = {}
    free = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        free[np.asarray(exclude, dtype=np.int64)] = False
    left_out = []
    for name, count in chosen:
        members = np.flatnonzero((labels.to_numpy() == name) & free)
        n = min(kth_count if equalize else count, cap, members.size)
        sizes = part_sizes(n, fractions)
        if min(sizes) < 1 and exclude is not None:
            left_out.append(f"{name} ({members.size} free cells)")
            continue
        if min(sizes) < 1:
            raise InputError(
                f"type {name!r} would get {n} cells, too few to split {list(fractions)} "
                f"(needs at least {least_cells(fractions)} for one cell in each part); lower K"
            )
        sample = rng.choice(members, size=n, replace=False)
        start = 0
        for part, size in zip(PARTS, sizes, strict=True):
            parts[part].append(sample[start : start + size])
            start += size
        n_per_type[name] = n
    if left_out:
        if len(n_per_type) < 2:
            raise InputError(f"too few cells outside the evaluated seeds' test parts to draw a tuning split "
                             f"of 2 or more types (left out: {', '.join(left_out)}); lower K or use fewer seeds")
        print(f"note: the tuning split leaves out {len(left_out)} types with too few cells outside the "
              f"evaluated seeds' test parts: {', '.join(left_out)}", file=sys.stderr)
    indices = {p: np.sort(np.concatenate(parts[p])) for p in PARTS}
    return Split(indices=indices, classes=[name for name, _ in chosen if name in n_per_type], n_per_type=n_per_type)


def make_tuning_split(labels, k: int, cap: int, seeds, fractions=(0.8, 0.1, 0.1), equalize: bool = True,
                      seed: int = 0) -> Split:
    """The split that tuning (and nothing else) reads: the setting's types, drawn only from cells
    that are in no evaluated seed's test part. Seeds redraw from one atlas, so any one seed's
    validation cells sit in the other seeds' test sets; tuning on this split instead means that
    no parameter is chosen on a cell that any seed is scored on."""
    tests = [make_split(labels, k, cap, s, fractions, equalize).indices["test"] for s in seeds]
    if not tests:
        raise InputError("a tuning split needs the evaluated seeds (params.yaml `seeds`)")
    return make_split(labels, k, cap, seed, fractions, equalize, exclude=np.concatenate(tests))


def split_atlas_to_dir(
    atlas: str | Path,
    setting: str,
    seed: int,
    out_dir: str | Path,
    params_path: str | Path = "params.yaml",
    label_key: str = LABEL,
    layer: str | None = None,
    filters: dict[str, str] | None = None,
    settings: dict | None = None,
    batch_key: str | None = None,
    holdout: str | None = None,
    tuning_for: list[int] | None = None,
    unseen_types: int = 0,
) -> dict:
    """Write train/val/test.h5ad and split.json for one setting and seed; returns split.json.

    A held-out-batch setting (``batch_key``) holds out ``holdout``, or, without it, fold
    ``seed``: the seed-th batch in sorted order (folds take the place of seeds). With
    ``tuning_for`` (the evaluated seeds), the tuning split: no cell of those seeds' test parts.
    ``unseen_types`` types (drawn with the seed) are removed from train and validation but keep
    their test cells, labelled with their own names (split.json ``unseen_types``).
    """
    s = setting_params(settings if settings is not None else load_params(params_path), setting, batch_key)
    if tuning_for is not None and s["heldout"]:
        raise InputError("--tuning is for random-split settings; a held-out-batch fold is tuned on its own split")
    # The reader's notes and the split's warning are held until the split is drawn: a refusal
    # (values, labels, a type too small to split) is then the only line on stderr.
    with notes_held():
        adata = read_atlas(atlas, label_key=label_key, layer=layer, filters=filters)
        indices, classes, extra = _draw(adata, s, seed, holdout, tuning_for)
        indices, classes, unseen = remove_unseen_types(adata.obs[LABEL], indices, classes, unseen_types, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for part in PARTS:
        sub = adata[indices[part]]
        part_data = ad.AnnData(X=sub.X.copy(), obs=sub.obs.copy(), var=sub.var.copy())
        # The same category order in every part, so label codes agree across train/val/test.
        part_data.obs[LABEL] = pd.Categorical(part_data.obs[LABEL].astype(str),
                                              categories=classes + (unseen if part == "test" else []))
        part_data.obs = part_data.obs.loc[:, [LABEL] + [c for c in part_data.obs.columns if c != LABEL]]
        with atomic_path(out_dir / f"{part}.h5ad") as tmp:
            part_data.write_h5ad(tmp)
    info = {
        "setting": setting, "k": len(classes), **extra, "seed": seed, **({"unseen_types": unseen} if unseen else {}),
        "n_cells": {p: int(indices[p].size) for p in PARTS}, "classes": classes,
        "source": {"path": str(atlas), "sha256": file_sha256(atlas), "label_key": label_key, "layer": layer,
                   "filters": filters or {}, "n_genes": int(adata.n_vars)},
    }
    with atomic_path(out_dir / "split.json") as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n")
    return info


def remove_unseen_types(labels: pd.Series, indices: dict, classes: list[str], n: int,
                        seed: int) -> tuple[dict, list[str], list[str]]:
    """Draw ``n`` of the classes (seeded) and drop their cells from train and validation; their
    test cells stay. Returns (indices, the classes left, the unseen types in class order)."""
    if n == 0:
        return indices, classes, []
    if n < 0 or len(classes) - n < 2:
        raise InputError(f"--unseen-types {n} would leave {len(classes) - n} of the split's {len(classes)} types "
                         "to train on; it must leave at least two")
    drawn = set(np.random.default_rng([seed, 104729]).choice(len(classes), size=n, replace=False).tolist())
    unseen = [c for i, c in enumerate(classes) if i in drawn]
    values = labels.astype(str).to_numpy()
    kept = {part: rows[~np.isin(values[rows], unseen)] if part != "test" else rows for part, rows in indices.items()}
    return kept, [c for c in classes if c not in unseen], unseen


def _draw(adata: ad.AnnData, s: dict, seed: int, holdout: str | None,
          tuning_for: list[int] | None = None) -> tuple[dict, list[str], dict]:
    """The parts' rows, the classes and what split.json records of the draw (``tuning_for``: the
    tuning split of those evaluated seeds)."""
    if s["heldout"]:
        batches = batch_values(adata.obs, s["batch_key"])
        names = sorted(set(batches))
        if holdout is None:
            if not 0 <= seed < len(names):
                raise InputError(f"fold {seed} does not exist: {s['batch_key']!r} has {len(names)} batches "
                                 f"({', '.join(names)}); pass --holdout or a seed below {len(names)}")
            holdout = names[seed]
        split = make_heldout_split(adata.obs[LABEL], batches, holdout, s["min_cells"], s["val_fraction"],
                                   s["cap"], seed)
        return split.indices, split.classes, {
            "heldout": True, "batch_key": s["batch_key"], "holdout": split.holdout, "batches": split.batches,
            "dropped_types": split.dropped, "min_cells": s["min_cells"], "cap": s["cap"],
            "val_fraction": s["val_fraction"], "k_requested": None, "equalize": False, "n_per_type": None}
    if holdout is not None:
        raise InputError("--holdout is for a setting that leaves one batch out (e.g. heldout)")
    tuning = {}
    if tuning_for is not None:
        tuning_for = [int(x) for x in tuning_for]
        split = make_tuning_split(adata.obs[LABEL], s["k"], s["cap"], tuning_for, s["fractions"], s["equalize"], seed)
        tuning = {"tuning": True, "excludes_test_of_seeds": tuning_for}
    else:
        split = make_split(adata.obs[LABEL], s["k"], s["cap"], seed, s["fractions"], s["equalize"])
    return split.indices, split.classes, {**tuning,
        "k_requested": s["k"], "cap": s["cap"], "equalize": bool(s["equalize"]),
        "fractions": list(s["fractions"]),
        "n_per_type": min(split.n_per_type.values()) if s["equalize"] else None,
        "n_per_type_by_class": split.n_per_type}


def read_split(split_dir: str | Path, parts=PARTS) -> tuple[dict, dict[str, ad.AnnData]]:
    """Load split.json and the requested parts of a split folder."""
    from cellcontrast.data.atlas import open_h5ad

    split_dir = Path(split_dir)
    meta = split_dir / "split.json"
    if not meta.exists():
        raise InputError(f"{split_dir} is not a split folder (no split.json); make one with `cellcontrast split`")
    try:
        info = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{meta} is damaged (not JSON); rebuild the split with `cellcontrast split`") from None
    missing = [key for key in SPLIT_KEYS if key not in info] if isinstance(info, dict) else list(SPLIT_KEYS)
    if missing:
        raise InputError(f"{meta} lacks {', '.join(missing)}; rebuild the split with `cellcontrast split`")
    return info, {p: open_h5ad(split_dir / f"{p}.h5ad") for p in parts}


def write_holdout_query(atlas: str | Path, split_dir: str | Path, out: str | Path,
                        max_cells: int | None = None, seed: int = 0) -> int:
    """Write the atlas cells of the split's types that the split left out: a query that no
    model trained on this split has seen, with its true labels. Returns the number of cells."""
    info, parts = read_split(split_dir)
    used = set()
    for part in parts.values():
        used.update(part.obs_names)
    src = info["source"]
    with notes_held():  # a refusal below is the only line
        adata = read_atlas(atlas, label_key=src["label_key"], layer=src["layer"], filters=src["filters"])
        keep = adata.obs[LABEL].astype(str).isin(info["classes"]).to_numpy() & ~adata.obs_names.isin(list(used))
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            raise InputError(f"every cell of the split's types in {atlas} is in the split; no held-out query is left")
    if max_cells and rows.size > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_cells, replace=False))
    query = adata[rows].copy()
    with atomic_path(out) as tmp:
        query.write_h5ad(tmp)
    print(f"wrote {out}: {query.n_obs} held-out cells of {len(info['classes'])} types", file=sys.stderr)
    return int(query.n_obs)
