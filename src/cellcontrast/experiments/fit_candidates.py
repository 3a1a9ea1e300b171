"""The candidates `fit_annotator` chooses among: every chain trained on one stratified split or
on each fold of grouped validation, the ensemble of the two best, the choice, and the chosen
chain built for export (refitted on every cell after grouped validation)."""

from __future__ import annotations

import sys
from concurrent.futures import Executor
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
from tqdm import tqdm

from cellcontrast.core.names import CHAINS_SIMPLEST_FIRST, LABEL
from cellcontrast.experiments.selection import choose_per_seed
from cellcontrast.model.chain import Chain
from cellcontrast.model.ensemble import (
    ENSEMBLE,
    candidate,
    ensemble_chain,
    module_thresholds,
    with_energy_of,
    with_fold_energies,
)
from cellcontrast.model.fit import FittedChains, fit_chains
from cellcontrast.model.grouped import (
    BatchFolds,
    GroupedFit,
    choose_on_folds,
    fit_folds,
    out_of_fold_predictions,
    refit_on_every_cell,
)
from cellcontrast.train.calibration import fit_temperature
from cellcontrast.train.evaluation import annotate_thresholds
from cellcontrast.train.open_set import energy

PREFER = [*CHAINS_SIMPLEST_FIRST, ENSEMBLE]
# `--flag-unseen` reads LR's energy whatever chain is chosen: LR's logits are log-probabilities
# up to a constant, a margin's or a deep head's are not, and their energy can rank a new type
# below the known ones. Four human pancreas donors held out in turn, beta and acinar unseen
# (`fit --batch-key donor`; docs/results/unseen.md): energy AUROC of the chosen chain 0.956 /
# 0.969 / 0.635 / 0.973 (svm, lr, svm, svm; scdae chosen without a batch key: 0.389), of LR
# 0.936 / 0.969 / 0.814 / 0.980; at the threshold, unseen / known cells flagged 54.9% / 2.9%
# against LR's 43.1% / 2.2% (the worst fold's known cells 5.7% against 3.8%).
ENERGY_SOURCE = "lr"


@dataclass
class Candidates:
    """Every chain's validation scores, and each chain's calibrated probabilities on the same
    validation cells (``y``): the split's validation part, or every fold's held-out cells."""

    scores: pd.DataFrame
    fold_scores: pd.DataFrame | None
    y: np.ndarray
    probas: dict[str, np.ndarray]
    split: FittedChains | None = None
    grouped: GroupedFit | None = None
    validation_cells: anndata.AnnData | None = None

    @property
    def fold_of_cell(self) -> np.ndarray | None:
        return None if self.grouped is None else next(iter(self.grouped.out_of_fold.values()))["fold"]


def _scores(chains: dict[str, Chain]) -> pd.DataFrame:
    rows = [{"chain": name, "seed": 0, **{k: v for k, v in chain.metrics.items() if k.startswith("val_")}}
            for name, chain in chains.items()]
    return pd.DataFrame(rows)


def train_candidates(reference: anndata.AnnData, folds: BatchFolds | None, names: list[str], *, seed: int,
                     params: dict | None, val_fraction: float, labels_key: str, layer: str | None,
                     executor: Executor | None = None, checkpoints_on: str = "held_out") -> Candidates:
    """Train every chain (a progress bar counts them, fold by fold); with an ``executor``, the
    folds at once as its tasks (one split: each base's chains as a task). ``checkpoints_on``:
    where each fold picks its checkpoints (`model.grouped.fit_folds`)."""
    pairs = [(n.partition("+")[0], n.partition("+")[2] or "none") for n in names]
    kw = {"seed": seed, "params": params, "val_fraction": val_fraction, "labels_key": labels_key, "layer": layer}
    total = len(names) * (len(folds.folds) if folds else 1)
    with tqdm(total=total, desc="fit chains", unit="chain", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        if folds is None:
            split = fit_chains(reference, pairs, progress=lambda name: bar.update(), executor=executor, **kw)
        else:
            grouped = fit_folds(reference, folds, pairs, progress=lambda name: bar.update(), executor=executor,
                                keep=(ENERGY_SOURCE,), checkpoints_on=checkpoints_on, **kw)
    if folds is None:
        cells = reference[np.sort(split.val)]
        y = pd.Categorical(cells.obs[LABEL].astype(str), categories=split.classes).codes
        probas = {name: split.chains[name].predict_proba(cells) for name in names}
        return Candidates(_scores(split.chains), None, y, probas, split=split, validation_cells=cells)
    probas = {}
    for name in names:  # one temperature a chain, on its pooled out-of-fold logits, as its refit gets
        part = grouped.out_of_fold[name]
        y, probas[name] = out_of_fold_predictions(grouped, name, fit_temperature(part["logits"], part["y"]))
    return Candidates(grouped.scores, grouped.fold_scores, y, probas, grouped=grouped)


def offer_ensemble(found: Candidates, folds: BatchFolds | None) -> dict | None:
    """Add the ensemble of the two best chains to the candidates (`model.ensemble`), if any."""
    names = list(found.probas)
    offered = candidate(found.scores, found.probas, found.y, found.probas[names[0]].shape[1], found.fold_of_cell,
                        prefer=list(CHAINS_SIMPLEST_FIRST))
    if offered is None:
        return None
    found.scores = pd.concat([found.scores, pd.DataFrame([offered["row"]])], ignore_index=True)
    if folds is not None:
        rows = [{"held_out": ",".join(held), "n_val": int(val.size), "chain": ENSEMBLE, "val_macro_f1": f1}
                for (held, _, val), f1 in zip(folds.folds, offered["per_fold"], strict=True)]
        found.fold_scores = pd.concat([found.fold_scores, pd.DataFrame(rows)], ignore_index=True)
    return offered


def choose(found: Candidates, folds: BatchFolds | None) -> str:
    """The one-SE rule on the split's validation, or its paired form over folds."""
    if folds is None:
        return str(choose_per_seed(found.scores, prefer=PREFER, method_key="chain", one_se=True)["chain"].iloc[0])
    chosen, gap_se = choose_on_folds(found.fold_scores, PREFER)
    found.scores["val_gap_to_best_se"] = found.scores["chain"].map(gap_se)
    return chosen


def build_chosen(found: Candidates, folds: BatchFolds | None, chosen: str, offered: dict | None,
                 reference: anndata.AnnData, **options) -> tuple[Chain, tuple[np.ndarray, np.ndarray], dict]:
    """The chain to export, its (labels, probabilities) on the validation cells, and every chain
    built on the way, by name, as each would be exported alone (`build_candidates` reuses them);
    the export's ``--flag-unseen`` energy is ``ENERGY_SOURCE``'s where that chain was a candidate.
    ``refit(name, chain, reference, trained rows, validation rows)`` (an option), if given, takes each chain
    built before it joins the export (a reference read in chunks: `experiments.fit_stream`)."""
    members = offered["members"] if chosen == ENSEMBLE else [chosen]
    built = {name: _built(found, folds, name, reference, **options) for name in members}
    if chosen == ENSEMBLE:
        chain, validation = _ensemble(offered, list(built.values()), folds, found), (found.y, offered["probabilities"])
    else:  # grouped: the refit's temperature is the one these out-of-fold probabilities were scaled by
        chain, validation = built[chosen], (found.y, found.probas[chosen])
    if chosen != ENERGY_SOURCE and ENERGY_SOURCE in found.probas:
        # Read for its energy only: as the sample trained it, which its threshold was set on (`fit_stream`).
        alone = {k: v for k, v in options.items() if k != "refit"}
        source = built.get(ENERGY_SOURCE) or _built(found, folds, ENERGY_SOURCE, reference, **alone)
        if "refit" not in options:  # then it is also the chain exported alone
            built.setdefault(ENERGY_SOURCE, source)
        chain = with_energy_of(chain, source, ENERGY_SOURCE)
    if folds is not None and ENERGY_SOURCE in found.grouped.fold_modules:
        chain = _cross_fitted(chain, found.grouped, options.get("seed", 0))
    return chain, validation, {**built, chosen: chain}


def build_candidates(found: Candidates, folds: BatchFolds | None, names: list[str], built: dict[str, Chain],
                     reference: anndata.AnnData, **options) -> dict[str, Chain]:
    """Every candidate as it would have been exported had it been chosen (``built``: those already
    made, `build_chosen`'s): to score them all on a query of one's own without training each alone."""
    return {name: built.get(name) or _built(found, folds, name, reference, **options) for name in names}


def _cross_fitted(chain: Chain, grouped: GroupedFit, seed: int) -> Chain:
    """``chain`` with ``ENERGY_SOURCE``'s fold models and their held-out cells' energies: a new
    cell is then read against the models that scored those cells (a conformal p-value) rather
    than the refit against their energies. Four human pancreas donors held out in turn, beta and
    acinar unseen, `fit --batch-key donor` with its default chains (`bench/flag_unseen.py`):
    unseen / known cells flagged 58.5% / 2.7% against 43.1% / 2.2% for the refit's energy
    against the fold quantile (docs/results/unseen.md)."""
    part = grouped.out_of_fold[ENERGY_SOURCE]
    temperature = fit_temperature(part["logits"], part["y"])  # the refit's (`out_of_fold_metrics`)
    energies = energy(part["logits"], temperature)
    by_fold = [energies[part["fold"] == k] for k in range(len(grouped.folds.folds))]
    return with_fold_energies(chain, grouped.fold_modules[ENERGY_SOURCE], by_fold, temperature=temperature, seed=seed)


def _built(found: Candidates, folds: BatchFolds | None, name: str, reference: anndata.AnnData, refit=None,
           **options) -> Chain:
    """A candidate as exported: the split's chain, or refitted on every cell after grouped validation."""
    if folds is None:
        chain, trained, val = found.split.chains[name], np.sort(found.split.train), np.sort(found.split.val)
    else:  # the refit trained on every cell: none is left to validate on
        chain, trained, val = refit_on_every_cell(reference, found.grouped, name, **options), np.arange(reference.n_obs), None
    return chain if refit is None else refit(name, chain, reference, trained, val)


def _ensemble(offered: dict, built: list[Chain], folds: BatchFolds | None, found: Candidates) -> Chain:
    """The chosen ensemble: its validation row, and the thresholds `annotate` reads, from the
    validation cells (stratified) or the folds' held-out cells (grouped: the members' pooled
    energies weighted, the first member's expression scores)."""
    metrics = {k: v for k, v in offered["row"].items() if k.startswith("val_")}
    chain = ensemble_chain(built, offered["weights"], offered["members"], metrics)
    if folds is None:
        metrics.update(module_thresholds(chain.module, found.validation_cells.X))
    else:
        oof = found.grouped.out_of_fold
        energies = sum(w * energy(oof[name]["logits"], m.metrics["temperature"])
                       for name, w, m in zip(offered["members"], offered["weights"], built, strict=True))
        metrics.update(annotate_thresholds(offered["probabilities"], energies,
                                           oof[offered["members"][0]]["expression"]))
        chain.config["fit"].update({"folds": [{"held_out": ",".join(held), "n_val": int(val.size)}
                                              for held, _, val in folds.folds]})
    chain.config["metrics"] = metrics
    return chain
