"""From a reference to an annotated new sample on every shared dataset, with the commands a
user types: `cellcontrast fit` then `cellcontrast annotate --majority-voting --plots`.

    python bench/fit_and_annotate_shared.py --data-dir ../shared/data --out-dir /tmp/fit-shared

cbmc, kidney and pbmc68k: a seeded, stratified 80% of the cells is the reference and the other
20% the query. The pancreas set: the reference is `--filter donor=mouse2`, the query every
cell of mouse1 (a donor the annotator never saw). Prints each command, its wall time, the
chosen chain, and the accuracy of the per-cell and majority-voting labels; a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

DATASETS = ("cbmc_citeseq_15types", "human_kidney_11types", "pbmc68k_reduced_counts_10types",
            "baron_mouse_pancreas_2donors")


def _write_parts(src: Path, folder: Path, seed: int = 0) -> tuple[Path, Path, list[str]]:
    """The reference and query files for one dataset, and the extra options `fit` needs."""
    ref, query = folder / "reference.h5ad", folder / "query.h5ad"
    adata = ad.read_h5ad(src)
    if "donor" in adata.obs and src.stem.startswith("baron"):
        adata[adata.obs["donor"].astype(str) == "mouse1"].copy().write_h5ad(query)
        return src, query, ["--filter", "donor=mouse2"]
    rng = np.random.default_rng(seed)
    is_query = np.zeros(adata.n_obs, dtype=bool)
    for _, rows in pd.Series(np.arange(adata.n_obs)).groupby(adata.obs["cell_type"].astype(str).to_numpy()):
        chosen = rng.permutation(rows.to_numpy())[: int(round(0.2 * len(rows)))]
        is_query[chosen] = True
    adata[~is_query].copy().write_h5ad(ref)
    adata[is_query].copy().write_h5ad(query)
    return ref, query, []


def _run(cmd: list[str], env: dict) -> tuple[float, str]:
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    print(done.stdout.strip(), flush=True)
    return wall, done.stdout


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--chains", default=None, help="passed to fit --chains (default: fit's default)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out_dir / 'mlflow.db'}",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cli = [sys.executable, "-m", "cellcontrast"]
    rows = []
    for name in args.datasets.split(","):
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        ref, query, extra = _write_parts(Path(args.data_dir) / f"{name}.h5ad", folder)
        model = folder / "annotator.onnx"
        fit_s, fit_out = _run(cli + ["fit", "--reference", str(ref), "--label-key", "cell_type", "--out", str(model),
                                     *extra, *(["--chains", args.chains] if args.chains else [])], env)
        annotated = folder / "annotated.h5ad"
        ann_s, _ = _run(cli + ["annotate", str(model), str(query), "--out", str(annotated), "--majority-voting",
                               "--plots", str(folder / "plots"), "--label-key", "cell_type"], env)
        obs = ad.read_h5ad(annotated).obs
        truth = ad.read_h5ad(query, backed="r").obs["cell_type"].astype(str).to_numpy()
        row = {"dataset": name, "query_cells": len(obs), "chosen": fit_out.split("chose ", 1)[1].split(" ", 1)[0],
               "fit_s": round(fit_s, 1), "annotate_s": round(ann_s, 1),
               "per_cell_acc": float((obs["cellcontrast_label"].astype(str).to_numpy() == truth).mean()),
               "majority_acc": float((obs["cellcontrast_majority_voting"].astype(str).to_numpy() == truth).mean()),
               "clusters": int(obs["cellcontrast_over_clustering"].nunique())}
        rows.append(row)
        print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    table.to_csv(out_dir / "fit_and_annotate.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
