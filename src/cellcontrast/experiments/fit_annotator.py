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

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
from tqdm import tqdm

from cellcontrast.annotation.conformal import conformity_scores
from cellcontrast.core.errors import InputError
from cellcontrast.core.names import CHAINS_SIMPLEST_FIRST, LABEL
from cellcontrast.data.atlas import prepare_atlas
from cellcontrast.experiments.selection import SELECTION_METRIC, choose_per_seed
from cellcontrast.model.chain import Chain
from cellcontrast.model.ensemble import (
    ENSEMBLE,
    candidate,
    ensemble_chain,
    module_thresholds,
    thresholds,
)
from cellcontrast.model.fit import fit_chains, stratified_validation
from cellcontrast.model.gene_panel import gene_panel
from cellcontrast.model.grouped import (
    batch_folds,
    choose_on_folds,
    fit_folds,
    out_of_fold_predictions,
    print_note,
    refit_on_every_cell,
    say_fallbacks,
)
from cellcontrast.train.attribution import gene_weights
from cellcontrast.train.calibration import fit_temperature
from cellcontrast.train.open_set import energy

# The linear bars (LR and the margin base) and the deep base, at a cost a laptop affords
# (bench/bench_fit.py). lr+mlp was a default until measured: never chosen on the four shared
# references, and on the 90k atlas val macro F1 0.44 against LR's 0.66 for ~230 s more; it
# stays one `--chains` away. svm: on the mouse pancreas with mouse1 held out (`cc.fit`, one
# chain each) 0.918 test macro F1 against LR's 0.862.
DEFAULT_CHAINS = ("lr", "svm", "scdae")


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


def _hold_out_test(atlas: anndata.AnnData, test_fraction: float, seed: int):
    """The reference without its test part, and the test part (None without a fraction)."""
    if test_fraction == 0:
        return atlas, None
    rest, test, _ = stratified_validation(atlas.obs[LABEL], test_fraction, seed + 1_000_003)
    return atlas[np.sort(rest)].copy(), atlas[np.sort(test)].copy()


def _scores(chains: dict[str, Chain]) -> pd.DataFrame:
    rows = [{"chain": name, "seed": 0, **{k: v for k, v in chain.metrics.items() if k.startswith("val_")}}
            for name, chain in chains.items()]
    return pd.DataFrame(rows)


def _test_metrics(chain: Chain, test: anndata.AnnData | None) -> dict | None:
    if test is None:
        return None
    from cellcontrast.train.metrics import classification_metrics

    known = test.obs[LABEL].isin(chain.classes).to_numpy()
    y = pd.Categorical(test.obs[LABEL][known], categories=chain.classes).codes
    metrics = classification_metrics(y, chain.predict_proba(test[known]), len(chain.classes))
    return {f"test_{k}": float(v) for k, v in metrics.items()} | {"n_test": int(known.sum())}


def fit_annotator(
    adata: anndata.AnnData,
    labels_key: str = LABEL,
    *,
    chains: str | list[str] | tuple[str, ...] = DEFAULT_CHAINS,
    layer: str | None = None,
    filters: dict[str, str] | None = None,
    seed: int = 0,
    params: dict | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.0,
    batch_key: str | None = None,
    genes: Iterable[str] | None = None,
    out: str | Path | None = None,
    experiment: str | None = "cellcontrast-fit",
    register: bool = True,
    genes_source: str = "genes=",
    ensemble: bool = True,
) -> FittedAnnotator:
    """Train the chains on a labelled reference, choose one on validation, export it.

    Parameters
    ----------
    adata
        The reference: raw counts in ``X`` (or ``layer``), cell types in ``obs[labels_key]``.
    labels_key, layer, filters
        The label column; where the counts are; keep only cells whose obs columns equal
        the given values (``{"donor": "mouse2"}``).
    chains
        Chain names (``"lr"``, ``"scdae+mlp"``, ...), a comma-separated string, or ``"all"``.
    seed
        Seeds the splits and every training: same seed, same annotator.
    params
        Hyperparameters keyed by model name, as in `cellcontrast.fit`.
    val_fraction, test_fraction
        Each type's share for validation; for a held-out test part (0: none, no cell unused).
    batch_key
        An obs column of batches (donors, studies): every choice is then scored on batches the
        candidate did not train on (leave-one-batch-out, grouped 5-fold above 5 batches), and
        the chosen chain refitted on every cell (`cellcontrast.model.grouped`). A key with one
        value falls back to stratified validation, with a note.
    genes
        The genes a known query measures (its var_names): the reference is restricted to them
        (`cellcontrast.model.gene_panel`). Genes the reference never detects are left out always.
    out
        The ``.onnx`` file to write; the model card goes beside it (``.card.md``, ``.card.png``).
    experiment, register
        MLflow experiment of the parent run (None: no tracking); register the exported model.
    genes_source
        How messages name ``genes`` (the command line passes ``--query FILE``).
    ensemble
        Offer the ensemble of the two best chains (`cellcontrast.model.ensemble`) as one more
        candidate, chosen by the same rule (last in the simplest-first order).

    Returns
    -------
    FittedAnnotator

    Raises
    ------
    InputError
        For bad input: no such column, one type, every type too small, unknown chains.
    """
    names = parse_chains(chains)
    if not 0.0 <= test_fraction < 0.5:
        raise InputError(f"--test-fraction {test_fraction} must lie in [0, 0.5)")
    if out is not None and Path(out).suffix.lower() != ".onnx":
        raise InputError(f"--out {out} should end in .onnx")
    atlas = prepare_atlas(adata, label_key=labels_key, layer=layer, filters=filters, source="the reference")
    atlas = gene_panel(atlas, genes, source=genes_source)
    reference, test = _hold_out_test(atlas, test_fraction, seed)
    folds = batch_folds(reference.obs, batch_key, val_fraction=val_fraction, seed=seed) if batch_key else None
    note = say_fallbacks(folds, batch_key) if batch_key else None
    print_note(note)
    tracker = _Tracker(experiment, names, reference, seed, test_fraction, batch_key)
    pairs = [_base_component(name) for name in names]
    with tracker:
        total = len(names) * (len(folds.folds) if folds else 1)
        with tqdm(total=total, desc="fit chains", unit="chain", file=sys.stderr,
                  disable=not sys.stderr.isatty()) as bar:
            if folds is None:
                split = fit_chains(reference, pairs, seed=seed, params=params, val_fraction=val_fraction,
                                   labels_key=labels_key, layer=layer, progress=lambda name: bar.update())
                scores, fold_scores = _scores(split.chains), None
            else:
                grouped = fit_folds(reference, folds, pairs, seed=seed, params=params, val_fraction=val_fraction,
                                    labels_key=labels_key, layer=layer, progress=lambda name: bar.update())
                scores, fold_scores = grouped.scores, grouped.fold_scores
        if folds is None:
            validation_cells = reference[np.sort(split.val)]
            y_val = pd.Categorical(validation_cells.obs[LABEL].astype(str), categories=split.classes).codes
            probas = {name: split.chains[name].predict_proba(validation_cells) for name in names}
            fold_of_cell = None
        else:
            y_val, probas = _out_of_fold_probabilities(grouped, names)
            fold_of_cell = grouped.out_of_fold[names[0]]["fold"]
        offered = candidate(scores, probas, y_val, len(probas[names[0]][0]), fold_of_cell,
                            prefer=list(CHAINS_SIMPLEST_FIRST)) if ensemble else None
        if offered is not None:
            scores = pd.concat([scores, pd.DataFrame([offered["row"]])], ignore_index=True)
            if folds is not None:
                fold_scores = pd.concat([fold_scores, pd.DataFrame(
                    [{"held_out": ",".join(held), "n_val": int(val.size), "chain": ENSEMBLE, "val_macro_f1": f1}
                     for (held, _, val), f1 in zip(folds.folds, offered["per_fold"], strict=True)])],
                    ignore_index=True)
        for name in scores["chain"]:
            tracker.log_chain(name, scores.set_index("chain").loc[name].to_dict(), params)
        prefer = [*CHAINS_SIMPLEST_FIRST, ENSEMBLE]
        if folds is None:
            chosen_name = str(choose_per_seed(scores, prefer=prefer, method_key="chain", one_se=True)["chain"].iloc[0])
        else:
            chosen_name, gap_se = choose_on_folds(fold_scores, prefer)
            scores["val_gap_to_best_se"] = scores["chain"].map(gap_se)
        members = offered["members"] if chosen_name == ENSEMBLE else [chosen_name]
        if folds is None:
            built = [split.chains[name] for name in members]
        else:
            built = [refit_on_every_cell(reference, grouped, name, seed=seed, params=params, labels_key=labels_key,
                                         layer=layer) for name in members]
        if chosen_name == ENSEMBLE:
            chain = _ensemble(offered, built, folds, grouped if folds else None,
                              validation_cells.X if folds is None else None)
            validation = (y_val, offered["probabilities"])
        else:
            chain = built[0]
            validation = (y_val, probas[chosen_name]) if folds is None else \
                out_of_fold_predictions(grouped, chosen_name, chain.metrics["temperature"])
        chain.config["fit"]["chains"] = names
        # `annotate --coverage`: conformal prediction sets calibrated on cells the chain never trained on
        source = (f"held-out {batch_key} (grouped validation, {len(folds.folds)} folds)" if folds is not None
                  else "the validation part (stratified: the reference's own batches)")
        chain.config["conformity"] = conformity_scores(validation[1], validation[0], chain.classes, source=source,
                                                       seed=seed)
        # what `annotate` weighs a missing gene by (train.attribution)
        chain.config["gene_weights"] = [float(f"{w:.4g}") for w in gene_weights(chain.module, reference.X, seed=seed)]
        chain.config["fit"]["chosen_by"] = _chosen_by(folds)
        if note:
            chain.config["fit"]["validation_note"] = note.removeprefix("note: ")
        counts = reference.obs[LABEL].value_counts().reindex(chain.classes)
        result = FittedAnnotator(chain, chosen_name, scores, {"reference": atlas.n_obs, "train": chain.config["fit"]["n_train"],
                                 "val": chain.config["fit"]["n_val"], "test": 0 if test is None else test.n_obs},
                                 counts, _test_metrics(chain, test), validation=validation, fold_scores=fold_scores)
        if out is not None:
            from cellcontrast.experiments.model_card import write_model_card

            result.files["onnx"] = chain.export(out)
            result.files.update(write_model_card(result, Path(out)))
            tracker.log_result(result, register)
    return result


def _chosen_by(folds) -> str:
    if folds is None:
        return f"one standard error of the best {SELECTION_METRIC}"
    return (f"the simplest chain within one paired standard error (over {len(folds.folds)} folds of held-out "
            f"{folds.batch_key}) of the best fold-mean {SELECTION_METRIC}; refitted on every cell")


def _out_of_fold_probabilities(grouped, names: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every fold's held-out labels and each chain's calibrated probabilities on them (one
    temperature a chain, on its pooled out-of-fold logits, as its refit gets)."""
    probas = {}
    for name in names:
        part = grouped.out_of_fold[name]
        y, probas[name] = out_of_fold_predictions(grouped, name, fit_temperature(part["logits"], part["y"]))
    return y, probas


def _ensemble(offered: dict, built: list[Chain], folds, grouped, validation_counts) -> Chain:
    """The chosen ensemble: its validation row, and the thresholds `annotate` reads, from the
    validation cells (stratified) or the folds' held-out cells (grouped: the members' pooled
    energies weighted, the first member's expression scores)."""
    metrics = {k: v for k, v in offered["row"].items() if k.startswith("val_")}
    chain = ensemble_chain(built, offered["weights"], offered["members"], metrics)
    if folds is None:
        metrics.update(module_thresholds(chain.module, validation_counts))
    else:
        energies = sum(w * energy(grouped.out_of_fold[name]["logits"], m.metrics["temperature"])
                       for name, w, m in zip(offered["members"], offered["weights"], built, strict=True))
        metrics.update(thresholds(offered["probabilities"], energies,
                                  grouped.out_of_fold[offered["members"][0]]["expression"]))
        chain.config["fit"].update({"folds": [{"held_out": ",".join(held), "n_val": int(val.size)}
                                              for held, _, val in folds.folds]})
    chain.config["metrics"] = metrics
    return chain


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

    def log_chain(self, name: str, metrics: dict, params: dict | None) -> None:
        """One nested run: the chain's validation scores (fold means with grouped validation)."""
        if self.run is None:
            return
        import mlflow

        from cellcontrast.experiments.tracking import flatten
        from cellcontrast.train.recipes import resolve_params

        base, component = _base_component(name)
        resolved = {model: resolve_params(model, (params or {}).get(model)) for model in (base, component)
                    if model != "none"}
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
