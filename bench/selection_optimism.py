"""How optimistic is the grouped-validation score when a chain's checkpoints are picked on the
held-out batch it is scored on?

`fit --batch-key` trains each chain on all but one batch of the reference and makes its inner
choices (LR's genes and L2, a deep base's or component's best epoch) on the held-out batch, then
scores it there. A chain with many checkpoints (a contrastive component whose epoch is picked by
the held-out cells' nearest-centroid macro F1, then the centroid head scored on the same cells)
is scored at its best epoch for those very cells. This script runs the folds both ways through
`model.grouped.fit_folds` (``checkpoints_on="held_out"``, what `fit` does, and
``"training_batches"``: the choices on a stratified part of the training batches, the held-out
batch only scored) and prints each chain's fold-mean score and what the one-SE rule picks each way;
``--summary CSV`` prints, over the folds in that CSV, each chain's mean score both ways and
the paired difference (the optimism) with its standard error.

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/selection_optimism.py \\
        --fold-dir ../heldout-head/human/heldout_human1 --batch-key donor \\
        --chains lr,svm,lr+mlp --params '{"mlp": {"head_solver": "centroid"}}' --csv optimism.csv
    .venv/bin/python bench/selection_optimism.py --summary optimism.csv
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from cellcontrast.core.names import CHAINS_SIMPLEST_FIRST
from cellcontrast.data.atlas import prepare_atlas
from cellcontrast.experiments.fit_annotator import cross_batch_positives
from cellcontrast.model.gene_panel import gene_panel
from cellcontrast.model.grouped import CHECKPOINTS_ON, batch_folds, choose_on_folds, fit_folds


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fold-dir", type=Path, help="holds reference.h5ad")
    p.add_argument("--batch-key")
    p.add_argument("--summary", type=Path, help="summarise the rows of this CSV instead of fitting")
    p.add_argument("--chains", default="lr,svm,lr+mlp")
    p.add_argument("--params", help="JSON of hyperparameters keyed by model name, as `fit --params`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path, help="append one row per (mode, chain)")
    return p.parse_args(argv)


def summary(rows: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Each chain's fold-mean score both ways, the optimism (held_out minus training_batches,
    paired over folds) and its standard error, and what the one-SE rule chose on each fold."""
    wide = rows.pivot_table(index=["chain", "fold"], columns="checkpoints_on", values="selection_score")
    gap = (wide["held_out"] - wide["training_batches"]).groupby(level=0)
    out = wide.groupby(level=0).mean().assign(optimism=gap.mean(), optimism_se=gap.std(ddof=1) / np.sqrt(gap.size()),
                                              folds=gap.size().astype(str))
    chosen = rows.drop_duplicates(["fold", "checkpoints_on"]).pivot(index="fold", columns="checkpoints_on", values="chosen")
    return out, chosen


def main(args) -> int:
    if args.summary:
        out, chosen = summary(pd.read_csv(args.summary))
        print(out.to_markdown(floatfmt=".3f"))
        print(chosen.to_markdown())
        return 0
    if args.fold_dir is None or args.batch_key is None:
        raise SystemExit("--fold-dir and --batch-key are needed to fit (or --summary CSV)")
    reference = prepare_atlas(ad.read_h5ad(args.fold_dir / "reference.h5ad"), source="the reference")
    reference = gene_panel(reference, None, source="the reference")
    folds = batch_folds(reference.obs, args.batch_key, seed=args.seed)
    chains = [tuple((c.strip() + "+none").split("+")[:2]) for c in args.chains.split(",") if c.strip()]
    params = cross_batch_positives(json.loads(args.params) if args.params else None)  # as `fit --batch-key`
    fold = f"{args.fold_dir.parent.name}/{args.fold_dir.name}"
    rows = []
    for mode in CHECKPOINTS_ON:
        t0 = time.perf_counter()
        grouped = fit_folds(reference, folds, chains, seed=args.seed, params=params, checkpoints_on=mode)
        chosen, _ = choose_on_folds(grouped.fold_scores, list(CHAINS_SIMPLEST_FIRST))
        for name, score in grouped.scores.set_index("chain")["val_macro_f1"].items():
            rows.append({"fold": fold, "checkpoints_on": mode, "chain": name, "selection_score": round(float(score), 4),
                         "chosen": chosen, "params": args.params or "", "seconds": round(time.perf_counter() - t0, 1)})
    table = pd.DataFrame(rows)
    print(table.to_markdown(index=False))
    if args.csv:
        table.to_csv(args.csv, mode="a", header=not args.csv.exists(), index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse()))
