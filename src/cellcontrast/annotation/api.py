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
* with ``flag_unseen``: the score (``cellcontrast_energy``, with ``cellcontrast_energy_p`` on an
  annotator of `cellcontrast fit` with grouped or cross-validation, or ``cellcontrast_expression``)
  and ``cellcontrast_unfamiliar``; with
  ``majority_voting``: ``cellcontrast_over_clustering``, ``cellcontrast_majority_voting`` and
  ``cellcontrast_majority_agreement`` (`cellcontrast.annotation.majority`);
* ``obsm['cellcontrast_probabilities']`` (``[n_cells, n_classes]`` float32, opt-in, columns in
  the order of ``uns['cellcontrast']['classes']``; held in memory while annotating);
* ``uns['cellcontrast']``: the model's metadata, the gene overlap and the options used.

The CSV (optional) holds the same ``cellcontrast_*`` columns indexed by cell id. The files are
written atomically and together: an error found in the last chunk leaves no output behind,
and the CSV never appears without its ``.h5ad``.

This package must not import torch (nor mlflow or sklearn): it runs on the light install.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd

from cellcontrast.annotation.conformal import UNSEEN_ALPHA, check_coverage, prediction_sets
from cellcontrast.annotation.genes import found_mask, model_columns
from cellcontrast.annotation.majority import check_can_cluster, majority_columns
from cellcontrast.annotation.model import Annotator, load_model
from cellcontrast.annotation.prediction import Predicted, predict_matrix
from cellcontrast.annotation.query import MemoryMatrix, check_not_empty, check_paths, read_query
from cellcontrast.annotation.results import (
    PREFIX,
    UNASSIGNED,
    accuracy,
    predictions_frame,
    summary_frame,
    unique_index,
    uns_safe,
    write_outputs,
)
from cellcontrast.annotation.stream import cores
from cellcontrast.core.errors import InputError, first_line
from cellcontrast.core.version import __version__

# The top probability below which 5% of the chain's validation cells fall (train/evaluation.py):
# what ``min_confidence="auto"`` uses.
VALIDATION_THRESHOLD = "val_confidence_q05"
# Each novelty score's validation threshold (train/evaluation.py): what ``flag_unseen`` uses.
# The energy flags 5% of validation; the expression score, sharper on the types a reference
# lacks, 1% (atlas Default seed 0, 3 unseen types: 89% of them above it, 0.5% of the others).
NOVELTY_THRESHOLDS = {"energy": "val_energy_q95", "expression": "val_expression_q99"}
FLAG_UNSEEN_SCORES = tuple(NOVELTY_THRESHOLDS)


def _check_options(batch_size: int, min_confidence: float | str, min_overlap: float,
                   min_agreement: float = 0.0) -> None:
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1")
    if min_confidence != "auto" and not (isinstance(min_confidence, int | float) and 0.0 <= min_confidence <= 1.0):
        raise InputError(f"--min-confidence {min_confidence} must lie between 0 and 1, or be auto")
    if not 0.0 <= min_overlap <= 1.0:
        raise InputError(f"--min-overlap {min_overlap} must lie between 0 and 1")
    if not 0.0 <= min_agreement <= 1.0:
        raise InputError(f"--min-agreement {min_agreement} must lie between 0 and 1")


def _columns(matrix, annotator: Annotator, *, min_overlap: float, case_insensitive: bool, say) -> np.ndarray:
    return model_columns(matrix.var_names, annotator.genes, min_overlap=min_overlap,
                         case_insensitive=case_insensitive, gene_key=matrix.gene_key, say=say,
                         other_columns=matrix.other_gene_columns(), weights=annotator.gene_weights)


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


def novelty_score(flag_unseen: bool | str | None) -> str | None:
    """The score ``flag_unseen`` names: False/None: none; True: ``energy``; or the name itself.

    ``energy`` (column ``cellcontrast_energy``): ``-T logsumexp(logits / T)``, cells above the
    value that 5% of the chain's validation cells exceed are unfamiliar; an annotator that carries
    its fold models (`fit` with grouped or cross-validation) also writes ``cellcontrast_energy_p``,
    the share of the held-out cells at least as unfamiliar under their own fold model,
    and flags it at 0.05 or below. ``expression`` (column
    ``cellcontrast_expression``; annotators from `cellcontrast fit`): the largest deviance of a
    gene the cell expresses above its predicted type's training profile, 1% of validation
    above the threshold; sharper on types the reference lacks within its own donors, weaker on
    a new donor (docs: unseen types)."""
    if flag_unseen is None or flag_unseen is False:
        return None
    if flag_unseen is True:
        return "energy"
    if flag_unseen not in FLAG_UNSEEN_SCORES:
        raise InputError(f"--flag-unseen {flag_unseen!r}: the score must be one of {', '.join(FLAG_UNSEEN_SCORES)}")
    return str(flag_unseen)


def _novelty_threshold(annotator: Annotator, score: str | None) -> float | None:
    """With a ``flag_unseen`` score: its validation threshold, which the model carries; on a
    `Annotator.cross_fitted` annotator's energy, the p-value at or below which a cell is flagged."""
    if score is None:
        return None
    if annotator.with_p_value(score):
        return float(annotator.metadata["energy_calibration"].get("alpha", UNSEEN_ALPHA))
    value = (annotator.metadata.get("metrics") or {}).get(NOVELTY_THRESHOLDS[score])
    if score not in annotator.novelty_scores or value is None:
        how = ("trained and exported by this version or later" if score == "energy"
               else "from `cellcontrast fit` or cc.fit of this version or later")
        raise InputError(f"--flag-unseen {score} needs a model exported with its {score} output and validation "
                         f"threshold ({how})")
    return float(value)


def _frame(obs_names: pd.Index, annotator: Annotator, predicted: Predicted, options: _Options,
           prefix: str = PREFIX) -> pd.DataFrame:
    return predictions_frame(obs_names, annotator.classes, predicted.top_idx, predicted.top_p, options.min_confidence,
                             prefix=prefix, novelty=predicted.novelty, novelty_threshold=options.novelty_threshold,
                             novelty_name=options.novelty or "energy", flag_below=annotator.with_p_value(options.novelty))


def _unassigned_note(pred: pd.DataFrame, options: _Options) -> str:
    min_confidence, flag_unseen = options.min_confidence, options.novelty is not None
    if not (min_confidence > 0 or flag_unseen):
        return ""
    unfamiliar = (f", or unfamiliar by {options.novelty}: {int(pred[f'{PREFIX}unfamiliar'].sum())} cells"
                  if flag_unseen else "")
    n_unassigned = int((pred[f"{PREFIX}label"] == UNASSIGNED).sum())
    return f"; {n_unassigned} Unassigned (confidence < {min_confidence:g}{unfamiliar})"


@dataclass
class _Options:
    """The options an annotation ran with, recorded in ``uns``."""

    layer: str | None
    min_confidence: float
    case_insensitive: bool
    gene_key: str | None
    novelty: str | None
    novelty_threshold: float | None
    majority_voting: bool
    min_agreement: float
    coverage: float | None = None
    conformal_score: str = "lac"


def _options(annotator: Annotator, layer, min_confidence, case_insensitive, gene_key, flag_unseen, majority_voting,
             min_agreement, coverage: float | None = None, conformal_score: str = "lac") -> _Options:
    score = novelty_score(flag_unseen)
    if coverage is not None:
        check_coverage(coverage, annotator.metadata.get("conformity"), conformal_score)
    return _Options(layer, _threshold(annotator, min_confidence), case_insensitive, gene_key, score,
                    _novelty_threshold(annotator, score), majority_voting, min_agreement, coverage, conformal_score)


def _predict_file(annotator: Annotator, query_path: Path, options: _Options, *, threads: int, label_key, say,
                  inspect, workers: int = 1, scheduler: str | None = None, **stream):
    """Open the query, check it, and annotate its cells: (obs, predictions, streamed, clusters)."""
    try:
        query_file = h5py.File(query_path, "r")
    except OSError as err:
        raise InputError(f"cannot read the query {query_path} (truncated or damaged?): {first_line(err, 200)}") from None
    # Threads that inflate the query's gzip chunks (h5chunks) beside the annotating thread.
    pool = ThreadPoolExecutor(max_workers=threads or cores(), thread_name_prefix="cellcontrast-inflate")
    with query_file as f, pool:
        matrix, obs = read_query(f, query_path, options.layer, pool, label_key, options.gene_key)
        obs = unique_index(obs, say)
        if workers > 1 or scheduler:  # the rows shared among worker processes
            from functools import partial

            from cellcontrast.annotation.row_ranges import predict_in_parts

            stream["predict"] = partial(predict_in_parts, query=query_path, layer=options.layer, scheduler=scheduler,
                                        gene_key=options.gene_key, workers=workers,
                                        threads=threads or max(1, cores() // workers))
        pred, predicted, n_clusters = _annotate_matrix(
            annotator, matrix, obs.index, options, say=say, **stream,
            inspect=None if inspect is None else (lambda pred, probs: inspect(_joined(obs, pred), probs)))
    return obs, pred, predicted, n_clusters


def _metadata(model: Annotator, predicted: Predicted, query: str, options: _Options,
              n_clusters: int | None = None) -> dict:
    """What ``uns['cellcontrast']`` records: the model, the gene overlap, the options."""
    n_model = len(model.genes)
    missing = [g for g, ok in zip(model.genes, found_mask(predicted.col_map, n_model), strict=True) if not ok]
    meta = {k: v for k, v in model.metadata.items() if k != "genes"}
    return uns_safe({
        "model": str(Path(model.path).name),
        "model_metadata": {**meta, "metrics": json.dumps(meta.get("metrics", {}))},
        "classes": model.classes, "genes_found": predicted.found, "genes_total": n_model,
        "gene_overlap": float(predicted.found / n_model), "genes_missing": missing, "query": query,
        "layer": options.layer or "X", "gene_key": options.gene_key or "",
        "min_confidence": float(options.min_confidence), "case_insensitive": bool(options.case_insensitive),
        "cellcontrast_version": __version__, "flag_unseen": options.novelty or "",
        "unseen_threshold": float("nan") if options.novelty_threshold is None else float(options.novelty_threshold),
        "unseen_rule": "" if options.novelty is None
        else "energy p-value under the fold models at most unseen_threshold" if model.with_p_value(options.novelty)
        else f"{options.novelty} above unseen_threshold",
        "majority_voting": options.majority_voting, "min_agreement": float(options.min_agreement),
        "n_clusters": -1 if n_clusters is None else int(n_clusters),
        "coverage": float("nan") if options.coverage is None else float(options.coverage),
        "conformal_score": options.conformal_score if options.coverage is not None else "",
        "conformity_source": str((model.metadata.get("conformity") or {}).get("source", "")),
    })


def _annotate_matrix(annotator: Annotator, matrix, obs_names: pd.Index, options: _Options, *, min_overlap: float,
                     batch_size: int, probabilities: bool, progress, say, prefix: str = PREFIX, inspect=None,
                     predict=predict_matrix):
    """Predictions (and majority voting) for every cell of ``matrix``: (frame, predicted, n_clusters)."""
    if options.majority_voting:
        check_can_cluster(matrix.n_obs, len(annotator.classes))
    col_map = _columns(matrix, annotator, min_overlap=min_overlap, case_insensitive=options.case_insensitive, say=say)
    predicted = predict(annotator, matrix, col_map, batch_size,
                               probabilities=probabilities or options.majority_voting or inspect is not None
                               or options.coverage is not None,
                               novelty=options.novelty, progress=progress)
    pred = _frame(obs_names, annotator, predicted, options, prefix=prefix)
    if options.coverage is not None:  # conformal prediction sets from the stored calibration
        labels, sizes = prediction_sets(predicted.probabilities, annotator.metadata["conformity"], options.coverage,
                                        options.conformal_score, annotator.classes)
        pred[f"{prefix}prediction_set"] = labels
        pred[f"{prefix}set_size"] = sizes
    n_clusters = None
    if options.majority_voting:
        say(f"majority voting: clustering {matrix.n_obs} cells")
        voted = majority_columns(predicted.probabilities, pred[f"{prefix}label"].array,
                                 min_agreement=options.min_agreement, prefix=prefix)
        for column, values in voted.items():
            pred[column] = values
        n_clusters = len(voted[f"{prefix}over_clustering"].categories)
    if inspect is not None:
        inspect(pred, predicted.probabilities)
    if not probabilities:
        predicted.probabilities = None  # held for the clustering or the plots only
    return pred, predicted, n_clusters


def _joined(obs: pd.DataFrame, pred: pd.DataFrame) -> pd.DataFrame:
    """The query's obs with the prediction columns (replacing any of the same name)."""
    return obs.drop(columns=[c for c in obs.columns if c in pred.columns]).join(pred)


def annotate_file(
    model: str | os.PathLike | Annotator,
    query: str | os.PathLike,
    out: str | os.PathLike,
    *,
    csv: str | os.PathLike | None = None, layer: str | None = None, gene_key: str | None = None,
    batch_size: int = 8192, min_confidence: float | str = 0.0, min_overlap: float = 0.5,
    case_insensitive: bool = False, probabilities: bool = False, flag_unseen: bool | str = False,
    majority_voting: bool = False, min_agreement: float = 0.0, threads: int = 0,
    label_key: str | None = None, progress: bool | None = None, log=None, inspect=None,
    workers: int = 1, scheduler: str | None = None, coverage: float | None = None, conformal_score: str = "lac",
) -> pd.DataFrame:
    """Annotate the cells of an ``.h5ad`` file into a new ``.h5ad`` (and CSV), streaming.

    Parameters
    ----------
    model, query, out
        The ``.onnx`` annotator (or an `Annotator`); an ``.h5ad`` of raw counts; the ``.h5ad`` to write.
    csv, layer, gene_key
        Also write the predictions as CSV (together with ``out``); read counts from this layer, or
        ``"raw"`` for ``.raw``; match genes by this ``var`` column (CELLxGENE: ``"feature_name"``).
    batch_size, threads
        Rows read at a time; onnxruntime and inflating threads (0: all cores).
    min_confidence
        Below this confidence a cell's label is ``Unassigned``; ``"auto"``: the threshold that
        flags 5% of the chain's validation cells, chosen at training.
    min_overlap, case_insensitive
        Least share of the model's genes (weighed) the query must hold; ignore case in names.
    probabilities
        Store every class's probability in ``obsm['cellcontrast_probabilities']``.
    flag_unseen
        Also call ``Unassigned`` the cells less familiar than the chain's validation cells by a
        novelty score: ``True``/``"energy"`` (95%) or ``"expression"`` (99%; `novelty_score`).
    majority_voting, min_agreement
        Over-cluster the query and give each cluster its majority label; below ``min_agreement``:
        ``Heterogeneous`` (`cellcontrast.annotation.majority`).
    label_key, progress, log
        An obs column of true labels (the accuracy is reported); show a progress bar (None: when
        stderr is a terminal); called with each message.
    inspect
        Called with obs and all probabilities before anything is written (``--plots``).
    workers, scheduler
        Share the query's rows among processes of a local Dask cluster, or of a running one
        (`cellcontrast.annotation.row_ranges`); the same output.
    coverage, conformal_score
        Conformal prediction sets for this target coverage (``*_prediction_set``, ``*_set_size``)
        by the ``"lac"``, ``"aps"`` or ``"class"`` score (`cellcontrast.annotation.conformal`).

    Returns
    -------
    pandas.DataFrame
        One row per predicted label: ``n_cells``, ``fraction``, ``mean_confidence``; ``attrs``:
        ``n_cells``, ``genes_found``, ``genes_total``, ``accuracy``.

    Raises
    ------
    InputError
        For every bad input (nothing is written then).
    """
    say = log if log is not None else print
    query_path, out_path, csv_path = Path(query), Path(out), (Path(csv) if csv else None)
    _check_options(batch_size, min_confidence, min_overlap, min_agreement)
    check_paths(query_path, out_path, csv_path)
    annotator = _as_annotator(model, threads)
    options = _options(annotator, layer, min_confidence, case_insensitive, gene_key, flag_unseen, majority_voting,
                       min_agreement, coverage, conformal_score)
    obs, pred, predicted, n_clusters = _predict_file(
        annotator, query_path, options, threads=threads, label_key=label_key, say=say, inspect=inspect,
        min_overlap=min_overlap, batch_size=batch_size, probabilities=probabilities, progress=progress,
        workers=workers, scheduler=scheduler)
    uns = _metadata(annotator, predicted, query_path.name, options, n_clusters)
    summary = summary_frame(pred)
    summary.attrs.update({"n_cells": len(obs), "genes_found": predicted.found, "genes_total": len(annotator.genes)})
    if label_key is not None and (acc := accuracy(obs, label_key, pred, annotator.classes, say)) is not None:
        summary.attrs["accuracy"] = acc
    write_outputs(out_path, csv_path, _joined(obs, pred), uns, predicted.probabilities, pred)
    say(f"annotated {len(obs)} cells into {out_path}" + (f" and {csv_path}" if csv_path else "")
        + _unassigned_note(pred, options)
        + (f"; majority voting over {n_clusters} clusters" if n_clusters else ""))
    return summary


def annotate(
    adata: anndata.AnnData,
    model: str | os.PathLike | Annotator,
    *,
    layer: str | None = None, gene_key: str | None = None, min_confidence: float | str = 0.5,
    key_added: str = "cellcontrast", copy: bool = False, batch_size: int = 8192, min_overlap: float = 0.5,
    case_insensitive: bool = False, probabilities: bool = False, flag_unseen: bool | str = False,
    majority_voting: bool = False, min_agreement: float = 0.0, threads: int = 0, progress: bool | None = None,
    coverage: float | None = None, conformal_score: str = "lac",
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
    layer, gene_key
        Read counts from this layer, or ``"raw"`` for ``adata.raw``; match genes by this column.
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
    flag_unseen, majority_voting, min_agreement, coverage, conformal_score
        As in `annotate_file`, the columns prefixed ``{key_added}_``.

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
    _check_options(batch_size, min_confidence, min_overlap, min_agreement)
    annotator = _as_annotator(model, threads)
    options = _options(annotator, layer, min_confidence, case_insensitive, gene_key, flag_unseen, majority_voting,
                       min_agreement, coverage, conformal_score)
    matrix = MemoryMatrix.of(adata, layer, gene_key)
    check_not_empty(matrix)
    pred, predicted, n_clusters = _annotate_matrix(
        annotator, matrix, adata.obs_names, options, min_overlap=min_overlap, batch_size=batch_size,
        probabilities=probabilities, progress=progress, say=lambda *_: None, prefix=f"{key_added}_")
    target = (adata.to_memory() if adata.isbacked else adata.copy()) if copy else adata
    pred.index = target.obs_names
    for column in pred.columns:
        target.obs[column] = pred[column].to_numpy() if pred[column].dtype.kind in "fb" else pred[column].array
    if predicted.probabilities is not None:
        target.obsm[f"{key_added}_probabilities"] = predicted.probabilities
    target.uns[key_added] = _metadata(annotator, predicted, "AnnData", options, n_clusters)
    return target if copy else None
