"""The ensemble chain `fit` offers beside the others: the two best chains on validation,
their calibrated probabilities averaged with a weight chosen on the same validation cells.

It is scored like a chain (macro F1 and its standard error on validation, or the fold mean with
grouped validation) and chosen by the same one-standard-error rule, as the most complex
candidate: it ships only where it beats every single chain by more than the noise of
validation. A weight of 0 or 1 is one of its members: then there is no ensemble to offer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellcontrast.annotation.conformal import energy_calibration
from cellcontrast.model.chain import Chain
from cellcontrast.nn.ensemble import EnsembleModule
from cellcontrast.train.calibration import expected_calibration_error, nll
from cellcontrast.train.evaluation import annotate_thresholds
from cellcontrast.train.metrics import classification_metrics, macro_f1_standard_error

ENSEMBLE = "ensemble"
# The first member's weight, tried on validation (the second gets the rest).
WEIGHT_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)


def best_weight(first: np.ndarray, second: np.ndarray, y: np.ndarray) -> float:
    """The first member's weight on ``WEIGHT_GRID`` with the lowest validation NLL of the
    mixture (ties: the one nearest 0.5)."""
    eps = 1e-12
    losses = [nll(np.log(w * first + (1 - w) * second + eps), y) for w in WEIGHT_GRID]
    best = min(range(len(WEIGHT_GRID)), key=lambda i: (round(losses[i], 12), abs(WEIGHT_GRID[i] - 0.5)))
    return float(WEIGHT_GRID[best])


def candidate(scores: pd.DataFrame, probas: dict[str, np.ndarray], y: np.ndarray, n_classes: int,
              folds: np.ndarray | None = None, prefer: list[str] | None = None) -> dict | None:
    """The ensemble of the two best chains by validation macro F1 (ties: ``prefer`` order):
    ``{"members", "weights", "row"}`` with ``row`` its validation scores as a chain's, or None
    (fewer than two chains, or the best weight is one member alone).

    ``probas``: each chain's calibrated validation probabilities on the same cells ``y``;
    ``folds``: each cell's fold (grouped validation: the row is the fold mean, its standard
    error over folds, as for the other chains)."""
    if len(scores) < 2:
        return None
    rank = {name: i for i, name in enumerate(prefer or [])}
    ordered = scores.assign(_rank=[rank.get(n, len(rank)) for n in scores["chain"]]) \
        .sort_values(["val_macro_f1", "_rank"], ascending=[False, True], kind="stable")
    members = ordered["chain"].tolist()[:2]
    w = best_weight(probas[members[0]], probas[members[1]], y)
    if w in (0.0, 1.0):
        return None
    mixed = w * probas[members[0]] + (1 - w) * probas[members[1]]
    row = {"chain": ENSEMBLE, "seed": 0, **{f"val_{k}": float(v) for k, v in classification_metrics(y, mixed, n_classes).items()},
           "val_ece": expected_calibration_error(mixed, y)}
    if folds is None:
        row["val_macro_f1_se"] = macro_f1_standard_error(y, mixed.argmax(1), n_classes)
    else:
        per_fold = [classification_metrics(y[folds == k], mixed[folds == k], n_classes)["macro_f1"]
                    for k in np.unique(folds)]
        row["val_macro_f1"] = float(np.mean(per_fold))
        row["val_macro_f1_se"] = float(np.std(per_fold, ddof=1) / np.sqrt(len(per_fold))) if len(per_fold) > 1 else 0.0
        row["n_folds"] = len(per_fold)
    return {"members": members, "weights": [w, 1 - w], "row": row, "probabilities": mixed,
            "per_fold": None if folds is None else per_fold}


def ensemble_chain(members: list[Chain], weights: list[float], names: list[str], metrics: dict) -> Chain:
    """One chain of the weighted members (same genes and classes), its config naming them."""
    first = members[0]
    module = EnsembleModule([m.module for m in members], weights)
    config = {
        "genes": first.genes, "class_names": first.classes, "base": ENSEMBLE, "component": "none",
        "members": names, "weights": [float(w) for w in weights], "metrics": metrics,
        "params": {name: m.config.get("params") for name, m in zip(names, members, strict=True)},
        "fit": dict(first.config.get("fit") or {}), "n_genes": module.n_genes, "n_classes": module.n_classes,
        "preprocessing": " | ".join(f"{name} (weight {w:.2f}): {m.config.get('preprocessing', '')}"
                                    for name, w, m in zip(names, weights, members, strict=True)),
    }
    return Chain(module, config)


def with_energy_of(chain: Chain, source: Chain, name: str) -> Chain:
    """``chain`` with the ``--flag-unseen`` energy of ``source`` (its threshold too); the
    probabilities, the expression score and the attribution stay ``chain``'s.

    An ensemble keeps its members and weights (``source`` joins with weight 0 unless it is one);
    a single chain becomes a module of ``[chain, source]`` with weights ``[1, 0]``."""
    module = chain.module
    if isinstance(module, EnsembleModule):
        names = list(chain.config["members"])
        members, weights = list(module.members), module.weights.tolist()
        if name not in names:
            members, weights, names = [*members, source.module], [*weights, 0.0], [*names, name]
        energy_weights = [float(n == name) for n in names]
    else:  # by position: a component chain's base may bear the source's name (lr+mlp and lr)
        members, weights, energy_weights = [module, source.module], [1.0, 0.0], [0.0, 1.0]
    config = dict(chain.config)
    config["metrics"] = {**chain.metrics, "val_energy_q95": float(source.metrics["val_energy_q95"])}
    config["energy_from"] = name
    return Chain(EnsembleModule(members, weights, energy_weights=energy_weights), config)


def with_fold_energies(chain: Chain, fold_modules: list, held_out_energies: list[np.ndarray], *,
                       temperature: float, seed: int = 0) -> Chain:
    """``chain`` carrying the fold models of its ``--flag-unseen`` energy's source (weight 0:
    never run for the probabilities) and the energies of the cells each fold held out, so
    that `annotate` reads a new cell against the models that set the scale (`energy_p_values`).

    Each fold model's temperature becomes ``temperature``, the one its held-out energies were
    computed with (the refit's, fitted on the folds' pooled logits)."""
    module = chain.module
    if isinstance(module, EnsembleModule):
        members, weights, energy_weights = list(module.members), module.weights.tolist(), module.energy_weights.tolist()
    else:
        members, weights, energy_weights = [module], [1.0], [1.0]
    for fold in fold_modules:
        fold.temperature.fill_(temperature)
    k = len(fold_modules)
    config = dict(chain.config)
    config["energy_calibration"] = energy_calibration(held_out_energies, seed=seed)
    return Chain(EnsembleModule([*members, *fold_modules], [*weights, *[0.0] * k], energy_weights=[*energy_weights, *[0.0] * k],
                                n_fold_members=k), config)


@torch.no_grad()
def module_thresholds(module: EnsembleModule, counts, batch_size: int = 4096) -> dict:
    """`annotate_thresholds` of the ensemble itself on validation counts (the stratified split)."""
    probs, energies, expression = [], [], []
    module.eval()
    for start in range(0, counts.shape[0], batch_size):
        block = counts[start:start + batch_size]
        x = torch.as_tensor(block.toarray() if sp.issparse(block) else np.asarray(block), dtype=torch.float32)
        p = module(x)
        probs.append(p.numpy())
        energies.append(module.energy(x).numpy())
        if module.novelty is not None:
            expression.append(module.unexplained_expression(x, p).numpy())
    return annotate_thresholds(np.concatenate(probs), np.concatenate(energies),
                               np.concatenate(expression) if expression else None)
