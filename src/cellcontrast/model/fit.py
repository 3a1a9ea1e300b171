"""`fit`: train one chain on an AnnData in memory, every choice made on a validation part."""

from __future__ import annotations

import sys
from concurrent.futures import Executor
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import torch

from cellcontrast.annotation.conformal import conformity_scores
from cellcontrast.core.errors import InputError
from cellcontrast.core.names import BASES, COMPONENTS, LABEL, LINEAR_BASES
from cellcontrast.data.atlas import prepare_atlas
from cellcontrast.data.heldout import validation_split
from cellcontrast.model.chain import Chain
from cellcontrast.nn.chain import chain_config
from cellcontrast.train.base_model import fit_base, needs_component_base
from cellcontrast.train.chain import build_chain
from cellcontrast.train.component import fit_component
from cellcontrast.train.evaluation import evaluate
from cellcontrast.train.open_set import attach_unexplained_expression
from cellcontrast.train.recipes import check_params, resolve_params

# A type needs a training and a validation cell.
MIN_CELLS_PER_TYPE = 2


def stratified_validation(labels: pd.Series, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Row indices of train and validation, each type split ``1 - val_fraction`` /
    ``val_fraction`` (at least one cell each), and the types kept, most frequent first.

    Types with fewer than ``MIN_CELLS_PER_TYPE`` cells cannot be split: they are dropped, with
    one note naming them. Same seed, same split.
    """
    values = labels.astype(str).to_numpy()
    counts = pd.Series(values).value_counts()
    order = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    kept = [name for name, n in order if n >= MIN_CELLS_PER_TYPE]
    dropped = [name for name, n in order if n < MIN_CELLS_PER_TYPE]
    if len(kept) < 2:
        raise InputError(f"fitting needs at least 2 cell types with {MIN_CELLS_PER_TYPE}+ cells each; "
                         f"the labels have {len(kept)} ({len(order)} types in all)")
    if dropped:
        print(f"note: {len(dropped)} types with fewer than {MIN_CELLS_PER_TYPE} cells are left out: "
              f"{', '.join(dropped[:10])}{' ...' if len(dropped) > 10 else ''}", file=sys.stderr)
    rng = np.random.default_rng(seed)
    train, val = validation_split([rng.permutation(np.flatnonzero(values == name)) for name in kept],
                                  val_fraction)
    return train, val, kept


def _check_choice(base: str, component: str, val_fraction: float) -> None:
    if base not in BASES:
        raise InputError(f"unknown base {base!r}; expected one of {', '.join(BASES)}")
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val_fraction {val_fraction} must lie between 0 and 1")


def fit(
    adata: anndata.AnnData,
    labels_key: str = LABEL,
    *,
    base: str = "lr",
    component: str = "none",
    layer: str | None = None,
    seed: int = 0,
    params: dict | None = None,
    val_fraction: float = 0.1,
) -> Chain:
    """Train one chain on a labelled AnnData of raw counts.

    The cells are split, per type, into training and validation (``val_fraction``);
    preprocessing is fitted on training cells, and every choice (checkpoint, L2, scaling,
    temperature) is made on validation. Nothing else is held out: evaluate on other data.

    Parameters
    ----------
    adata
        Cells x genes with raw counts in ``X`` (or ``layer``, or ``"raw"`` for ``.raw``).
    labels_key
        The obs column with the cell types. Cells without a label are left out.
    base
        ``"lr"``, ``"svm"`` (the margin base), ``"actinn"`` or ``"scdae"``.
    component
        ``"none"``, ``"mlp"`` (MLP-CL) or ``"mls"`` (MLS-CL).
    layer
        Where the raw counts are (default ``X``).
    seed
        Seeds the split and the training: the same seed gives the same chain.
    params
        Hyperparameters keyed by model name, e.g. ``{"lr": {"n_hvg": 1000}}``.
    val_fraction
        The share of each type's cells used for validation.

    Returns
    -------
    Chain
        The trained chain, its validation metrics in ``chain.metrics``.

    Raises
    ------
    InputError
        For bad input: no such column, non-count values, fewer than two types, bad parameters.
    """
    if not isinstance(adata, anndata.AnnData):
        raise InputError(f"fit takes an AnnData, not {type(adata).__name__}; read one with anndata.read_h5ad")
    _check_choice(base, component, val_fraction)
    params = params or {}
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise InputError('params must map model names to parameters, e.g. {"lr": {"n_hvg": 1000}}')
    check_params(params)
    atlas = prepare_atlas(adata, label_key=labels_key, layer=layer, source="the AnnData")
    fitted = fit_chains(atlas, [(base, component)], seed=seed, params=params, val_fraction=val_fraction,
                        labels_key=labels_key, layer=layer)
    return next(iter(fitted.chains.values()))


@dataclass
class FittedChains:
    """Chains trained on one split of one reference: ``chains`` by name (``"lr"``,
    ``"lr+mlp"``), the split's row indices and the classes, most frequent first."""

    chains: dict[str, Chain]
    train: np.ndarray
    val: np.ndarray
    classes: list[str]


def on_threads(threads: int, task, *args, **kw):
    """``task(*args, **kw)`` with torch on ``threads`` threads: what an executor runs, given the
    submitting process's count, so that a worker (Dask starts each with one) sums as it would
    (a sum split over other threads rounds differently and an L-BFGS path can end elsewhere)."""
    torch.set_num_threads(threads)
    return task(*args, **kw)


def _fit_on_executor(executor: Executor, atlas, chains, split, progress, **kw) -> FittedChains:
    """One task per base with its chains (a base is trained once for the chains on it)."""
    by_base: dict[str, list[tuple[str, str]]] = {}
    for base, component in chains:
        by_base.setdefault(base, []).append((base, component))
    futures = [executor.submit(on_threads, torch.get_num_threads(), fit_chains, atlas, group, split=split, **kw)
               for group in by_base.values()]
    trained: dict[str, Chain] = {}
    for future in futures:
        chains_done = future.result().chains
        trained.update(chains_done)
        for name in chains_done if progress is not None else ():
            progress(name)
    ordered = {chain_name(b, c): trained[chain_name(b, c)] for b, c in chains}
    return FittedChains(ordered, *split)


def base_choices(model) -> dict:
    """What validation chose inside a base's recipe (LR: its genes, scaling and L2), so that
    a refit on every cell can reuse the choices (`model.grouped`)."""
    p = getattr(model, "train_params", None) or {}
    if getattr(model, "name", None) not in LINEAR_BASES:  # a fine-tuned encoder's weight (from a list)
        return {"contrastive_weight": p["contrastive_weight"]} if "contrastive_weight" in p else {}
    return {"n_hvg": p.get("n_hvg"), "standardize": bool(model.preprocess.standardize),
            "chosen_l2": p.get("chosen_l2")}


def chain_name(base: str, component: str) -> str:
    return base if component in (None, "none") else f"{base}+{component}"


def fit_chains(atlas: anndata.AnnData, chains: list[tuple[str, str]], *, seed: int = 0, params: dict | None = None,
               val_fraction: float = 0.1, labels_key: str = LABEL, layer: str | None = None,
               progress=None, log=None, split: tuple[np.ndarray, np.ndarray, list[str]] | None = None,
               groups: np.ndarray | None = None, executor: Executor | None = None) -> FittedChains:
    """Train several chains on one prepared reference (``prepare_atlas``): one split for all,
    each base trained once and shared by the chains on it (as the grid does), unless a
    component needs it refitted (``needs_component_base``; LR then fits only its scaling,
    the component's head being fresh). ``progress(name)`` is called as
    each chain is done; ``log(stage, step, metrics)`` sees the training curves. ``labels_key``
    and ``layer`` are only recorded in the configs. ``split``: (train rows, validation rows,
    classes) given by the caller (grouped validation, `model.grouped`) instead of a stratified
    draw; the same row may sit in both (a refit that trains on every cell). ``groups``: each
    cell's batch, for components (and a fine-tuned encoder) with ``positives="cross_batch"``.
    ``executor``: the chains of each base train as one of its tasks, the bases at once (the
    split drawn here, every task seeded as here: the chains one process trains)."""
    params = params or {}
    check_params(params)
    for base, component in chains:
        _check_choice(base, component, val_fraction)
    train, val, classes = stratified_validation(atlas.obs[LABEL], val_fraction, seed) if split is None else split
    if executor is not None:
        return _fit_on_executor(executor, atlas, chains, (train, val, classes), progress,
                                seed=seed, params=params, val_fraction=val_fraction, labels_key=labels_key,
                                layer=layer, groups=groups)
    codes = pd.Categorical(atlas.obs[LABEL].astype(str), categories=classes).codes.astype(np.int64)
    X = {"train": atlas.X[train], "val": atlas.X[val]}
    y = {"train": codes[train], "val": codes[val]}
    bases, fitted = {}, {}
    for base, component in chains:
        model, own_head = bases.get(base), component == "none"
        if model is None or (component != "none" and needs_component_base(model, params.get(base))) \
                or (own_head and not getattr(model, "head_fitted", True)):
            model = bases[base] = fit_base(X["train"], y["train"], X["val"], y["val"], len(classes), base,
                                           params.get(base), seed, log, for_component=not own_head,
                                           fit_head=own_head,
                                           train_groups=None if groups is None else np.asarray(groups)[train])
        module = build_chain(model) if component == "none" else build_chain(model, *fit_component(
            model, X["train"], y["train"], X["val"], y["val"], len(classes), component, params.get(component), seed, log,
            train_groups=None if groups is None else np.asarray(groups)[train]))
        attach_unexplained_expression(module, X["train"], y["train"])  # for `annotate --flag-unseen expression`
        metrics, proba = evaluate(module, {"val": X["val"]}, {"val": y["val"]}, len(classes))
        torch.set_grad_enabled(True)
        resolved = {base: resolve_params(base, params.get(base))}
        if component != "none":
            resolved[component] = resolve_params(component, params.get(component))
        config = {"genes": atlas.var_names.tolist(), "class_names": classes, "base": base, "component": component,
                  "params": resolved, "metrics": metrics,
                  "fit": {"labels_key": labels_key, "layer": layer, "seed": seed, "val_fraction": val_fraction,
                          "n_train": int(train.size), "n_val": int(val.size), "choices": base_choices(model)},
                  # `annotate --coverage` (grouped validation replaces them with its held-out batches')
                  "conformity": conformity_scores(proba["val"], y["val"], classes, seed=seed,
                                                  source="the validation part (stratified: the reference's own batches)")}
        name = chain_name(base, component)
        fitted[name] = Chain(module, chain_config(module, config))
        if progress is not None:
            progress(name)
    return FittedChains(fitted, train, val, classes)
