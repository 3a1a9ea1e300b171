"""What an annotation writes: the per-cell prediction columns, the summary per label, the
metadata kept in ``uns``, and the output files (written together or not at all)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from cellcontrast.core.files import atomic_paths

UNASSIGNED = "Unassigned"
PREFIX = "cellcontrast_"
PROBABILITIES_KEY = "cellcontrast_probabilities"


def predictions_frame(
    obs_names: pd.Index, classes: list[str], top_idx: np.ndarray, top_p: np.ndarray, min_confidence: float,
    prefix: str = PREFIX, novelty: np.ndarray | None = None, novelty_threshold: float | None = None,
    novelty_name: str = "energy", flag_below: bool = False,
) -> pd.DataFrame:
    """The per-cell columns: ``{prefix}label`` (``Unassigned`` below ``min_confidence``),
    ``confidence``, ``raw_label`` (the argmax), ``top1..3`` and ``top1..3_prob``; with
    ``novelty_threshold``, the score (column ``novelty_name``: ``energy`` or ``expression``) and
    ``unfamiliar`` (score above the threshold: ``Unassigned`` too). With ``flag_below``,
    ``novelty`` is ``[cells, 2]``, the score and its p-value (column ``{novelty_name}_p``), and a
    cell is unfamiliar at a p-value at most the threshold."""
    PREFIX = prefix  # noqa: N806 - the column prefix, as in the module constant
    names = np.asarray(classes + [""], dtype=object)
    n = len(obs_names)
    conf = top_p[:, 0].astype(np.float32)
    raw = names[top_idx[:, 0]]
    keep = conf >= min_confidence
    if novelty_threshold is not None:
        score = np.asarray(novelty)
        if flag_below:  # in the p-value's own precision: one of exactly 0.05 in float32 is flagged
            unfamiliar = score[:, 1] <= score.dtype.type(novelty_threshold)
        else:
            unfamiliar = score > novelty_threshold
        keep &= ~unfamiliar
    label = np.where(keep, raw, UNASSIGNED)
    cats = list(dict.fromkeys([*classes, UNASSIGNED]))
    frame = {
        f"{PREFIX}label": pd.Categorical(label, categories=cats),
        f"{PREFIX}confidence": conf,
        f"{PREFIX}raw_label": pd.Categorical(raw, categories=classes),
    }
    for j in range(3):
        if j < top_idx.shape[1]:
            frame[f"{PREFIX}top{j + 1}"] = pd.Categorical(names[top_idx[:, j]], categories=classes)
        else:  # fewer than 3 classes
            frame[f"{PREFIX}top{j + 1}"] = pd.Categorical([None] * n, categories=classes)
    for j in range(3):
        frame[f"{PREFIX}top{j + 1}_prob"] = (
            top_p[:, j].astype(np.float32) if j < top_p.shape[1] else np.zeros(n, dtype=np.float32)
        )
    if novelty_threshold is not None:
        frame[f"{PREFIX}{novelty_name}"] = (score[:, 0] if flag_below else score).astype(np.float32)
        if flag_below:
            frame[f"{PREFIX}{novelty_name}_p"] = score[:, 1].astype(np.float32)
        frame[f"{PREFIX}unfamiliar"] = unfamiliar
    return pd.DataFrame(frame, index=obs_names)


def summary_frame(pred: pd.DataFrame, prefix: str = PREFIX) -> pd.DataFrame:
    """One row per predicted label: ``n_cells``, ``fraction``, ``mean_confidence``."""
    PREFIX = prefix  # noqa: N806
    labels = pred[f"{PREFIX}label"]
    grouped = pred.groupby(labels, observed=True)[f"{PREFIX}confidence"]
    summary = pd.DataFrame({"n_cells": grouped.size(), "mean_confidence": grouped.mean()})
    summary["fraction"] = summary["n_cells"] / max(len(pred), 1)
    summary.index.name = "label"
    return summary.sort_values("n_cells", ascending=False)[["n_cells", "fraction", "mean_confidence"]]


def unique_index(obs: pd.DataFrame, say) -> pd.DataFrame:
    """``obs`` with a unique string index (joining on a duplicated one would multiply rows)."""
    import anndata

    obs.index = obs.index.astype(str)
    if obs.index.has_duplicates:
        obs.index = anndata.utils.make_index_unique(obs.index)
        say("note: the query has duplicate cell names; made unique by suffixes (-1, -2, ...)")
    return obs


def accuracy(obs: pd.DataFrame, label_key: str, pred: pd.DataFrame, classes: list[str], say) -> float | None:
    """Accuracy of the raw labels on the cells whose given label is a model class."""
    truth = obs[label_key].astype(str).to_numpy()
    known = np.isin(truth, classes)
    if not known.any():
        say(f"accuracy: no cell's obs[{label_key!r}] label is among the model's classes")
        return None
    acc = float(np.mean(pred[f"{PREFIX}raw_label"].astype(str).to_numpy()[known] == truth[known]))
    say(f"accuracy against obs[{label_key!r}]: {acc:.4f} on {int(known.sum())} of {len(obs)} cells "
        "whose label is a model class")
    return acc


def uns_safe(value):
    """Make metadata storable in .uns (no None, nested dicts of strings/numbers/arrays)."""
    if isinstance(value, dict):
        return {str(k): uns_safe(v) for k, v in value.items()}
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return np.asarray([str(v) for v in value], dtype=object)
    return value


def write_outputs(out: Path, csv: Path | None, obs: pd.DataFrame, uns: dict,
                  probabilities: np.ndarray | None, pred: pd.DataFrame) -> None:
    """The annotated ``.h5ad`` (and the CSV of ``pred``), both appearing together or neither."""
    with atomic_paths(*([out] + ([csv] if csv is not None else []))) as temps:
        write_h5ad(temps[0], obs, uns, probabilities)
        if csv is not None:
            pred.to_csv(temps[1], index_label="cell_id")


def write_h5ad(path: Path, obs: pd.DataFrame, uns: dict, probabilities: np.ndarray | None) -> None:
    """An AnnData of ``obs`` (no matrix, no genes) with the probabilities and metadata."""
    import anndata

    adata = anndata.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    if probabilities is not None:
        adata.obsm[PROBABILITIES_KEY] = probabilities
    adata.uns["cellcontrast"] = uns
    adata.write_h5ad(path)
