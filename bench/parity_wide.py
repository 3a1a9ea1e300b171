"""An annotator over every gene of a wide reference: train LR with ``n_hvg: all`` on a
simulated atlas of 20,000 genes, export it, and compare onnxruntime's probabilities with
torch's on held-aside cells (the largest absolute difference).

    python bench/parity_wide.py --out-dir /tmp/wide [--genes 20000 --cells 12000]

Writes OUT/atlas.h5ad, OUT/lr_all/ (the chain) and OUT/lr_all.onnx, which
`bench/bench_annotate.py --atlas OUT/atlas.h5ad --cells 200000 --model OUT/lr_all.onnx
--model-dir OUT/lr_all` then times at 200k cells.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

import cellcontrast as cc
from cellcontrast.data.simulate import simulate_atlas_to_file


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--cells", type=int, default=12_000)
    p.add_argument("--types", type=int, default=30)
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atlas_path = out / "atlas.h5ad"
    if not atlas_path.exists():
        simulate_atlas_to_file(atlas_path, n_cells=args.cells, n_types=args.types, n_genes=args.genes, seed=0)
    atlas = ad.read_h5ad(atlas_path)
    order = np.random.default_rng(0).permutation(atlas.n_obs)
    held = atlas[np.sort(order[:2000])].copy()
    reference = atlas[np.sort(order[2000:])].copy()
    start = time.perf_counter()
    chain = cc.fit(reference, "cell_type", base="lr", params={"lr": {"n_hvg": "all"}})
    fit_s = time.perf_counter() - start
    chain.save(out / "lr_all")
    chain.export(out / "lr_all.onnx")
    torch_probs = chain.predict_proba(held)
    onnx_probs = cc.Annotator.load(out / "lr_all.onnx").predict_proba(held[:, chain.genes].X.toarray())
    row = {"genes": len(chain.genes), "reference_cells": reference.n_obs, "fit_s": round(fit_s, 1),
           "val_macro_f1": chain.metrics["val_macro_f1"],
           "max_abs_diff": float(np.abs(torch_probs - onnx_probs).max()),
           "same_argmax": float((torch_probs.argmax(1) == onnx_probs.argmax(1)).mean())}
    print(json.dumps(row))
    return 0 if row["max_abs_diff"] <= 1e-5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
