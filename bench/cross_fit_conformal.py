"""Why conformal sets over-cover a new donor at 0.90: the annotator scored with the models that
scored its calibration cells, or with its refit on every donor?

`fit --batch-key` calibrates its sets on the reference's held-out donors, each scored by a fold
model trained on the other donors; the annotator that then scores a new donor is refitted on
every donor, so it errs less than the models its calibration saw, and the sets come out larger
than the target needs (docs/how-to/annotate.md). This diagnostic measures that on the folds of
`bench/heldout_user_path.py` (``FOLD/reference.h5ad``: the training donors; ``FOLD/query.h5ad``:
the new donor), with one chain (``--chain``), each model fitted by `cc.fit_annotator` with one
stratified validation part:

- ``refit``: the sets split conformal `annotate` builds: the calibration scores of every training
  donor held out in turn (its fold model trained on the others), the new donor scored by the
  model fitted on every training donor;
- ``cross-fit``: the same calibration scores, the new donor scored by each fold model and the
  sets built by cross-conformal prediction (CV+; Barber et al. 2021; Vovk 2015): a label joins a
  cell's set when fewer than ``coverage x (n + 1)`` calibration cells score below the cell's score
  for that label under the calibration cell's own fold model.

Prints the coverage and mean set size on the new donor's cells of known types, per fold and on
average, for ``lac`` (1 - p(true label)), at 0.90 and 0.95.

    .venv/bin/python bench/cross_fit_conformal.py --folds ../heldout-head/human --batch-key donor
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import cellcontrast as cc

COVERAGES = (0.90, 0.95)


def _fit(reference: ad.AnnData, chain: str, seed: int):
    return cc.fit_annotator(reference, "cell_type", chains=[chain], val_folds=0, ensemble=False, experiment=None,
                            register=False, seed=seed)


def _aligned(fitted, adata: ad.AnnData, classes: list[str]) -> np.ndarray:
    """Probabilities in the order of ``classes`` (a fold model may lack a type: 0 there)."""
    proba = fitted.chain.predict_proba(adata)
    out = np.zeros((adata.n_obs, len(classes)))
    index = {name: i for i, name in enumerate(classes)}
    for j, name in enumerate(fitted.chain.classes):
        out[:, index[name]] = proba[:, j]
    return out


def fold_rows(folder: Path, batch_key: str, chain: str, seed: int) -> list[dict]:
    reference, query = ad.read_h5ad(folder / "reference.h5ad"), ad.read_h5ad(folder / "query.h5ad")
    classes = sorted(reference.obs["cell_type"].astype(str).unique())
    query = query[query.obs["cell_type"].astype(str).isin(classes).to_numpy()].copy()
    truth = pd.Categorical(query.obs["cell_type"].astype(str), categories=classes).codes
    donors = sorted(reference.obs[batch_key].astype(str).unique())
    calibration, query_proba = [], []  # per fold model: sorted lac scores of its held-out donor; p on the query
    for donor in donors:
        held = (reference.obs[batch_key].astype(str) == donor).to_numpy()
        fitted = _fit(reference[~held].copy(), chain, seed)
        cells = reference[held].copy()
        y = pd.Categorical(cells.obs["cell_type"].astype(str), categories=classes).codes
        proba = _aligned(fitted, cells, classes)
        calibration.append(np.sort(1.0 - proba[np.arange(len(y)), y]))
        query_proba.append(_aligned(fitted, query, classes))
    full = _aligned(_fit(reference, chain, seed), query, classes)
    pooled = np.sort(np.concatenate(calibration))
    n = len(pooled)
    # CV+: label y joins the set when #{i : s_i < s_k(i)(x, y)} < coverage (n + 1)
    below = sum(np.searchsorted(scores, 1.0 - proba, side="left") for scores, proba in
                zip(calibration, query_proba, strict=True))
    rows = []
    for coverage in COVERAGES:
        k = int(np.ceil((n + 1) * coverage))
        q = pooled[k - 1] if k <= n else np.inf
        sets = {"refit": full >= 1.0 - q - 1e-12, "cross-fit": below < coverage * (n + 1)}
        for method, member in sets.items():
            rows.append({"fold": folder.name, "method": method, "coverage_target": coverage,
                         "coverage": float(member[np.arange(len(truth)), truth].mean()),
                         "mean_set_size": float(member.sum(1).mean()), "empty": float((member.sum(1) == 0).mean()),
                         "top1": float((full.argmax(1) == truth).mean()), "n_calibration": n})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folds", type=Path, required=True, help="a folder of heldout_* fold folders")
    p.add_argument("--batch-key", default="donor")
    p.add_argument("--chain", default="lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", type=Path)
    args = p.parse_args(argv)
    rows = []
    for folder in sorted(args.folds.glob("heldout_*")):
        for row in fold_rows(folder, args.batch_key, args.chain, args.seed):
            print(json.dumps(row), flush=True)
            rows.append(row)
    table = pd.DataFrame(rows)
    if args.csv:
        table.to_csv(args.csv, index=False)
    summary = table.groupby(["method", "coverage_target"])[["coverage", "mean_set_size", "empty", "top1"]].mean()
    print(summary.round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
