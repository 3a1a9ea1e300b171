"""Was it the choice or the chains? Every candidate chain of `fit`, alone, scored on a user-path query.

`fit` trains its chains and keeps one by the one-SE rule on validation. Where the annotator
trails a peer on a fold of `bench/heldout_user_path.py`, this script tells whether another
candidate would have done better on the query (then the choice is the cause) or none would
(then the chains are): for each chain of ``--chains`` it runs the public API the user path runs,
``cc.fit_annotator(reference, chains=[chain], ensemble=False, batch_key=...)`` then
``cc.annotate(query, annotator)``, and prints the chain's selection score beside its macro F1 on
the query (no Unassigned calls, as the CLI's default; the benchmark's metric: the scored types present in truth or prediction).
With ``--together`` one fit is offered every chain (``keep_candidates=True``): each base trains
once, every candidate is refitted as it would have been exported, and the ``chosen`` column says
which one `fit` itself would have shipped (its one-SE rule among them all).

    OMP_NUM_THREADS=1 PYTHONPATH=src .venv/bin/python bench/chain_on_query.py \\
        --fold-dir /work/random-runs/cbmc_citeseq_15types/random_q20_seed0 --csv chains.csv
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import anndata as ad
import pandas as pd
from sklearn.metrics import f1_score

import cellcontrast as cc


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fold-dir", type=Path, required=True, help="holds reference.h5ad and query.h5ad")
    p.add_argument("--chains", default="lr,svm,scdae")
    p.add_argument("--batch-key", help="as `fit --batch-key` (e.g. donor)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", help="JSON of hyperparameters keyed by model name, as `fit --params` "
                                    "(e.g. '{\"scdae\": {\"contrastive_weight\": 0.5}}')")
    p.add_argument("--tag", default="", help="a name for this run's rows (e.g. the params)")
    p.add_argument("--together", action="store_true",
                   help="one fit offered every chain (each base trained once; `chosen`: what it ships) instead of "
                        "one fit per chain")
    p.add_argument("--csv", type=Path, help="append one row per chain here, as each finishes; a chain whose row "
                                           "(fold, batch key, tag, seed) is already there is skipped, so a long "
                                           "run resumes where it stopped (with --together: the group, once all its "
                                           "rows are there)")
    return p.parse_args(argv)


def score_types(fold_dir: Path, reference: ad.AnnData) -> list[str]:
    genes = fold_dir / "genes.json"  # cross-study folds score the types both sets hold
    if genes.exists():
        return json.loads(genes.read_text())["score_types"]
    return sorted(reference.obs["cell_type"].astype(str).unique())


def finished(csv: Path | None, fold: str, args) -> set[str]:
    """Chains of this fold, batch key, tag and seed that the CSV already holds."""
    if csv is None or not csv.exists():
        return set()
    old = pd.read_csv(csv, keep_default_na=False)
    same = (old["fold"] == fold) & (old["batch_key"] == (args.batch_key or "")) & (old["tag"] == args.tag)
    if "seed" in old:  # rows written before the seed column were seed 0
        same &= pd.to_numeric(old["seed"].replace("", 0)) == args.seed
    return set(old.loc[same, "chain"])


def save_row(csv: Path, row: dict) -> None:
    """Add one row to the CSV (rewritten whole through a temporary file: a stopped run leaves it readable)."""
    table = pd.DataFrame([row])
    if csv.exists():
        table = pd.concat([pd.read_csv(csv), table], ignore_index=True)
    tmp = csv.with_name(csv.name + ".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(csv)


def query_row(chain_name: str, annotator, query, types, fitted, fold: str, fit_s: float, args, tmp: Path) -> dict:
    """One chain's row: its selection score and its macro F1 on the query through `cc.annotate`."""
    truth = query.obs["cell_type"].astype(str)
    scored = truth.isin(types).to_numpy()
    onnx = annotator.export(Path(tmp) / f"{chain_name}.onnx")
    labels = cc.annotate(query, onnx, min_confidence=0.0, copy=True).obs["cellcontrast_label"].astype(str)
    t, p = truth[scored].tolist(), labels[scored].tolist()
    present = sorted((set(t) | set(p)) & set(types))
    # with a batch key, val_macro_f1 is the mean over the held-out batches
    selection = fitted.scores.set_index("chain").loc[chain_name, "val_macro_f1"]
    return {"fold": fold, "batch_key": args.batch_key or "", "tag": args.tag, "seed": args.seed,
            "chain": chain_name, "selection_score": round(float(selection), 4),
            "query_macro_f1": round(float(f1_score(t, p, labels=present, average="macro", zero_division=0)), 4),
            "fit_seconds": round(fit_s, 1), "together": bool(args.together),
            "chosen": fitted.chosen if args.together else ""}


def main(args) -> int:
    reference = ad.read_h5ad(args.fold_dir / "reference.h5ad")
    query = ad.read_h5ad(args.fold_dir / "query.h5ad")
    types = score_types(args.fold_dir, reference)
    fold = f"{args.fold_dir.parent.name}/{args.fold_dir.name}"
    done = finished(args.csv, fold, args)
    chains = [c.strip() for c in args.chains.split(",") if c.strip() and c.strip() not in done]
    if args.together and chains:  # the choice is among them all: a partial run is redone whole
        chains = [c.strip() for c in args.chains.split(",") if c.strip()]
    for chain in sorted(done - set(chains)):
        print(f"{chain}: in {args.csv} already, skipped", flush=True)
    params = json.loads(args.params) if args.params else None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for group in ([chains] if args.together else [[c] for c in chains]) if chains else []:
            t0 = time.perf_counter()
            fitted = cc.fit_annotator(reference, chains=group, ensemble=False, batch_key=args.batch_key,
                                      seed=args.seed, register=False, experiment=None, params=params,
                                      keep_candidates=args.together)
            fit_s = time.perf_counter() - t0
            for name in group:
                annotator = fitted.candidates[name] if args.together else fitted.chain
                rows.append(query_row(name, annotator, query, types, fitted, fold, fit_s, args, Path(tmp)))
                print(rows[-1], flush=True)
                if args.csv:
                    save_row(args.csv, rows[-1])
    if rows:
        print(pd.DataFrame(rows).to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse()))
