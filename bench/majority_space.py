"""Which space majority voting should over-cluster in: the query's own expression (a PCA of its
log-normalised, scaled highly variable genes, as CellTypist does, with scanpy) or the model's
square-root class probabilities (what `annotate --majority-voting` uses). Same kNN graph and
Leiden code (`cellcontrast.annotation.majority.over_cluster`) on both.

    python bench/majority_space.py --data-dir ../shared/data --atlas data/atlas.h5ad

Per dataset, an LR chain is fitted on a reference part and annotates the query part (cbmc,
kidney: halves of a seeded permutation; pancreas: donor mouse2 -> mouse1; the atlas: 20,000
cells not in a 20,000-cell reference). Prints the per-cell accuracy, and for each space the
number of clusters, the best accuracy any vote over those clusters could reach (voting with the
true labels: the clusters' purity) and the accuracy of majority voting.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc

import cellcontrast as cc
from cellcontrast.annotation.majority import majority_vote, over_cluster


def _query_pca(query: ad.AnnData) -> np.ndarray:
    a = query.copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=min(2000, a.n_vars - 1), subset=True)
    sc.pp.scale(a, max_value=10)
    sc.pp.pca(a, n_comps=min(50, a.n_vars - 1, a.n_obs - 1))
    return a.obsm["X_pca"].astype(np.float32)


def _compare(name: str, reference: ad.AnnData, query: ad.AnnData, folder: Path) -> dict:
    model = folder / f"{name}.onnx"
    cc.fit(reference, "cell_type", base="lr").export(model)
    cc.annotate(query, model, probabilities=True, min_confidence=0.0)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    labels = query.obs["cellcontrast_label"].astype(str).to_numpy()
    row = {"dataset": name, "query_cells": query.n_obs, "per_cell_acc": float((labels == truth).mean())}
    spaces = {"query PCA": _query_pca(query),
              "sqrt probabilities": np.sqrt(query.obsm["cellcontrast_probabilities"]).astype(np.float32)}
    for space, points in spaces.items():
        clusters = over_cluster(points)
        purity, _ = majority_vote(pd.Categorical(truth), clusters)
        voted, _ = majority_vote(pd.Categorical(labels), clusters)
        row[f"{space}: clusters"] = int(clusters.max() + 1)
        row[f"{space}: purity"] = float((np.asarray(purity) == truth).mean())
        row[f"{space}: majority_acc"] = float((np.asarray(voted) == truth).mean())
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--atlas", default=None, help="the simulated atlas (make run's data/atlas.h5ad)")
    args = p.parse_args(argv)
    data = Path(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("cbmc_citeseq_15types", "human_kidney_11types"):
            a = ad.read_h5ad(data / f"{name}.h5ad")
            order = np.random.default_rng(0).permutation(a.n_obs)
            half = a.n_obs // 2
            rows.append(_compare(name, a[np.sort(order[:half])].copy(), a[np.sort(order[half:])].copy(), Path(tmp)))
        a = ad.read_h5ad(data / "baron_mouse_pancreas_2donors.h5ad")
        donor = a.obs["donor"].astype(str)
        rows.append(_compare("pancreas mouse2 -> mouse1", a[donor == "mouse2"].copy(), a[donor == "mouse1"].copy(),
                             Path(tmp)))
        if args.atlas:
            a = ad.read_h5ad(args.atlas)
            order = np.random.default_rng(0).permutation(a.n_obs)
            rows.append(_compare("atlas 20k -> 20k", a[np.sort(order[:20000])].copy(),
                                 a[np.sort(order[20000:40000])].copy(), Path(tmp)))
    print(pd.DataFrame(rows).round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
