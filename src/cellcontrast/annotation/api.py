"""Annotate cells with an exported ONNX annotator, without torch: a query file streamed to a
new file (`annotate_file`, what `cellcontrast annotate` runs), or an AnnData in memory or
backed (`annotate`, for notebooks).

The query's count matrix (``X``, a named layer, or ``.raw``) is read in row chunks, so memory
stays flat however many cells it holds. Each chunk is validated (raw, non-negative, finite,
integer counts), aligned to the model's genes by name (genes the query lacks are zeros), and
run through onnxruntime.

Output of `annotate_file` (a NEW file; the query is opened read-only and never modified):

* ``obs``: the query's ``obs`` (same index, same columns) plus ``cellcontrast_label``
  (the predicted type, ``Unassigned`` below ``min_confidence``), ``cellcontrast_confidence``
  (the highest probability), ``cellcontrast_raw_label`` (the argmax before the threshold),
  ``cellcontrast_top1..3`` and ``cellcontrast_top1_prob..top3_prob``;
* ``X``: none, and ``var`` is empty: the file's shape is ``(n_cells, 0)``. The query's matrix
  is not copied (it can be tens of GB); join the predictions back with
  ``query.obs = query.obs.join(out.obs.filter(like="cellcontrast_"))``;
* ``obsm['cellcontrast_probabilities']`` (``[n_cells, n_classes]`` float32, opt-in, columns in
  the order of ``uns['cellcontrast']['classes']``; held in memory while annotating);
* ``uns['cellcontrast']``: the model's metadata, the gene overlap and the options used.

The CSV (optional) holds the same ``cellcontrast_*`` columns indexed by cell id. The files are
written atomically and together: an error found in the last chunk leaves no output behind,
and the CSV never appears without its ``.h5ad``.

This package must not import torch (nor mlflow or sklearn): it runs on the light install.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellcontrast.annotation.genes import align_genes, found_mask
from cellcontrast.annotation.model import Annotator, load_model
from cellcontrast.annotation.query import MemoryMatrix, open_query, read_elem
from cellcontrast.annotation.results import (
    PREFIX,
    UNASSIGNED,
    predictions_frame,
    summary_frame,
    uns_safe,
    write_outputs,
)
from cellcontrast.annotation.stream import (
    INFERENCE_ROWS,
    cores,
    read_ahead,
    read_chunks,
    to_model_columns,
    top3,
)
from cellcontrast.core.errors import InputError, first_line
from cellcontrast.core.version import __version__


@dataclass
class _Predicted:
    """The streamed predictions of every cell: top-3 classes and probabilities (and all)."""

    top_idx: np.ndarray
    top_p: np.ndarray
    probabilities: np.ndarray | None
    col_map: np.ndarray
    found: int
    energy: np.ndarray | None = None


# The top probability below which 5% of the chain's validation cells fall (train/evaluation.py):
# what ``min_confidence="auto"`` uses.
VALIDATION_THRESHOLD = "val_confidence_q05"
# The energy above which 5% of the chain's validation cells lie: what ``flag_unseen`` uses.
VALIDATION_ENERGY_THRESHOLD = "val_energy_q95"


def _check_options(batch_size: int, min_confidence: float | str, min_overlap: float) -> None:
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1")
    if min_confidence != "auto" and not (isinstance(min_confidence, int | float) and 0.0 <= min_confidence <= 1.0):
        raise InputError(f"--min-confidence {min_confidence} must lie between 0 and 1, or be auto")
    if not 0.0 <= min_overlap <= 1.0:
        raise InputError(f"--min-overlap {min_overlap} must lie between 0 and 1")


def _as_annotator(model, threads: int) -> Annotator:
    return model if isinstance(model, Annotator) else load_model(model, threads=threads)


def _threshold(annotator: Annotator, min_confidence: float | str) -> float:
    """``auto``: the threshold chosen on the chain's validation cells (it flags 5% of them)."""
    if min_confidence != "auto":
        return float(min_confidence)
    value = (annotator.metadata.get("metrics") or {}).get(VALIDATION_THRESHOLD)
    if value is None:
        raise InputError("--min-confidence auto needs a model exported with its validation threshold "
                         "(trained by this version or later); pass a number instead")
    return float(value)


def _energy_threshold(annotator: Annotator, flag_unseen: bool) -> float | None:
    """With ``flag_unseen``: the validation energy threshold the model carries."""
    if not flag_unseen:
        return None
    value = (annotator.metadata.get("metrics") or {}).get(VALIDATION_ENERGY_THRESHOLD)
    if annotator.energy_name is None or value is None:
        raise InputError("--flag-unseen needs a model exported with its energy output and validation "
                         "threshold (trained and exported by this version or later)")
    return float(value)


def _frame(obs_names: pd.Index, annotator: Annotator, predicted: _Predicted, min_confidence: float,
           energy_threshold: float | None, prefix: str = PREFIX) -> pd.DataFrame:
    return predictions_frame(obs_names, annotator.classes, predicted.top_idx, predicted.top_p, min_confidence,
                             prefix=prefix, energy=predicted.energy, energy_threshold=energy_threshold)


def _unassigned_note(pred: pd.DataFrame, min_confidence: float, flag_unseen: bool) -> str:
    if not (min_confidence > 0 or flag_unseen):
        return ""
    unfamiliar = f", or unfamiliar: {int(pred[f'{PREFIX}unfamiliar'].sum())} cells" if flag_unseen else ""
    n_unassigned = int((pred[f"{PREFIX}label"] == UNASSIGNED).sum())
    return f"; {n_unassigned} Unassigned (confidence < {min_confidence:g}{unfamiliar})"


def _gene_columns(var_names: pd.Index, model: Annotator, min_overlap: float, case_insensitive: bool,
                  say) -> np.ndarray:
    """Each query gene's model column (-1: unused); refuses an overlap below ``min_overlap``."""
    col_map = align_genes(var_names, model.genes, case_insensitive)
    n_model = len(model.genes)
    found = int((col_map >= 0).sum())
    frac = found / n_model
    if frac < min_overlap:
        hint = "are gene names of the same kind (symbols vs Ensembl IDs)?" + (
            "" if case_insensitive else " try --case-insensitive")
        raise InputError(f"only {found} of {n_model} model genes ({100 * frac:.1f}%) found in the query "
                         f"(need {100 * min_overlap:.0f}%, --min-overlap); {hint}")
    say(f"found {found} of {n_model} model genes ({100 * frac:.1f}%) in the query; "
        f"{n_model - found} missing genes set to 0")
    return col_map


def predict_matrix(model: Annotator, matrix, col_map: np.ndarray, batch_size: int, *,
                   probabilities: bool = False, energy: bool = False, progress: bool | None = None) -> _Predicted:
    """Stream every row of ``matrix`` (`open_query` or `MemoryMatrix`) through the model."""
    n, n_model, n_classes = matrix.n_obs, len(model.genes), len(model.classes)
    top_idx = np.zeros((n, min(3, n_classes)), dtype=np.int32)
    top_p = np.zeros(top_idx.shape, dtype=np.float32)
    probs_all = np.zeros((n, n_classes), dtype=np.float32) if probabilities else None
    energy_all = np.zeros(n, dtype=np.float32) if energy else None
    disable = (not sys.stderr.isatty()) if progress is None else (not progress)
    chunks = read_ahead(read_chunks(matrix, batch_size))
    with tqdm(total=n, unit="cells", desc="annotate", file=sys.stderr, disable=disable) as bar, \
            contextlib.closing(chunks):  # stops the reader before the file closes, even on error
        for start, chunk in chunks:
            mapped = to_model_columns(chunk, col_map, n_model, start, matrix.where, matrix.hint)
            # onnxruntime gets at most INFERENCE_ROWS rows at a time: its activations
            # (several [rows, width] tensors) stay small while reads stay large.
            for lo in range(0, mapped.n_rows, INFERENCE_ROWS):
                hi = min(lo + INFERENCE_ROWS, mapped.n_rows)
                a, b = start + lo, start + hi
                probs, cell_energy = model.predict(mapped.rows(lo, hi), energy=energy)
                if probs.shape != (b - a, n_classes):
                    raise InputError(f"the model returned shape {probs.shape} for {b - a} cells; re-export it")
                top_idx[a:b], top_p[a:b] = top3(probs)
                if probs_all is not None:
                    probs_all[a:b] = probs
                if energy_all is not None:
                    energy_all[a:b] = cell_energy
                bar.update(b - a)
    return _Predicted(top_idx, top_p, probs_all, col_map, int((col_map >= 0).sum()), energy_all)


def _metadata(model: Annotator, predicted: _Predicted, query: str, layer: str | None,
              min_confidence: float, case_insensitive: bool, energy_threshold: float | None = None) -> dict:
    """What ``uns['cellcontrast']`` records: the model, the gene overlap, the options."""
    n_model = len(model.genes)
    missing = [g for g, ok in zip(model.genes, found_mask(predicted.col_map, n_model), strict=True) if not ok]
    meta = {k: v for k, v in model.metadata.items() if k != "genes"}
    return uns_safe({
        "model": str(Path(model.path).name),
        "model_metadata": {**meta, "metrics": json.dumps(meta.get("metrics", {}))},
        "classes": model.classes, "genes_found": predicted.found, "genes_total": n_model,
        "gene_overlap": float(predicted.found / n_model), "genes_missing": missing, "query": query,
        "layer": layer or "X", "min_confidence": float(min_confidence),
        "case_insensitive": bool(case_insensitive), "cellcontrast_version": __version__,
        "flag_unseen": energy_threshold is not None,
        "energy_threshold": float("nan") if energy_threshold is None else float(energy_threshold),
    })


def _unique_index(obs: pd.DataFrame, say) -> pd.DataFrame:
    obs.index = obs.index.astype(str)
    if obs.index.has_duplicates:  # joining on a duplicated index would multiply the rows
        obs.index = anndata.utils.make_index_unique(obs.index)
        say("note: the query has duplicate cell names; made unique by suffixes (-1, -2, ...)")
    return obs


def _accuracy(obs: pd.DataFrame, label_key: str, pred: pd.DataFrame, classes: list[str], say) -> float | None:
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


def _check_paths(query_path: Path, out_path: Path, csv_path: Path | None) -> None:
    if not query_path.is_file():
        raise InputError(f"query file {query_path} does not exist; pass an .h5ad with raw counts")
    for target in [out_path] + ([csv_path] if csv_path else []):
        if target.exists() and target.resolve() == query_path.resolve():
            raise InputError(f"output {target} is the query file itself; write the annotation to a new file")
    if csv_path is not None and csv_path.resolve() == out_path.resolve():
        raise InputError("--csv and --out name the same file; give them different names")
    if not h5py.is_hdf5(query_path):
        raise InputError(f"query {query_path} is not an .h5ad (HDF5) file; convert it with anndata first")


def _read_query(f, query_path: Path, layer: str | None, pool, label_key: str | None):
    """The count matrix and obs of an open query file, both checked."""
    try:
        matrix = open_query(f, layer, pool)
        obs = read_elem(f["obs"]) if "obs" in f else None
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot read the query {query_path}: {first_line(err, 200)}") from err
    if obs is None or len(obs) != matrix.n_obs:
        raise InputError(f"the query's obs does not match its {matrix.where} ({matrix.n_obs} cells)")
    _check_not_empty(matrix)
    if label_key is not None and label_key not in obs.columns:
        raise InputError(f"--label-key {label_key!r} is not an obs column of the query "
                         f"(columns: {', '.join(map(str, obs.columns[:10])) or 'none'})")
    return matrix, obs


def _stream_file(annotator: Annotator, query_path: Path, *, layer, threads: int, label_key, min_overlap: float,
                 case_insensitive: bool, batch_size: int, probabilities: bool, energy: bool, progress, say):
    """Open the query file, check it, and stream its cells; returns (obs, predictions)."""
    try:
        query_file = h5py.File(query_path, "r")
    except OSError as err:
        raise InputError(f"cannot read the query {query_path} (truncated or damaged?): {first_line(err, 200)}") from None
    # Threads that inflate the query's gzip chunks (h5chunks) beside the annotating thread.
    pool = ThreadPoolExecutor(max_workers=threads or cores(), thread_name_prefix="cellcontrast-inflate")
    with query_file as f, pool:
        matrix, obs = _read_query(f, query_path, layer, pool, label_key)
        col_map = _gene_columns(matrix.var_names, annotator, min_overlap, case_insensitive, say)
        return obs, predict_matrix(annotator, matrix, col_map, batch_size, probabilities=probabilities,
                                   energy=energy, progress=progress)


def _check_not_empty(matrix) -> None:
    if matrix.n_obs == 0 or matrix.n_vars == 0:
        raise InputError(f"the query is empty ({matrix.n_obs} cells x {matrix.n_vars} genes); "
                         "pass an .h5ad with cells and genes")


def annotate_file(
    model: str | os.PathLike | Annotator,
    query: str | os.PathLike,
    out: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None,
    layer: str | None = None,
    batch_size: int = 8192,
    min_confidence: float | str = 0.0,
    min_overlap: float = 0.5,
    case_insensitive: bool = False,
    probabilities: bool = False,
    flag_unseen: bool = False,
    threads: int = 0,
    label_key: str | None = None,
    progress: bool | None = None,
    log=None,
) -> pd.DataFrame:
    """Annotate the cells of an ``.h5ad`` file into a new ``.h5ad`` (and CSV), streaming.

    Parameters
    ----------
    model, query, out
        The exported ``.onnx`` annotator (or an opened `Annotator`); an ``.h5ad`` file with raw
        counts; the ``.h5ad`` to write (layout in the module docstring).
    csv, layer
        Also write the predictions as CSV (the pair appears together); read counts from this
        layer, or ``"raw"`` for ``.raw`` (default ``X``).
    batch_size, threads
        Rows read at a time; onnxruntime and inflating threads (0: all cores).
    min_confidence
        Below this confidence a cell's label is ``Unassigned``; ``"auto"``: the threshold that
        flags 5% of the chain's validation cells, chosen at training.
    min_overlap, case_insensitive
        Least fraction of the model's genes the query must hold; match names ignoring case.
    probabilities
        Store every class's probability in ``obsm['cellcontrast_probabilities']``.
    flag_unseen
        Also call ``Unassigned`` the cells less familiar than 95% of the chain's validation cells
        by the energy score (columns ``cellcontrast_energy``, ``cellcontrast_unfamiliar``).
    label_key, progress, log
        An obs column of true labels (the accuracy is reported); show a progress bar (None: when
        stderr is a terminal); called with each message.

    Returns
    -------
    pandas.DataFrame
        One row per predicted label: ``n_cells``, ``fraction``, ``mean_confidence``;
        ``attrs`` holds ``n_cells``, ``genes_found``, ``genes_total`` and ``accuracy``.

    Raises
    ------
    InputError
        For every bad input (nothing is written then).
    """
    say = log if log is not None else print
    query_path, out_path, csv_path = Path(query), Path(out), (Path(csv) if csv else None)
    _check_options(batch_size, min_confidence, min_overlap)
    _check_paths(query_path, out_path, csv_path)
    annotator = _as_annotator(model, threads)
    min_confidence, energy_threshold = _threshold(annotator, min_confidence), _energy_threshold(annotator, flag_unseen)
    obs, predicted = _stream_file(annotator, query_path, layer=layer, threads=threads, label_key=label_key,
                                  min_overlap=min_overlap, case_insensitive=case_insensitive,
                                  batch_size=batch_size, probabilities=probabilities, energy=flag_unseen,
                                  progress=progress, say=say)
    obs = _unique_index(obs, say)
    pred = _frame(obs.index, annotator, predicted, min_confidence, energy_threshold)
    out_obs = obs.drop(columns=[c for c in obs.columns if c in pred.columns]).join(pred)
    uns = _metadata(annotator, predicted, query_path.name, layer, min_confidence, case_insensitive, energy_threshold)
    summary = summary_frame(pred)
    summary.attrs.update({"n_cells": len(obs), "genes_found": predicted.found, "genes_total": len(annotator.genes)})
    if label_key is not None and (acc := _accuracy(obs, label_key, pred, annotator.classes, say)) is not None:
        summary.attrs["accuracy"] = acc
    write_outputs(out_path, csv_path, out_obs, uns, predicted.probabilities, pred)
    say(f"annotated {len(obs)} cells into {out_path}" + (f" and {csv_path}" if csv_path else "")
        + _unassigned_note(pred, min_confidence, flag_unseen))
    return summary


def annotate(
    adata: anndata.AnnData,
    model: str | os.PathLike | Annotator,
    *,
    layer: str | None = None,
    min_confidence: float | str = 0.5,
    key_added: str = "cellcontrast",
    copy: bool = False,
    batch_size: int = 8192,
    min_overlap: float = 0.5,
    case_insensitive: bool = False,
    probabilities: bool = False,
    flag_unseen: bool = False,
    threads: int = 0,
    progress: bool | None = None,
) -> anndata.AnnData | None:
    """Annotate an AnnData (in memory or backed) with an exported annotator.

    Writes the columns `annotate_file` writes, named ``{key_added}_label``,
    ``{key_added}_confidence``, ``{key_added}_raw_label``, ``{key_added}_top1..3`` and
    ``{key_added}_top1..3_prob``, into ``adata.obs``, and the metadata into
    ``adata.uns[key_added]``. Runs without torch.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` (or ``layer``); dense, CSR or CSC; in memory
        or backed.
    model
        The exported ``.onnx`` annotator, or an opened `Annotator`.
    layer
        Read counts from this layer, or ``"raw"`` for ``adata.raw``.
    min_confidence
        Below this confidence a cell's label is ``Unassigned``; ``"auto"``: the threshold that
        flags 5% of the chain's validation cells, chosen at training.
    key_added
        The prefix of the obs columns and the ``uns`` key.
    copy
        Annotate and return a copy (a backed AnnData is loaded into memory) instead of
        changing ``adata``.
    batch_size, min_overlap, case_insensitive, threads, progress
        As in `annotate_file`.
    probabilities
        Store every class's probability in ``obsm[f"{key_added}_probabilities"]``.
    flag_unseen
        As in `annotate_file` (columns ``{key_added}_energy``, ``{key_added}_unfamiliar``).

    Returns
    -------
    anndata.AnnData or None
        The annotated copy with ``copy=True``; otherwise None (``adata`` is changed).

    Raises
    ------
    InputError
        For every bad input (``adata`` is then left unchanged).
    """
    if not isinstance(adata, anndata.AnnData):
        raise InputError(f"annotate takes an AnnData, not {type(adata).__name__}; read one with anndata.read_h5ad")
    if not isinstance(key_added, str) or not key_added:
        raise InputError("key_added must be a non-empty string")
    _check_options(batch_size, min_confidence, min_overlap)
    annotator = _as_annotator(model, threads)
    min_confidence = _threshold(annotator, min_confidence)
    energy_threshold = _energy_threshold(annotator, flag_unseen)
    matrix = MemoryMatrix.of(adata, layer)
    _check_not_empty(matrix)
    col_map = _gene_columns(matrix.var_names, annotator, min_overlap, case_insensitive, lambda *_: None)
    predicted = predict_matrix(annotator, matrix, col_map, batch_size, probabilities=probabilities,
                               energy=flag_unseen, progress=progress)
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    prefix = f"{key_added}_"
    pred = _frame(target.obs_names, annotator, predicted, min_confidence, energy_threshold, prefix=prefix)
    for column in pred.columns:
        target.obs[column] = pred[column].to_numpy() if pred[column].dtype.kind in "fb" else pred[column].array
    if predicted.probabilities is not None:
        target.obsm[f"{key_added}_probabilities"] = predicted.probabilities
    target.uns[key_added] = _metadata(annotator, predicted, "AnnData", layer, min_confidence, case_insensitive,
                                      energy_threshold)
    return target if copy else None
