"""Where cellcontrast trails the best peer on a user-path fold: is the gap real, and which types make it?

Reads the run folders `bench/heldout_user_path.py` leaves (any ``--split``) and, per fold, for
each cellcontrast variant against the best peer on that fold:

- the macro F1 of both, recomputed from the saved per-cell labels with the benchmark's own
  metric (the scored types present in truth or prediction);
- a paired bootstrap over the fold's scored query cells (``--resamples``, seeded): the 95%
  interval of (cellcontrast - peer) and the share of resamples where cellcontrast is behind.
  An interval that holds 0 is a gap the query cannot tell from chance;
- the per-type F1 of both with the type's query cell count, largest differences first: the
  macro F1 difference is the mean of these, so the rows say which types carry a gap.

    .venv/bin/python bench/user_path_gaps.py --run-dir /work/random-runs

Nothing is trained; it only reads predictions (needs `anndata`, `numpy`, `pandas`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

CC_VARIANTS = ("cc_batchkey", "cc_nobatch")
PEERS = ("celltypist", "svm", "logreg", "knn", "scanvi")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", type=Path, required=True, help="an --out-dir of heldout_user_path.py")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-types", type=int, default=4, help="per-type rows shown per comparison")
    p.add_argument("--csv", type=Path, help="write one row per fold and comparison here")
    p.add_argument("--variants", default=",".join(CC_VARIANTS),
                   help="cellcontrast folders of each fold to compare (each with annotated.csv)")
    return p.parse_args(argv)


def fold_dirs(run_dir: Path) -> list[Path]:
    return sorted(p.parent.parent for p in run_dir.glob("*/*/peers/predictions.csv"))


def read_fold(fold_dir: Path, variants=CC_VARIANTS) -> tuple[pd.Series, list[str], dict[str, pd.Series]]:
    """Truth of the scored query cells, the scored types, and every method's labels on them."""
    import anndata as ad

    query = ad.read_h5ad(fold_dir / "query.h5ad", backed="r")
    truth = query.obs["cell_type"].astype(str)
    genes = fold_dir / "genes.json"
    if genes.exists():  # cross-study: the types both sets hold
        score_types = json.loads(genes.read_text())["score_types"]
    else:
        ref = ad.read_h5ad(fold_dir / "reference.h5ad", backed="r")
        score_types = sorted(ref.obs["cell_type"].astype(str).unique())
    truth = truth[truth.isin(score_types)]
    preds: dict[str, pd.Series] = {}
    for variant in variants:
        f = fold_dir / variant / "annotated.csv"
        if f.exists():
            preds[variant] = pd.read_csv(f, index_col=0)["cellcontrast_label"].astype(str)
    peers = pd.read_csv(fold_dir / "peers" / "predictions.csv", index_col=0)
    for peer in PEERS[:4]:
        if peer in peers:
            preds[peer] = peers[peer].astype(str)
    f = fold_dir / "scanvi" / "pred.csv"
    if f.exists():
        preds["scanvi"] = pd.read_csv(f, index_col=0)["pred"].astype(str)
    preds = {m: s.reindex(truth.index).fillna("<missing>") for m, s in preds.items()}
    return truth, score_types, preds


def per_type_counts(truth: np.ndarray, pred: np.ndarray, n_types: int, idx: np.ndarray | None = None):
    """True positives, true counts and predicted counts per type code (codes >= n_types are misses)."""
    if idx is not None:
        truth, pred = truth[idx], pred[idx]
    hit = truth == pred
    tp = np.bincount(truth[hit], minlength=n_types)[:n_types]
    n_true = np.bincount(truth, minlength=n_types)[:n_types]
    n_pred = np.bincount(pred, minlength=n_types + 1)[:n_types]
    return tp, n_true, n_pred


def f1_per_type(tp, n_true, n_pred) -> tuple[np.ndarray, np.ndarray]:
    """Per-type F1 (0 where undefined) and which types count (present in truth or prediction)."""
    denom = n_true + n_pred
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return f1, denom > 0


def macro(tp, n_true, n_pred) -> float:
    f1, present = f1_per_type(tp, n_true, n_pred)
    return float(f1[present].mean()) if present.any() else 0.0


def encode(truth: pd.Series, pred: pd.Series, score_types: list[str]) -> tuple[np.ndarray, np.ndarray]:
    code = {t: i for i, t in enumerate(score_types)}
    other = len(score_types)  # any label outside the scored types: a miss, never a type of its own
    return (np.array([code[t] for t in truth]), np.array([code.get(p, other) for p in pred]))


def paired_bootstrap(truth, cc, peer, n_types: int, resamples: int, seed: int) -> np.ndarray:
    """Macro F1 difference (cc - peer) on resamples of the scored cells, labels fixed per resample."""
    rng = np.random.default_rng(seed)
    n = len(truth)
    diffs = np.empty(resamples)
    for r in range(resamples):
        idx = rng.integers(0, n, n)
        diffs[r] = macro(*per_type_counts(truth, cc, n_types, idx)) - macro(*per_type_counts(truth, peer, n_types, idx))
    return diffs


def compare(fold: str, truth, score_types, preds, variant: str, args) -> tuple[dict, pd.DataFrame]:
    scores = {m: macro(*per_type_counts(*encode(truth, p, score_types), len(score_types))) for m, p in preds.items()}
    peers = {m: s for m, s in scores.items() if m in PEERS}
    best = max(peers, key=peers.get)
    t, c = encode(truth, preds[variant], score_types)
    _, b = encode(truth, preds[best], score_types)
    diffs = paired_bootstrap(t, c, b, len(score_types), args.resamples, args.seed)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    row = {"fold": fold, "cellcontrast": variant, "macro_f1": round(scores[variant], 4), "best_peer": best,
           "peer_macro_f1": round(scores[best], 4), "difference": round(scores[variant] - scores[best], 4),
           "ci95_low": round(float(lo), 4), "ci95_high": round(float(hi), 4),
           "share_behind": round(float((diffs < 0).mean()), 3), "n_scored": len(truth)}
    f1_c, present_c = f1_per_type(*per_type_counts(t, c, len(score_types)))
    f1_b, present_b = f1_per_type(*per_type_counts(t, b, len(score_types)))
    n_true = np.bincount(t, minlength=len(score_types))
    types = pd.DataFrame({"type": score_types, "query_cells": n_true, "f1_cellcontrast": f1_c.round(3),
                          f"f1_{best}": f1_b.round(3), "difference": (f1_c - f1_b).round(3)})
    types = types[present_c | present_b].sort_values("difference")
    return row, types


def main(args) -> int:
    rows = []
    for fold_dir in fold_dirs(args.run_dir):
        fold = f"{fold_dir.parent.name}/{fold_dir.name}"
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        truth, score_types, preds = read_fold(fold_dir, variants)
        for variant in variants:
            if variant not in preds:
                continue
            row, types = compare(fold, truth, score_types, preds, variant, args)
            rows.append(row)
            print(f"\n{fold} {variant}: {row['macro_f1']:.4f} vs {row['best_peer']} {row['peer_macro_f1']:.4f}; "
                  f"difference {row['difference']:+.4f}, 95% CI [{row['ci95_low']:+.4f}, {row['ci95_high']:+.4f}], "
                  f"behind in {row['share_behind']:.1%} of {args.resamples} resamples of {row['n_scored']} cells")
            if row["difference"] < 0 and args.top_types > 0:
                print(types.head(args.top_types).to_string(index=False))
    table = pd.DataFrame(rows)
    print("\n" + table.to_markdown(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse()))
