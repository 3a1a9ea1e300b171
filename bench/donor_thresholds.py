"""Do novelty thresholds taken on a *held-out training donor* survive a new donor better than
thresholds taken on stratified validation cells?

    python bench/donor_thresholds.py --split-dir S_HELDOUT_UNSEEN [--batch-key individual]

``S_HELDOUT_UNSEEN`` is a ``heldout`` split made with ``--unseen-types N``: its test part is a
donor no model here sees. LR (default recipe) is fitted on the split's train part with its
validation part (stratified, from the training donors: what ``cellcontrast fit`` does), and the
flags of ``annotate`` are applied to the test cells with thresholds from:

- that validation part (energy's 95th, the expression score's 99th percentile), and
- each training donor in turn, held out of a fit on the other training donors (the mean of the
  per-donor percentiles), applied to the same model.

Prints one JSON line per fit: the share of unseen-type and of seen-type test cells that come out
``Unassigned`` (top probability under 0.5, or the score above its threshold).
"""

from __future__ import annotations

import argparse
import json

import anndata as ad
import numpy as np
import scipy.sparse as sp

from cellcontrast.data.split_data import load_split_data
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.chain import build_chain
from cellcontrast.train.open_set import NoveltyScorer, auroc

QUANTILES = {"energy": 0.95, "expression": 0.99}  # the annotator's val_energy_q95, val_expression_q99
MIN_CONFIDENCE = 0.5


def _scores(x, y, train, val, n_classes: int, seed: int, *more):
    """LR fitted on ``train`` (choices on ``val``); the novelty scores of val and of each of ``more``."""
    model = fit_base(x[train], y[train], x[val], y[val], n_classes, "lr", seed=seed)
    scorer = NoveltyScorer(build_chain(model), x[train], y[train], seed)
    return [scorer.scores(part) for part in (x[val], *more)]


def _unassigned(scores: dict, thresholds: dict) -> dict:
    low = scores["max_prob"] > 1.0 - MIN_CONFIDENCE
    rates = {"no flag": float(low.mean())}
    for name, threshold in thresholds.items():
        rates[name] = float((low | (scores[name] > threshold)).mean())
    return rates


def _report(label: str, seen: dict, unseen: dict, thresholds: dict, **extra) -> None:
    s, u = _unassigned(seen, thresholds), _unassigned(unseen, thresholds)
    print(json.dumps({"thresholds_from": label, **extra,
                      "thresholds": {k: round(float(v), 3) for k, v in thresholds.items()},
                      "unassigned_unseen_seen": {k: [round(u[k], 3), round(s[k], 3)] for k in s}}), flush=True)


def donors_of(split_dir: str, key: str) -> np.ndarray:
    """The donor of each train then validation cell (the order of ``load_split_data``)."""
    return np.concatenate([ad.read_h5ad(f"{split_dir}/{part}.h5ad", backed="r").obs[key].astype(str).to_numpy()
                           for part in ("train", "val")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split-dir", required=True, help="a heldout split made with --unseen-types N")
    p.add_argument("--batch-key", default=None, help="obs column of the donors (default: the split's)")
    args = p.parse_args(argv)
    data = load_split_data(args.split_dir)
    if not data.unseen_types:
        raise SystemExit(f"{args.split_dir} has no unseen types; make it with --unseen-types N")
    key = args.batch_key or data.info.get("batch_key")
    if not key:
        raise SystemExit(f"{args.split_dir} names no batch key; give --batch-key")
    seed = int(data.info["seed"])
    donors = donors_of(args.split_dir, key)
    if (n_donors := len(set(donors))) < 2:
        raise SystemExit(f"{args.split_dir} has {n_donors} training donor(s) in {key!r}; holding one out needs two")
    x = sp.vstack([data.X["train"], data.X["val"]]).tocsr()
    y = np.concatenate([data.y["train"], data.y["val"]])
    n_train = data.X["train"].shape[0]
    test, unseen, k = data.X["test"], data.X["unseen"], len(data.classes)

    val, seen, new = _scores(x, y, np.arange(n_train), np.arange(n_train, x.shape[0]), k, seed, test, unseen)
    stratified = {name: np.quantile(val[name], q) for name, q in QUANTILES.items()}
    _report("stratified validation", seen, new, stratified,
            auroc={name: round(auroc(seen[name], new[name]), 3) for name in QUANTILES})

    per_donor = []
    for donor in sorted(set(donors)):
        held = donors == donor
        (donor_val,) = _scores(x, y, np.flatnonzero(~held), np.flatnonzero(held), k, seed)
        per_donor.append({name: np.quantile(donor_val[name], q) for name, q in QUANTILES.items()})
        print(json.dumps({"donor_held_out": donor, "cells": int(held.sum()),
                          "thresholds": {n: round(float(v), 3) for n, v in per_donor[-1].items()}}), flush=True)
    _report("held-out training donors (mean)", seen, new,
            {name: float(np.mean([t[name] for t in per_donor])) for name in QUANTILES})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
