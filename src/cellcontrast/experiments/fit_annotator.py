"""`fit_annotator`: from a user's labelled reference to one ONNX annotator and its model card.

Every cell of the reference is used: a stratified split into training and validation (the
same for every chain), validation for each chain's checkpoints, L2 and temperature and for the
choice among chains; a test part is held out only when ``test_fraction`` asks for it, and it
is only reported, never read by a choice. With ``batch_key`` every choice is made on batches
the candidate did not train on instead (`model.grouped`: leave-one-batch-out, then one refit
on every cell). The chain is chosen by the one-standard-error rule
(`experiments.selection`): the simplest chain within one bootstrap standard error of the best
validation macro F1, because validation parts of a few cells a type cannot rank chains by less
(README, "Choosing the chain"). One MLflow parent run holds a nested run per chain; the chosen
chain is exported, logged and registered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd

from cellcontrast.annotation.conformal import conformity_scores
from cellcontrast.core.errors import InputError
from cellcontrast.core.names import CHAINS_SIMPLEST_FIRST, CV_FOLD, LABEL
from cellcontrast.data.atlas import open_h5ad, prepare_atlas
from cellcontrast.experiments.fit_candidates import (
    build_candidates,
    build_chosen,
    choose,
    offer_ensemble,
    train_candidates,
)
from cellcontrast.experiments.fit_stream import REFIT_EPOCHS, streaming_reference
from cellcontrast.experiments.selection import SELECTION_METRIC
from cellcontrast.model.chain import Chain
from cellcontrast.model.ensemble import (
    ENSEMBLE,
)
from cellcontrast.model.fit import stratified_validation
from cellcontrast.model.gene_panel import gene_panel
from cellcontrast.model.grouped import (
    BatchFolds,
    batch_folds,
    check_checkpoints_on,
    print_note,
    say_fallbacks,
    stratified_folds,
)
from cellcontrast.train.attribution import gene_weights

# The linear bars (LR and the margin base) and the deep base, at a cost a laptop affords
# (bench/bench_fit.py). lr+mlp was a default until measured: never chosen on the four shared
# references, and on the 90k atlas val macro F1 0.44 against LR's 0.66 for ~230 s more; it
# stays one `--chains` away. svm: on the mouse pancreas with mouse1 held out (`cc.fit`, one
# chain each) 0.918 test macro F1 against LR's 0.862.
DEFAULT_CHAINS = ("lr", "svm", "scdae")
# A streamed reference (above MAX_CELLS_IN_MEMORY) trains its chains on the sample, and only the
# linear ones are then refitted on every cell: a deep chain would never see past the sample. On
# simulated references of 100k-1M cells scDAE validated at 0.08-0.26 macro F1 against LR's
# 0.44-0.86, and it was 29% of a 100k-cell fit's time (docs/how-to/reference-to-annotator.md).
STREAMED_CHAINS = ("lr", "svm")

# Without a batch key, a reference of at most CV_MAX_CELLS cells is validated by CV_FOLDS-fold
# stratified cross-validation rather than one 10% part: there a type of 30 cells has 3
# validation cells, and the chain is chosen by them. On random 80/20 splits of the five shared
# references (docs/results/user_path_random_crossstudy.md) cross-validation raised the query
# macro F1 on four (mouse pancreas 0.939 -> 0.977, CBMC 0.886 -> 0.898, human pancreas
# 0.985 -> 0.990, kidney 0.958 -> 0.962) and lowered it on pbmc68k (0.716 -> 0.691, a query of
# 142 cells), for 3-4x the fit time (kidney 59 -> 182 s). Above CV_MAX_CELLS the part holds
# 1,000+ cells and one fit costs minutes: one part.
CV_FOLDS, CV_MAX_CELLS = 5, 10_000

# A backed reference above MAX_CELLS_IN_MEMORY labelled cells is fitted by streaming: its choices
# on a sample of SAMPLE_CELLS, the chosen linear chain refitted on every cell read in chunks
# (`experiments.fit_stream`). Read whole, memory grows with the cells (250k x 2,000 genes: 1,656 s,
# 8.8 GiB). Streamed from the sample's size up: at 100k cells (`fit --workers 2`, 2 cores) it took
# 283 s, 2.5 GiB and scored 0.706 on a new individual against 413 s, 3.8 GiB and 0.683 read
# whole (docs/how-to/reference-to-annotator.md).
MAX_CELLS_IN_MEMORY, SAMPLE_CELLS = 50_000, 50_000


def parse_chains(chains: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"lr,scdae+mlp"``, ``"all"`` or a list, as chain names in the order given."""
    names = list(CHAINS_SIMPLEST_FIRST) if chains == "all" else (
        [c.strip() for c in chains.split(",") if c.strip()] if isinstance(chains, str) else list(chains))
    unknown = [c for c in names if c not in CHAINS_SIMPLEST_FIRST]
    if unknown or not names:
        raise InputError(f"unknown chain {', '.join(unknown) or '(none given)'}; chains are "
                         f"{', '.join(CHAINS_SIMPLEST_FIRST)} or all")
    return list(dict.fromkeys(names))


def _base_component(name: str) -> tuple[str, str]:
    base, _, component = name.partition("+")
    return base, component or "none"


@dataclass
class FittedAnnotator:
    """What `fit_annotator` made: the chosen chain, every chain's validation scores, the
    reported test scores (with ``test_fraction``), the files written."""

    chain: Chain
    chosen: str
    scores: pd.DataFrame
    n_cells: dict[str, int]
    class_counts: pd.Series
    test_metrics: dict | None = None
    files: dict[str, Path] = field(default_factory=dict)
    # (labels, probabilities) the model card shows: the chain's validation cells, or with grouped
    # validation every fold's held-out cells; and the per-fold table (grouped validation only)
    validation: tuple[np.ndarray, np.ndarray] | None = None
    fold_scores: pd.DataFrame | None = None
    validation_groups: np.ndarray | None = None  # each validation cell's fold (grouped validation)
    candidates: dict[str, Chain] = field(default_factory=dict)  # every chain as exported (keep_candidates)


class _Prepared(NamedTuple):
    """The checked reference (``atlas``), its training part, the test part, the validation
    folds (None: one stratified part) and the fallback note."""

    atlas: anndata.AnnData
    reference: anndata.AnnData
    test: anndata.AnnData | None
    folds: BatchFolds | None
    note: str | None


def _hold_out_test(atlas: anndata.AnnData, test_fraction: float, seed: int):
    """The reference without its test part, and the test part (None without a fraction)."""
    if test_fraction == 0:
        return atlas, None
    rest, test, _ = stratified_validation(atlas.obs[LABEL], test_fraction, seed + 1_000_003)
    return atlas[np.sort(rest)].copy(), atlas[np.sort(test)].copy()


def _test_metrics(chain: Chain, test: anndata.AnnData | None) -> dict | None:
    if test is None:
        return None
    from cellcontrast.train.metrics import classification_metrics

    known = test.obs[LABEL].isin(chain.classes).to_numpy()
    y = pd.Categorical(test.obs[LABEL][known], categories=chain.classes).codes
    metrics = classification_metrics(y, chain.predict_proba(test[known]), len(chain.classes))
    return {f"test_{k}": float(v) for k, v in metrics.items()} | {"n_test": int(known.sum())}


def fit_annotator(
    adata: anndata.AnnData | str | Path,
    labels_key: str = LABEL,
    *,
    chains: str | list[str] | tuple[str, ...] | None = None,
    layer: str | None = None,
    filters: dict[str, str] | None = None,
    seed: int = 0,
    params: dict | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    batch_key: str | None = None,
    val_folds: int | str = "auto",
    checkpoints_on: str = "held_out",
    genes: Iterable[str] | None = None,
    out: str | Path | None = None,
    experiment: str | None = "cellcontrast-fit",
    register: bool = True,
    genes_source: str = "genes=",
    ensemble: bool = True,
    workers: int = 1,
    scheduler: str | None = None,
    max_cells_in_memory: int = MAX_CELLS_IN_MEMORY,
    sample_cells: int = SAMPLE_CELLS,
    refit_epochs: int = REFIT_EPOCHS,
    resume: bool = False,
    keep_candidates: bool = False,
) -> FittedAnnotator:
    """Train the chains on a labelled reference, choose one on validation, export it.

    Parameters
    ----------
    adata
        The reference (or its .h5ad path): raw counts in ``X`` (or ``layer``), cell types in ``obs[labels_key]``.
    labels_key, layer, filters
        The label column; where the counts are; only cells with these obs values (``{"donor": "m2"}``).
    chains
        Chain names (``"lr,scdae+mlp"``, ``"all"``); None: ``DEFAULT_CHAINS``, ``STREAMED_CHAINS`` if streamed.
    seed, params
        Seeds the splits and every training (same seed, same annotator); hyperparameters by model name.
    val_fraction, test_fraction
        Each type's share for validation; for a test part, only reported (0: none).
    batch_key
        An obs column of batches (donors, studies): every choice scored on batches the candidate did
        not train on, the chosen chain refitted on every cell (`model.grouped`; one value: as without).
    val_folds, checkpoints_on
        Without ``batch_key``: this many stratified cross-validation folds (0: one part; ``"auto"``:
        ``CV_FOLDS`` up to ``CV_MAX_CELLS`` cells). Where each fold picks epochs and inner choices:
        ``"held_out"``, the batch it is scored on; ``"training_batches"``, a part of its own (honest).
    genes, genes_source
        A known query's genes, trained on only (`cellcontrast.model.gene_panel`); how messages name them.
    out, experiment, register
        The ``.onnx`` file (the model card beside it); MLflow experiment (None: no tracking); register it.
    ensemble, workers, scheduler
        Offer the ensemble of the two best chains too; train the folds (or bases) at once on a local
        Dask cluster of ``workers`` processes or a running ``scheduler``: the same annotator.
    max_cells_in_memory, sample_cells, refit_epochs, resume
        A backed ``adata`` with more labelled cells is never read whole: choices on ``sample_cells``,
        linear chains refitted in chunks (``refit_epochs``), ``resume``-able (`experiments.fit_stream`).
    keep_candidates
        Also build the other chains as each would have been exported, in ``FittedAnnotator.candidates``.

    Returns
    -------
    FittedAnnotator; `InputError` for bad input (`docs/reference/refusals.md`).
    """
    names = parse_chains(chains) if chains is not None else None  # a bad name refused before any read
    check_checkpoints_on(checkpoints_on)
    stream = streaming_reference(adata, labels_key, layer, filters, max_cells_in_memory=max_cells_in_memory,
                                 sample_cells=sample_cells, refit_epochs=refit_epochs, seed=seed, out=out,
                                 resume=resume, cluster=(workers, scheduler))
    names = names or list(STREAMED_CHAINS if stream else DEFAULT_CHAINS)
    prepared = _prepare(_cells_of(adata, stream), labels_key, None if stream else layer,
                        filters, genes, genes_source, seed, val_fraction, test_fraction, batch_key, val_folds, out)
    params = cross_batch_positives(params) if batch_key and prepared.folds is not None else params
    options = {"seed": seed, "params": params, "labels_key": labels_key, "layer": layer}
    return _fit_prepared(prepared, names, stream, options, experiment=experiment, batch_key=batch_key,
                         test_fraction=test_fraction, val_fraction=val_fraction, ensemble=ensemble,
                         workers=workers, scheduler=scheduler, out=out, register=register,
                         keep_candidates=keep_candidates, checkpoints_on=checkpoints_on)


def _cells_of(adata, stream) -> anndata.AnnData:
    """What the choices are made on: the streamed reference's sample, or the reference itself."""
    if stream is not None:
        return stream.read_sample()
    return adata if isinstance(adata, anndata.AnnData) else open_h5ad(adata)


def _fit_prepared(prepared: _Prepared, names: list[str], stream, options: dict, *, experiment, batch_key,
                  test_fraction, val_fraction, ensemble, workers, scheduler, out, register,
                  keep_candidates=False, checkpoints_on="held_out") -> FittedAnnotator:
    """`fit_annotator` on its prepared reference: train, choose, build (refit), describe, write."""
    atlas, reference, test, folds, note = prepared
    tracker = _Tracker(experiment, names, reference, options["seed"], test_fraction,
                       batch_key or (CV_FOLD if folds is not None else None))
    refit = {"refit": stream.refit} if stream else {}  # a streamed reference's linear chains: every cell
    with tracker:
        with fold_executor(workers, scheduler) as executor:  # closed before the refit
            found = train_candidates(reference, folds, names, val_fraction=val_fraction, executor=executor,
                                     checkpoints_on=checkpoints_on, **options)
        offered = offer_ensemble(found, folds) if ensemble else None
        tracker.log_chains(found.scores, options["params"])
        chosen_name = choose(found, folds)
        chain, validation, built = build_chosen(found, folds, chosen_name, offered, reference, **options, **refit)
        _describe(chain, names, folds, note, validation, reference, options["seed"], checkpoints_on)
        result = _result(chain, chosen_name, found, validation, atlas, reference, test)
        if keep_candidates:
            result.candidates = build_candidates(found, folds, names, built, reference,
                                                 **options, **refit)
        if stream:
            result.n_cells["reference"] = stream.n_cells
        if out is not None:
            _write(result, Path(out), tracker, register)
    if stream:
        stream.finish()
    return result


@contextlib.contextmanager
def fold_executor(workers: int, scheduler: str | None):
    """Where the candidates train: here (None), or as tasks of a local Dask cluster of
    ``workers`` processes or of a running ``scheduler``: the validation folds at once, or with
    one validation part each base's chains."""
    if workers < 1:
        raise InputError(f"--workers {workers} must be at least 1")
    if workers == 1 and not scheduler:
        yield None
        return
    from cellcontrast.core.engine import task_executor

    with task_executor(workers, scheduler, pin=True) as executor:
        yield executor


def cross_batch_positives(params: dict | None) -> dict:
    """Contrastive positives (components, a fine-tuned encoder): a type's cells from other
    batches (train/cross_batch.py), unless the params say otherwise."""
    return {**(params or {}), **{m: {"positives": "cross_batch", **(params or {}).get(m, {})}
                                 for m in ("mlp", "mls", "actinn", "scdae")}}


def _result(chain: Chain, chosen: str, found, validation, atlas, reference, test) -> FittedAnnotator:
    fit = chain.config["fit"]
    sizes = {"reference": atlas.n_obs, "train": fit["n_train"], "val": fit["n_val"],
             "test": 0 if test is None else test.n_obs}
    return FittedAnnotator(chain, chosen, found.scores, sizes, reference.obs[LABEL].value_counts().reindex(chain.classes),
                           _test_metrics(chain, test), validation=validation, fold_scores=found.fold_scores,
                           validation_groups=found.fold_of_cell)


def _write(result: FittedAnnotator, out: Path, tracker, register: bool) -> None:
    """The ONNX annotator and its model card, logged (and registered) in the parent run."""
    from cellcontrast.experiments.model_card import write_model_card

    result.files["onnx"] = result.chain.export(out)
    result.files.update(write_model_card(result, out))
    tracker.log_result(result, register)


def _prepare(adata, labels_key, layer, filters, genes, genes_source, seed, val_fraction, test_fraction, batch_key,
             val_folds, out) -> _Prepared:
    """The checked reference, its genes (`gene_panel`), the test part, the batch or
    cross-validation folds and the fallback note (printed)."""
    if batch_key and val_folds not in ("auto", 0):
        raise InputError(f"--batch-key {batch_key} and --val-folds {val_folds} both set the validation; give one")
    if not 0.0 <= test_fraction < 0.5:
        raise InputError(f"--test-fraction {test_fraction} must lie in [0, 0.5)")
    if out is not None and Path(out).suffix.lower() != ".onnx":
        raise InputError(f"--out {out} should end in .onnx")
    atlas = prepare_atlas(adata, label_key=labels_key, layer=layer, filters=filters, source="the reference")
    atlas = gene_panel(atlas, genes, source=genes_source)
    reference, test = _hold_out_test(atlas, test_fraction, seed)
    folds = batch_folds(reference.obs, batch_key, val_fraction=val_fraction, seed=seed) if batch_key else None
    if folds is None:  # no key, or a key with one value: what a fit without one does
        if val_folds == "auto":
            val_folds = CV_FOLDS if reference.n_obs <= CV_MAX_CELLS else 0
        folds = stratified_folds(reference.obs, val_folds, seed=seed) if val_folds else None
    note = say_fallbacks(folds, batch_key) if batch_key else None
    print_note(note)
    return _Prepared(atlas, reference, test, folds, note)


def _describe(chain: Chain, names: list[str], folds, note: str | None, validation,
              reference: anndata.AnnData, seed: int, checkpoints_on: str = "held_out") -> None:
    """What the annotator records beside its weights: the chains it was chosen among and how,
    the conformity scores of `annotate --coverage` (cells the chain never trained on), and
    what `annotate` weighs a missing gene by (train.attribution)."""
    chain.config["fit"]["chains"] = names
    chain.config["fit"]["chosen_by"] = _chosen_by(folds, checkpoints_on)
    if note:
        chain.config["fit"]["validation_note"] = note.removeprefix("note: ")
    if folds is not None or chain.config.get("base") == ENSEMBLE:  # a single chain's are its own validation's
        source = ("the validation part (stratified: the reference's own batches)" if folds is None
                  else f"the held-out cells of {len(folds.folds)} stratified cross-validation folds (the reference's "
                       "own batches)" if folds.cross_validation
                  else f"held-out {folds.batch_key} (grouped validation, {len(folds.folds)} folds)")
        chain.config["conformity"] = conformity_scores(validation[1], validation[0], chain.classes, source=source,
                                                       seed=seed)
    chain.config["gene_weights"] = [float(f"{w:.4g}") for w in gene_weights(chain.module, reference.X, seed=seed)]


def _chosen_by(folds, checkpoints_on: str = "held_out") -> str:
    if folds is None:
        return f"one standard error of the best {SELECTION_METRIC}"
    over = (f"{len(folds.folds)} cross-validation folds" if folds.cross_validation
            else f"{len(folds.folds)} folds of held-out {folds.batch_key}")
    picked = ("" if checkpoints_on == "held_out"
              else "; each fold's epochs and inner choices on a part of its training batches")
    return (f"the simplest chain within one paired standard error (over {over}) of the best fold-mean "
            f"{SELECTION_METRIC}{picked}; refitted on every cell")


class _Tracker:
    """The MLflow parent run of one `fit_annotator` and a nested run per chain (or nothing)."""

    def __init__(self, experiment: str | None, names: list[str], reference, seed: int, test_fraction: float,
                 batch_key: str | None):
        self.experiment, self.run = experiment, None
        self.params = {"chains": ",".join(names), "n_cells": reference.n_obs, "n_types": reference.obs[LABEL].nunique(),
                       "n_genes": reference.n_vars, "seed": seed, "test_fraction": test_fraction,
                       "batch_key": batch_key or ""}

    def __enter__(self):
        if self.experiment is not None:
            import mlflow

            from cellcontrast.experiments import tracking

            tracking.setup(self.experiment)
            self.run = mlflow.start_run(run_name="fit-annotator", tags={"cellcontrast.kind": "fit-annotator",
                                                                       **tracking.parent_tags()})
            mlflow.log_params(self.params)
        return self

    def __exit__(self, kind, value, traceback):
        if self.run is not None:
            import mlflow

            mlflow.end_run("FINISHED" if kind is None else "FAILED")
        return False

    def log_chains(self, scores: pd.DataFrame, params: dict | None) -> None:
        for name in scores["chain"]:
            self.log_chain(name, scores.set_index("chain").loc[name].to_dict(), params)

    def log_chain(self, name: str, metrics: dict, params: dict | None) -> None:
        """One nested run: the chain's validation scores (fold means with grouped validation)."""
        if self.run is None:
            return
        import mlflow

        from cellcontrast.experiments.tracking import flatten
        from cellcontrast.train.recipes import resolve_params

        base, component = _base_component(name)
        resolved = {model: resolve_params(model, (params or {}).get(model)) for model in (base, component)
                    if model not in ("none", ENSEMBLE)}
        with mlflow.start_run(run_name=name, nested=True, tags={"cellcontrast.kind": "fit-chain", "chain": name}):
            mlflow.log_params({"base": base, "component": component, **flatten(resolved)})
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if k.startswith("val_") and isinstance(v, (int, float)) and np.isfinite(v)})

    def log_result(self, result: FittedAnnotator, register: bool) -> None:
        if self.run is None:
            return
        import mlflow

        mlflow.set_tag("chosen_chain", result.chosen)
        mlflow.log_metrics({f"chosen_{k}": float(v) for k, v in result.chain.metrics.items() if np.isfinite(v)})
        if result.test_metrics:
            mlflow.log_metrics(result.test_metrics)
        for path in result.files.values():
            mlflow.log_artifact(str(path), artifact_path="annotator")
        if register:
            from cellcontrast.experiments.registry import register_annotator
            from cellcontrast.export.onnx import normalize_config

            register_annotator(result.files["onnx"], normalize_config(result.chain.config), self.run.info.run_id,
                               self.experiment)
