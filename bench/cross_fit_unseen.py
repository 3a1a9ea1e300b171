"""Unseen types on a new donor: does scoring it with the fold models that set the threshold catch
more of them than the refit annotator does?

`fit --batch-key` sets the `--flag-unseen` energy threshold on the reference's held-out donors,
each scored by a fold model trained on the others, and the annotator refitted on every donor
then scores the new donor. On the human pancreas it flags 2.2% of the new donor's known cells
(the threshold aims at 5%) and catches 43% of the unseen ones (docs/results/unseen.md). This
diagnostic compares, on the splits `cellcontrast split --setting heldout --batch-key donor
--holdout D --unseen-types 2` writes (reference: ``train.h5ad`` + ``val.h5ad``, the unseen types
removed; new donor: ``test.h5ad``), with LR fitted by `cc.fit_annotator` (one validation part)
and its energy read through `cc.annotate(..., flag_unseen=True)`:

- ``refit``: a cell is flagged when the refit's energy exceeds the 95th percentile of the
  held-out donors' energies under their fold models (the rule `fit --batch-key` follows);
- ``cross-fit``: a conformal p-value, the share of held-out cells whose energy under their own
  fold model is at least the cell's energy under that same model; flagged below 0.05.

Prints unseen and known cells flagged, and the AUROC of each score, per fold and on average.

    .venv/bin/python bench/cross_fit_unseen.py --splits '../unseen/split_human*'
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

import cellcontrast as cc

ALPHA = 0.05


def _energy(reference: ad.AnnData, cells: list[ad.AnnData], work: Path, name: str, seed: int) -> list[np.ndarray]:
    """LR fitted on ``reference``; its energy on each AnnData of ``cells``."""
    model = work / f"{name}.onnx"
    cc.fit_annotator(reference, "cell_type", chains=["lr"], val_folds=0, ensemble=False, experiment=None,
                     register=False, seed=seed, out=model)
    energies = []
    for adata in cells:
        copy = adata.copy()
        cc.annotate(copy, str(model), flag_unseen=True)
        energies.append(copy.obs["cellcontrast_energy"].to_numpy(dtype=np.float64))
    return energies


def fold_row(split: Path, batch_key: str, seed: int) -> dict:
    reference = ad.concat([ad.read_h5ad(split / "train.h5ad"), ad.read_h5ad(split / "val.h5ad")])
    query = ad.read_h5ad(split / "test.h5ad")
    known = query.obs["cell_type"].astype(str).isin(set(reference.obs["cell_type"].astype(str))).to_numpy()
    donors = sorted(reference.obs[batch_key].astype(str).unique())
    calibration, on_query = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for donor in donors:
            held = (reference.obs[batch_key].astype(str) == donor).to_numpy()
            held_energy, query_energy = _energy(reference[~held].copy(), [reference[held], query], Path(tmp),
                                                donor, seed)
            calibration.append(np.sort(held_energy))
            on_query.append(query_energy)
        (refit,) = _energy(reference, [query], Path(tmp), "refit", seed)
    pooled = np.concatenate(calibration)
    threshold = np.quantile(pooled, 1 - ALPHA)
    # at least as unfamiliar: held-out cells whose energy is >= the query cell's, model by model
    at_least = sum(len(e) - np.searchsorted(e, q, side="left") for e, q in zip(calibration, on_query, strict=True))
    p_value = (1 + at_least) / (len(pooled) + 1)
    flagged = {"refit": refit > threshold, "cross-fit": p_value <= ALPHA}
    row = {"split": split.name, "unseen_cells": int((~known).sum()), "known_cells": int(known.sum())}
    for method, flag in flagged.items():
        row[f"{method}_unseen_flagged"] = round(float(flag[~known].mean()), 4)
        row[f"{method}_known_flagged"] = round(float(flag[known].mean()), 4)
    row["refit_auroc"] = round(float(roc_auc_score(~known, refit)), 4)
    row["cross-fit_auroc"] = round(float(roc_auc_score(~known, -p_value)), 4)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--splits", required=True, help="a glob of split folders (each with train, val and test .h5ad)")
    p.add_argument("--batch-key", default="donor")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = []
    for split in sorted(Path(s) for s in glob.glob(args.splits)):
        rows.append(fold_row(split, args.batch_key, args.seed))
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame(rows).set_index("split")
    table.loc["mean"] = table.mean(numeric_only=True)
    print(table.round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
