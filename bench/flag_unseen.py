"""`annotate --flag-unseen` as a user runs it, on a split with unseen types: how many cells of
the types the reference lacks come out Unassigned, and how many of the others.

    python bench/flag_unseen.py --split-dir S_UNSEEN --work-dir W [--chains lr] [--batch-key donor]

``S_UNSEEN`` is a split made with ``--unseen-types N``: its train and validation parts (the
unseen types removed) are the reference, its test part the query (the seen types' test cells
and every test cell of the unseen types). Runs the commands a user types:

1. ``cellcontrast fit --reference W/reference.h5ad --chains CHAINS --out W/annotator.onnx``
   (its own stratified validation part; the expression score fitted on its training part), or
   with ``--batch-key KEY`` (a held-out-batch split: the reference's own batches held out in
   turn, so the thresholds come from cells of batches the fold models never saw);
2. ``cellcontrast annotate W/annotator.onnx W/query.h5ad --min-confidence 0.5`` with no flag,
   with ``--flag-unseen`` (energy) and with ``--flag-unseen expression``;

and prints one JSON line per run: the share of unseen-type and of seen-type cells labelled
``Unassigned``, the accuracy on the seen types' cells that kept a label, and the AUROC (unseen
against seen cells) of each novelty score the run wrote (1 - confidence, energy or its p-value
under the fold models, expression).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np

from cellcontrast.core.names import LABEL


def _cellcontrast(work: Path, *args: str) -> None:
    """A command in ``work`` (its MLflow store, mlflow.db, stays there)."""
    subprocess.run([sys.executable, "-m", "cellcontrast", *args], check=True, stdout=subprocess.DEVNULL,
                   cwd=work)


def _aurocs(obs, is_unseen: np.ndarray) -> dict:
    """AUROC, unseen against seen cells, of each novelty score among the annotated columns."""
    from sklearn.metrics import roc_auc_score

    scores = {"auroc_1-confidence": 1.0 - obs["cellcontrast_confidence"].to_numpy(dtype=float)}
    for name in ("energy", "expression"):
        if f"cellcontrast_{name}" in obs:
            scores[f"auroc_{name}"] = obs[f"cellcontrast_{name}"].to_numpy(dtype=float)
    if "cellcontrast_energy_p" in obs:  # a cross-fitted annotator: lower p, less familiar
        scores["auroc_energy_p"] = 1.0 - obs["cellcontrast_energy_p"].to_numpy(dtype=float)
    return {k: round(float(roc_auc_score(is_unseen, v)), 4) for k, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split-dir", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--chains", default="lr")
    p.add_argument("--min-confidence", default="0.5")
    p.add_argument("--batch-key", help="fit with --batch-key KEY (grouped validation, thresholds from held-out batches)")
    args = p.parse_args(argv)
    split, work = Path(args.split_dir).resolve(), Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    info = json.loads((split / "split.json").read_text())
    unseen = set(info.get("unseen_types") or [])
    if not unseen:
        raise SystemExit(f"{split} has no unseen types; make it with --unseen-types N")
    reference = ad.concat([ad.read_h5ad(split / "train.h5ad"), ad.read_h5ad(split / "val.h5ad")])
    reference.write_h5ad(work / "reference.h5ad")
    ad.read_h5ad(split / "test.h5ad").write_h5ad(work / "query.h5ad")
    model = work / "annotator.onnx"
    grouped = ["--batch-key", args.batch_key] if args.batch_key else []
    _cellcontrast(work, "fit", "--reference", str(work / "reference.h5ad"), "--chains", args.chains, "--out", str(model),
                  "--no-register", *grouped)
    for name, flag in (("no flag", []), ("--flag-unseen", ["--flag-unseen"]),
                       ("--flag-unseen expression", ["--flag-unseen", "expression"])):
        out = work / f"annotated_{len(flag)}.h5ad"
        _cellcontrast(work, "annotate", str(model), str(work / "query.h5ad"), "--out", str(out),
                      "--min-confidence", args.min_confidence, *flag)
        obs = ad.read_h5ad(out).obs
        truth = obs[LABEL].astype(str).to_numpy()
        label = obs["cellcontrast_label"].astype(str).to_numpy()
        is_unseen = np.isin(truth, list(unseen))
        kept = ~is_unseen & (label != "Unassigned")
        print(json.dumps({
            "split": str(split), "chains": args.chains, "batch_key": args.batch_key or "", "run": name,
            "min_confidence": args.min_confidence,
            "unseen_cells": int(is_unseen.sum()), "seen_cells": int((~is_unseen).sum()),
            "unseen_unassigned": round(float((label[is_unseen] == "Unassigned").mean()), 4),
            "seen_unassigned": round(float((label[~is_unseen] == "Unassigned").mean()), 4),
            "seen_accuracy_of_labelled": round(float((label[kept] == truth[kept]).mean()), 4),
            **_aurocs(obs, is_unseen),
        }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
