"""Grouped validation: every choice scored on batches (donors, studies) the candidate never saw.

A random validation part shares its donors, depths and chemistry with the training cells, so
every choice made on it (chain, genes, L2, scaling, temperature, thresholds) is tuned for cells
the model has, in effect, already seen. With a batch key the reference's batches are held out
in turn (leave-one-batch-out; grouped k-fold above ``MAX_FOLDS`` batches): each fold trains
every chain on the other batches, and makes each chain's inner choices on the held-out batch.
The chain is chosen on the folds' mean macro F1 (`choose_on_folds`: the simplest within one
paired standard error of the best), then refitted
once on every cell with the settings the folds chose; its temperature and thresholds come from
the folds' out-of-fold predictions, pooled.

A type found in one batch only cannot be validated across batches: in the fold that holds its
batch out, a stratified ``val_fraction`` of its cells is validated and the rest trains (named
in a note and in the model card). A key with a single value falls back to stratified validation.
"""

from __future__ import annotations

import sys
from concurrent.futures import Executor
from dataclasses import dataclass, field

import anndata
import numpy as np
import pandas as pd
import torch

from cellcontrast.core.errors import InputError
from cellcontrast.core.names import ALL_GENES, CV_FOLD, LABEL, LINEAR_BASES
from cellcontrast.data.heldout import validation_split
from cellcontrast.model.chain import Chain
from cellcontrast.model.fit import (
    MIN_CELLS_PER_TYPE,
    FittedChains,
    chain_name,
    fit_chains,
    on_threads,
)
from cellcontrast.nn.chain import predict_logits
from cellcontrast.train.calibration import expected_calibration_error, fit_temperature
from cellcontrast.train.evaluation import annotate_thresholds, evaluate
from cellcontrast.train.metrics import classification_metrics
from cellcontrast.train.open_set import energy, unexplained_expression
from cellcontrast.train.recipes import DEFAULT_PARAMS

# Above this many batches, grouped k-fold with this many folds (each a set of whole batches).
MAX_FOLDS = 5
# where a fold's checkpoints and inner choices are made (`fit_one_fold`)
CHECKPOINTS_ON = ("held_out", "training_batches")


def check_checkpoints_on(value: str) -> str:
    """``value`` if it names where checkpoints are picked (`CHECKPOINTS_ON`); `InputError` otherwise."""
    if value not in CHECKPOINTS_ON:
        raise InputError(f"--checkpoints-on {value!r}: must be one of {', '.join(CHECKPOINTS_ON)}")
    return value


@dataclass
class BatchFolds:
    """The folds of one reference: ``folds`` as (held-out batch names, train rows, validation
    rows); the types kept (most frequent first); the types validated within their only batch."""

    batch_key: str
    folds: list[tuple[list[str], np.ndarray, np.ndarray]]
    classes: list[str]
    single_batch_types: list[str] = field(default_factory=list)
    groups: np.ndarray | None = None  # each cell's batch (for cross-batch contrastive positives)

    @property
    def cross_validation(self) -> bool:
        """Stratified cross-validation folds (`stratified_folds`) rather than the user's batches."""
        return self.batch_key == CV_FOLD


def batch_folds(obs: pd.DataFrame, batch_key: str, *, val_fraction: float = 0.1, seed: int = 0,
                max_folds: int = MAX_FOLDS) -> BatchFolds | None:
    """Leave-one-batch-out folds of ``obs`` (grouped k-fold above ``max_folds`` batches), or None
    when the key has a single value (the caller falls back to stratified validation, with a note).

    Raises `InputError` when ``batch_key`` is not an obs column or has missing values.
    """
    if batch_key not in obs.columns:
        raise InputError(f"--batch-key {batch_key}: no obs column {batch_key!r}; columns are: "
                         f"{', '.join(map(str, obs.columns))}")
    if obs[batch_key].isna().any():
        raise InputError(f"--batch-key {batch_key}: {int(obs[batch_key].isna().sum())} cells have no value; "
                         "label them or --filter them out")
    batches = obs[batch_key].astype(str).to_numpy()
    labels = obs[LABEL].astype(str).to_numpy()
    names = sorted(set(batches))
    if len(names) < 2:
        return None
    counts = pd.Series(labels).value_counts()
    classes = [name for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n >= MIN_CELLS_PER_TYPE]
    if len(classes) < 2:
        raise InputError(f"fitting needs at least 2 cell types with {MIN_CELLS_PER_TYPE}+ cells each; "
                         f"the labels have {len(classes)}")
    groups = _fold_groups(names, pd.Series(batches).value_counts(), max_folds)
    kept = np.isin(labels, classes)
    per_type_batches = pd.crosstab(labels[kept], batches[kept]).gt(0).sum(axis=1)
    single = [name for name in classes if per_type_batches.get(name, 0) < 2]
    rng = np.random.default_rng(seed)
    folds = []
    for held in groups:
        held_out = np.isin(batches, held) & kept
        train_mask = ~np.isin(batches, held) & kept
        for name in single:  # its only batch is held out: validate a stratified part of it there
            rows = np.flatnonzero(held_out & (labels == name))
            if rows.size:
                n_val = min(rows.size - 1, max(1, int(round(val_fraction * rows.size))))
                to_train = rng.permutation(rows)[n_val:]
                held_out[to_train], train_mask[to_train] = False, True
        folds.append((held, np.flatnonzero(train_mask), np.flatnonzero(held_out)))
    return BatchFolds(batch_key, folds, classes, single, batches)


def stratified_folds(obs: pd.DataFrame, n_folds: int, *, seed: int = 0) -> BatchFolds:
    """``n_folds`` stratified folds of random cells, as batch folds: each type's cells dealt in
    turn from a seeded shuffle, so every fold holds every type with ``n_folds``+ cells.

    One 10% validation part of a small reference holds one or two cells of its rare types, and
    the chain chosen on it is chosen by those cells (README, "Choosing the chain"); cross-validation
    scores every cell once. Cells share batches across folds: no cross-batch positives (``groups``
    None)."""
    if n_folds < 2:
        raise InputError(f"--val-folds {n_folds}: cross-validation needs at least 2 folds")
    labels = obs[LABEL].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    fold_of = np.empty(labels.size, dtype=np.int64)
    for name in sorted(set(labels)):
        rows = rng.permutation(np.flatnonzero(labels == name))
        fold_of[rows] = (np.arange(rows.size) + rng.integers(n_folds)) % n_folds
    folded = obs[[LABEL]].assign(**{CV_FOLD: [f"fold {k + 1}" for k in fold_of]})
    folds = batch_folds(folded, CV_FOLD, seed=seed, max_folds=n_folds)
    folds.groups = None
    return folds


def _fold_groups(names: list[str], sizes: pd.Series, max_folds: int) -> list[list[str]]:
    """One batch a fold, or (more batches than ``max_folds``) whole batches spread over
    ``max_folds`` folds of similar size: the largest batch first into the smallest fold."""
    if len(names) <= max_folds:
        return [[name] for name in names]
    folds: list[list[str]] = [[] for _ in range(max_folds)]
    totals = np.zeros(max_folds)
    for name in sorted(names, key=lambda n: (-sizes[n], n)):
        k = int(np.argmin(totals))
        folds[k].append(name)
        totals[k] += sizes[name]
    return [sorted(fold) for fold in folds]


@dataclass
class GroupedFit:
    """The per-fold chains' scores, every chain's fold mean, and the out-of-fold material of
    each chain (validation labels, uncalibrated logits, expression scores), pooled over folds."""

    folds: BatchFolds
    fold_scores: pd.DataFrame  # one row per (fold, chain): held_out, n_val, val_macro_f1, ...
    scores: pd.DataFrame  # one row per chain: fold means of the validation metrics, val_macro_f1_se
    out_of_fold: dict[str, dict[str, np.ndarray]]
    choices: dict[str, list[dict]]  # each chain's base choices, fold by fold
    fold_modules: dict[str, list] = field(default_factory=dict)  # the kept chains' fold models (``keep``)


def fit_folds(atlas: anndata.AnnData, folds: BatchFolds, chains: list[tuple[str, str]], *, seed: int = 0,
              params: dict | None = None, val_fraction: float = 0.1, labels_key: str = LABEL,
              layer: str | None = None, progress=None, executor: Executor | None = None,
              keep: tuple[str, ...] = (), checkpoints_on: str = "held_out") -> GroupedFit:
    """Train every chain on each fold's training batches, its choices made on the held-out
    batches; collect what the final chain's choice, temperature and thresholds need, and the
    fold models themselves of the chains named in ``keep``.

    ``checkpoints_on="training_batches"``: each chain's inner choices and checkpoints are made
    on a stratified ``val_fraction`` of the fold's training batches instead, and the held-out
    batch is only scored (`fit_one_fold`).

    ``executor``: the folds are trained as its tasks, at once (``fit --workers/--scheduler``);
    each is seeded as here, so the result does not depend on where it ran."""
    kw = {"seed": seed, "params": params, "val_fraction": val_fraction, "labels_key": labels_key, "layer": layer,
          "checkpoints_on": check_checkpoints_on(checkpoints_on)}
    if executor is None:
        done = [fit_one_fold(atlas, chains, fold, folds.classes, folds.groups, progress=progress, keep=keep, **kw)
                for fold in folds.folds]
    else:
        futures = [executor.submit(on_threads, torch.get_num_threads(), fit_one_fold, atlas, chains, fold,
                                   folds.classes, folds.groups, keep=keep, **kw) for fold in folds.folds]
        done = []
        for future in futures:
            done.append(future.result())
            for name, _ in done[-1]:
                if progress is not None:
                    progress(name)
    rows, oof, choices, modules = [], {}, {}, {}
    for k, ((held, train, val), fitted) in enumerate(zip(folds.folds, done, strict=True)):
        y = pd.Categorical(atlas.obs[LABEL].iloc[val].astype(str), categories=folds.classes).codes
        for name, found in fitted:
            rows.append({"held_out": ",".join(held), "n_train": int(train.size), "n_val": int(val.size),
                         "chain": name, **found["metrics"]})
            part = oof.setdefault(name, {"y": [], "logits": [], "expression": [], "rows": [], "fold": []})
            part["y"].append(y)
            part["fold"].append(np.full(val.size, k))
            part["rows"].append(val)
            part["logits"].append(found["logits"])
            if found["expression"] is not None:
                part["expression"].append(found["expression"])
            choices.setdefault(name, []).append(found["choices"])
            if "module" in found:
                modules.setdefault(name, []).append(found["module"])
    fold_scores = pd.DataFrame(rows)
    pooled = {name: {k: np.concatenate(v) if v else np.zeros(0) for k, v in part.items()} for name, part in oof.items()}
    return GroupedFit(folds, fold_scores, _fold_means(fold_scores), pooled, choices, modules)


def fit_one_fold(atlas: anndata.AnnData, chains: list[tuple[str, str]], fold, classes: list[str],
                 groups: np.ndarray | None, *, progress=None, keep: tuple[str, ...] = (),
                 checkpoints_on: str = "held_out", **kw) -> list[tuple[str, dict]]:
    """One fold's chains, as what the choice needs (validation metrics, the held-out cells'
    logits and expression scores, the inner choices): small enough to come back from a worker;
    the chains named in ``keep`` come back whole (``module``).

    ``checkpoints_on="held_out"``: early stopping and inner choices on the held-out batch that is
    then scored (an optimistic score for chains with many checkpoints, such as a component whose
    epoch is picked by the same cells' macro F1); ``"training_batches"``: on a stratified part of
    the training batches, the held-out batch scored only."""
    _, train, val = fold
    split = (train, val, classes) if checkpoints_on == "held_out" else \
        (*inner_split(atlas, train, classes, kw["val_fraction"], kw["seed"]), classes)
    fitted: FittedChains = fit_chains(atlas, chains, split=split, progress=progress, groups=groups, **kw)
    y_val = pd.Categorical(atlas.obs[LABEL].iloc[val].astype(str), categories=classes).codes
    out = []
    for name, chain in fitted.chains.items():
        module = chain.module
        metrics = chain.metrics if checkpoints_on == "held_out" else \
            evaluate(module, {"val": atlas.X[val]}, {"val": y_val}, len(classes))[0]
        out.append((name, {
            "metrics": {k: v for k, v in metrics.items() if k.startswith("val_")},
            "logits": predict_logits(module, atlas.X[val]),
            "expression": None if module.novelty is None else unexplained_expression(module, atlas.X[val]),
            "choices": chain.config["fit"].get("choices") or {}}
            | ({"module": module} if name in keep else {})))
    return out


def inner_split(atlas: anndata.AnnData, train: np.ndarray, classes: list[str], val_fraction: float,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fold's training rows split again, each type ``1 - val_fraction`` / ``val_fraction``
    (a type of one cell trains): where ``checkpoints_on="training_batches"`` picks checkpoints."""
    labels = atlas.obs[LABEL].iloc[train].astype(str).to_numpy()
    rng = np.random.default_rng(seed + 1)
    members = [train[rng.permutation(np.flatnonzero(labels == name))] for name in classes if (labels == name).any()]
    return validation_split(members, val_fraction)


def _fold_means(fold_scores: pd.DataFrame) -> pd.DataFrame:
    """Each chain's fold-mean validation metrics; ``val_macro_f1_se`` the standard error of the
    mean over folds (what the one-SE rule compares: batches differ more than cells do)."""
    metric_cols = [c for c in fold_scores.columns if c.startswith("val_") and not c.endswith("_se")]
    grouped = fold_scores.groupby("chain", sort=False)
    out = grouped[metric_cols].mean()
    n = grouped.size()
    sd = grouped["val_macro_f1"].std(ddof=1).fillna(0.0)
    out["val_macro_f1_se"] = sd / np.sqrt(n)
    out["n_folds"] = n
    return out.reset_index().assign(seed=0)


def choose_on_folds(fold_scores: pd.DataFrame, prefer: list[str]) -> tuple[str, pd.Series]:
    """The chain to ship: the simplest (first in ``prefer``) whose macro F1 trails the best
    chain's (by fold mean) by no more than one standard error of that gap, paired over folds.

    Folds differ more in difficulty (a donor of 300 cells and rare types against one of 900)
    than chains differ on one fold, and every chain meets the same folds: the spread of the
    per-fold *gaps* is the noise a choice must beat, not the spread of the scores themselves.
    Returns the name and each chain's paired standard error of its gap to the best.
    """
    table = fold_scores.pivot_table(index="held_out", columns="chain", values="val_macro_f1", sort=False)
    rank = {name: i for i, name in enumerate(prefer)}
    order = sorted(table.columns, key=lambda c: rank.get(c, len(rank)))
    means = table.mean()
    best = max(order, key=lambda c: (means[c], -rank.get(c, len(rank))))
    gaps = table[[best]].to_numpy() - table[order].to_numpy()
    n = len(table)
    gap_se = pd.Series(gaps.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(len(order)), index=order)
    for i, name in enumerate(order):
        if gaps[:, i].mean() <= gap_se[name] + 1e-12:
            return name, gap_se
    return best, gap_se


def refit_params(base: str, params: dict | None, choices: list[dict]) -> dict:
    """``params`` with the base's inner choices fixed to what the folds chose: a linear base's genes and
    scaling by majority (ties to the first fold's), its L2 as the folds' geometric mean, reached
    down the stronger values of its path and kept (``path_keep`` "last": the refit has nothing
    left to choose on validation); a list of
    ``contrastive_weight`` (ACTINN, scDAE) as the folds' most frequent choice."""
    params = {k: dict(v) for k, v in (params or {}).items()}
    made = [c for c in choices if c]
    if base not in LINEAR_BASES and made and isinstance(params.get(base, {}).get("contrastive_weight"), list):
        # a fine-tuned encoder's weight, chosen on the held-out batches: the folds' most frequent
        weights = pd.Series([float(c["contrastive_weight"]) for c in made])
        params[base]["contrastive_weight"] = float(weights.mode().iloc[0])
        return params
    if base not in LINEAR_BASES or not made:
        return params
    genes = pd.Series([str(c["n_hvg"]) for c in made]).mode().iloc[0]
    scaled = pd.Series([bool(c["standardize"]) for c in made]).mode().iloc[0]
    l2s = [float(c["chosen_l2"]) for c in made if c.get("chosen_l2")]
    fixed = {"n_hvg": ALL_GENES if genes == ALL_GENES else int(genes), "standardize": bool(scaled)}
    if l2s:  # reached as the folds reached theirs: down the path, warm-started, the last fit kept
        l2 = float(np.exp(np.mean(np.log(l2s))))
        path = params.get(base, {}).get("l2_path", DEFAULT_PARAMS[base]["l2_path"])
        fixed["l2_path"] = sorted({float(v) for v in path if v > l2 * (1 + 1e-9)} | {l2}, reverse=True)
        fixed["path_keep"] = "last"
    params[base] = {**params.get(base, {}), **fixed}
    return params


def refit_on_every_cell(atlas: anndata.AnnData, grouped: GroupedFit, name: str, *, seed: int = 0,
                        params: dict | None = None, labels_key: str = LABEL, layer: str | None = None) -> Chain:
    """The chosen chain trained once on every kept cell with the folds' choices; its temperature,
    thresholds and validation metrics from the folds' pooled out-of-fold predictions.

    The refit has no cell left to validate on: LR's choices are fixed (`refit_params`); a deep
    base or component keeps its recipe's budget, its checkpoint picked on the training cells."""
    base, _, component = name.partition("+")
    component = component or "none"
    every = np.flatnonzero(atlas.obs[LABEL].astype(str).isin(grouped.folds.classes).to_numpy())
    fixed = refit_params(base, params, grouped.choices[name])
    fitted = fit_chains(atlas, [(base, component)], seed=seed, params=fixed, labels_key=labels_key, layer=layer,
                        split=(every, every, grouped.folds.classes), groups=grouped.folds.groups)
    chain = fitted.chains[chain_name(base, component)]
    metrics = out_of_fold_metrics(grouped, name, len(grouped.folds.classes))
    chain.module.temperature.fill_(metrics["temperature"])
    torch.set_grad_enabled(True)
    table = grouped.fold_scores[grouped.fold_scores["chain"] == name]
    chain.config["metrics"] = metrics
    chain.config["fit"].update({
        "n_train": int(every.size), "n_val": int(sum(v.size for _, _, v in grouped.folds.folds)),
        "validation": "grouped", "batch_key": grouped.folds.batch_key,
        "single_batch_types": grouped.folds.single_batch_types,
        "folds": [{"held_out": r["held_out"], "n_train": int(r["n_train"]), "n_val": int(r["n_val"]),
                   "val_macro_f1": float(r["val_macro_f1"])} for _, r in table.iterrows()]})
    return chain


def out_of_fold_metrics(grouped: GroupedFit, name: str, n_classes: int) -> dict:
    """The chain's validation metrics from every fold's held-out cells pooled: one temperature
    fitted on the pooled uncalibrated logits, the thresholds `annotate` reads
    (``val_confidence_q05``, ``val_energy_q95``, ``val_expression_q99``) from the same cells,
    and the choice's figures (fold-mean macro F1 and its standard error over folds)."""
    part = grouped.out_of_fold[name]
    logits = part["logits"]
    temperature = fit_temperature(logits, part["y"])
    y, proba = out_of_fold_predictions(grouped, name, temperature)
    metrics = {"temperature": temperature}
    metrics.update({f"val_pooled_{k}": float(v) for k, v in classification_metrics(y, proba, n_classes).items()})
    row = grouped.scores.set_index("chain").loc[name]
    metrics.update({k: float(row[k]) for k in row.index if k.startswith("val_")})
    metrics["val_ece"] = expected_calibration_error(proba, y)
    metrics.update(annotate_thresholds(proba, energy(logits, temperature), part["expression"]))
    return metrics


def out_of_fold_predictions(grouped: GroupedFit, name: str, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels, calibrated probabilities) of every fold's held-out cells for chain ``name``."""
    part = grouped.out_of_fold[name]
    shifted = part["logits"] / temperature
    proba = np.exp(shifted - shifted.max(1, keepdims=True))
    return part["y"], proba / proba.sum(1, keepdims=True)


def say_fallbacks(folds: BatchFolds | None, batch_key: str) -> str | None:
    """The one-line note for a reference grouped validation cannot fully serve (None: none)."""
    if folds is None or folds.batch_key != batch_key:  # the fit falls back to what it does without a key
        how = ("a stratified random part" if folds is None
               else f"{len(folds.folds)} stratified cross-validation folds")
        return f"note: --batch-key {batch_key} has one value; validating on {how} of the reference instead"
    if folds.single_batch_types:
        shown = ", ".join(folds.single_batch_types[:8]) + (" ..." if len(folds.single_batch_types) > 8 else "")
        return (f"note: {len(folds.single_batch_types)} types live in one {batch_key} only and are validated "
                f"within it: {shown}")
    return None


def print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr)
