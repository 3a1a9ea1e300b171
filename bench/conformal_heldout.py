"""Conformal prediction sets on held-out donors: does the coverage hold on a donor the
annotator never saw, and how large are the sets?

Reads the folds `bench/heldout_user_path.py` wrote (``OUT/<dataset>/heldout_<donor>/`` with
``query.h5ad`` and one annotator per variant, ``<variant>/annotator.onnx``): for each annotator,
`cc.annotate(query, annotator, coverage=c, conformal_score=s)` at c = 0.90 and 0.95 and every
score, on the query cells whose type the reference holds. Prints per fold and on average:
the empirical coverage (share of cells whose true label is in the set), the mean set size,
the share of empty sets, and the top-k set that reaches the same coverage on that donor (the
smallest k; a top-k set reads the test labels to pick k, so it is a yardstick, not a method).
``cc_batchkey`` annotators are calibrated on the reference's held-out donors (grouped
validation), ``cc_nobatch`` ones on a random validation part of the reference's own donors.

    .venv/bin/python bench/conformal_heldout.py --runs ../heldout-head --datasets human,mouse \\
        --variants cc_batchkey,cc_nobatch --csv ../heldout-head/conformal.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import cellcontrast as cc

COVERAGES = (0.90, 0.95)
SCORES = ("lac", "aps", "class")


def _fold_rows(fold: Path, variant: str) -> list[dict]:
    model = fold / variant / "annotator.onnx"
    if not model.exists():
        return []
    annotator = cc.Annotator.load(model)
    query = ad.read_h5ad(fold / "query.h5ad")
    query = query[query.obs["cell_type"].astype(str).isin(annotator.classes).to_numpy()].copy()
    truth = query.obs["cell_type"].astype(str).to_numpy()
    rows = []
    for score in SCORES:
        for coverage in COVERAGES:
            out = cc.annotate(query, annotator, coverage=coverage, conformal_score=score, probabilities=True,
                              copy=True)
            sets = out.obs["cellcontrast_prediction_set"].astype(str).str.split("|")
            covered = np.mean([t in s for t, s in zip(truth, sets, strict=True)])
            sizes = out.obs["cellcontrast_set_size"].to_numpy()
            proba = out.obsm["cellcontrast_probabilities"]
            rank = (proba > proba[np.arange(len(truth)), [annotator.classes.index(t) for t in truth]][:, None]).sum(1)
            topk = next(k for k in range(1, proba.shape[1] + 1) if (rank < k).mean() >= covered - 1e-12)
            rows.append({"fold": fold.name.removeprefix("heldout_"), "variant": variant, "score": score,
                         "target": coverage, "coverage": float(covered), "mean_set_size": float(sizes.mean()),
                         "empty": float((sizes == 0).mean()), "topk_same_coverage": topk,
                         "top1_coverage": float((rank < 1).mean()), "n_cells": len(truth),
                         "calibration": annotator.metadata["conformity"]["source"]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", required=True, help="the --out-dir of bench/heldout_user_path.py")
    p.add_argument("--datasets", default="human,mouse")
    p.add_argument("--variants", default="cc_batchkey,cc_nobatch")
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    rows = []
    for dataset in args.datasets.split(","):
        for fold in sorted((Path(args.runs) / dataset).glob("heldout_*")):
            for variant in args.variants.split(","):
                for row in _fold_rows(fold, variant):
                    rows.append({"dataset": dataset, **row})
                    print(f"{dataset} {row['fold']} {variant} {row['score']} {row['target']:.2f}: coverage "
                          f"{row['coverage']:.3f}, mean set {row['mean_set_size']:.2f}, empty {row['empty']:.3f}, "
                          f"top-k at that coverage {row['topk_same_coverage']}", flush=True)
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    summary = table.groupby(["dataset", "variant", "score", "target"]).agg(
        coverage=("coverage", "mean"), worst_fold=("coverage", "min"), mean_set_size=("mean_set_size", "mean"),
        empty=("empty", "mean"), topk=("topk_same_coverage", "mean"), folds=("fold", "size")).reset_index()
    print(summary.to_markdown(index=False, floatfmt=".3f"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
