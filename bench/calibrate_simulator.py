"""Print the simulator's calibration: plain logistic regression top-1 in Default and Data Scarce.

A plain LR (normalise to 1e4 counts, log1p, standardise with train mean/sd, scikit-learn's
LogisticRegression with its defaults, L2, C=1) is trained on each seed's train split and scored
on its test split, mean and sd over seeds. The paper's LR: 0.9285 (Default), 0.8188 (Data Scarce).

Then (``--heldout``, seed 0's split of each setting) how much harder a new individual is: for
each individual b, the same LR trained on the split's train cells of the other individuals and
scored on b's cells of the split's types that it never trained on, against the LR trained on as
many train cells drawn from every individual and scored on the split's test part.

    .venv/bin/python bench/calibrate_simulator.py [--atlas data/atlas.h5ad] [--seeds 5] [--heldout]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from cellcontrast.core.names import LABEL
from cellcontrast.core.params import load_params, setting_params
from cellcontrast.data.atlas import read_atlas
from cellcontrast.data.simulate import simulate_atlas
from cellcontrast.data.splits import make_split

PAPER_LR_TOP1 = {"default": 0.9285, "scarce": 0.8188}


def log_normalise(X):
    X = X.multiply(1e4 / np.maximum(X.sum(axis=1), 1)).tocsr()
    X.data = np.log1p(X.data)
    return X.toarray()


def lr_top1(adata, split, train=None, test=None) -> float:
    y = adata.obs[LABEL].astype(str).to_numpy()
    train = split.indices["train"] if train is None else train
    test = split.indices["test"] if test is None else test
    scaler = StandardScaler().fit(log_normalise(adata.X[train]))
    fit = lambda idx: scaler.transform(log_normalise(adata.X[idx]))  # noqa: E731
    model = LogisticRegression(max_iter=300).fit(fit(train), y[train])
    return float((model.predict(fit(test)) == y[test]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--atlas", default=None, help="h5ad (default: simulate at params.yaml's defaults)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--heldout", action="store_true", help="also: LR on a held-out individual vs a random split")
    args = parser.parse_args()
    params = load_params(args.params)
    t0 = time.time()
    adata = read_atlas(args.atlas) if args.atlas else simulate_atlas(
        n_cells=params["simulate"]["cells"], n_types=params["simulate"]["types"],
        n_genes=params["simulate"]["genes"], seed=params["simulate"]["seed"],
    )
    print(f"atlas: {adata.n_obs} cells x {adata.n_vars} genes ({time.time() - t0:.1f} s)")
    print("| setting | K | cells/type | LR top-1 (mean ± sd over seeds) | paper LR |")
    print("|---|---|---|---|---|")
    for setting in ("default", "scarce"):
        s = setting_params(params, setting)
        scores = []
        for seed in range(args.seeds):
            split = make_split(adata.obs[LABEL], s["k"], s["cap"], seed, s["fractions"], s["equalize"])
            scores.append(lr_top1(adata, split))
        n = min(split.n_per_type.values())
        print(f"| {setting} | {len(split.classes)} | {n} | {np.mean(scores):.4f} ± {np.std(scores, ddof=1) if len(scores) > 1 else 0:.4f} | {PAPER_LR_TOP1[setting]} |", flush=True)
    if args.heldout:
        heldout_table(adata, params)


def heldout_table(adata, params: dict, batch_key: str = "individual") -> None:
    """LR top-1 on a held-out individual against a random split with as many training cells."""
    print(f"\n| setting | held out | train cells | random split top-1 | held-out {batch_key} top-1 | drop |")
    print("|---|---|---|---|---|---|")
    batches = adata.obs[batch_key].astype(str).to_numpy()
    labels = adata.obs[LABEL].astype(str).to_numpy()
    for setting in ("default", "scarce"):
        s = setting_params(params, setting)
        split = make_split(adata.obs[LABEL], s["k"], s["cap"], 0, s["fractions"], s["equalize"])
        train = split.indices["train"]
        drops = []
        for b in sorted(set(batches)):
            own = train[batches[train] != b]
            unseen = np.setdiff1d(np.flatnonzero((batches == b) & np.isin(labels, split.classes)), train)
            mixed = np.sort(np.random.default_rng(0).choice(train, size=own.size, replace=False))
            random_top1 = lr_top1(adata, split, train=mixed)
            held_top1 = lr_top1(adata, split, train=own, test=unseen)
            drops.append(random_top1 - held_top1)
            print(f"| {setting} | {b} | {own.size} | {random_top1:.4f} | {held_top1:.4f} | {drops[-1]:+.4f} |", flush=True)
        print(f"| {setting} | mean | | | | {np.mean(drops):+.4f} |", flush=True)


if __name__ == "__main__":
    main()
