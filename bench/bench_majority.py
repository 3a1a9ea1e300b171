"""Benchmark majority voting: `cellcontrast annotate` with and without `--majority-voting` at
several query sizes (wall time, the child's peak RSS), and CellTypist's majority voting on the
smallest one, each in its own subprocess (bench_annotate.measure).

    python bench/bench_majority.py --atlas data/atlas.h5ad --model models/annotator.onnx \
        --cells 100000,1000000 --query-dir /tmp/mv

The queries are built by resampling the atlas's cells (bench_annotate.py --worker build) and reused
when they exist. Accuracy is printed against the atlas's labels for both cellcontrast columns
(per cell and majority voting) and for CellTypist's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_annotate import CELLTYPIST_TRAIN, measure, peer_has_celltypist  # noqa: E402

ACCURACY = r"""
import json, sys, anndata as ad
out = ad.read_h5ad(sys.argv[1]); truth = ad.read_h5ad(sys.argv[2], backed="r").obs["cell_type"].astype(str)
row = {"per_cell_acc": float((out.obs["cellcontrast_label"].astype(str) == truth).mean())}
if "cellcontrast_majority_voting" in out.obs:
    row["majority_acc"] = float((out.obs["cellcontrast_majority_voting"].astype(str) == truth).mean())
    row["clusters"] = int(out.obs["cellcontrast_over_clustering"].nunique())
print(json.dumps(row))
"""

CELLTYPIST_MAJORITY = r"""
import json, sys, time, numpy as np, scipy.sparse as sp, scanpy as sc, celltypist
# scanpy 1.11.5 (CellTypist's over-clustering) calls getnnz, which scipy 1.17 removed from sparse
# arrays: put back what it computes (stored values in all, per row, per column).
if not hasattr(sp.csr_array, "getnnz"):
    sp.csr_array.getnnz = lambda self, axis=None: (
        self.nnz if axis is None else np.diff(self.indptr) if axis == 1 else np.bincount(self.indices, minlength=self.shape[1]))
query, model = sys.argv[1], sys.argv[2]
a = sc.read_h5ad(query)
truth = a.obs["cell_type"].astype(str).to_numpy()
sc.pp.normalize_total(a, target_sum=1e4); sc.pp.log1p(a)
t = time.perf_counter()
res = celltypist.annotate(a, model=model, mode="best match", majority_voting=True)
labels = res.predicted_labels
print(json.dumps({"vote_s": time.perf_counter() - t, "clusters": int(labels["over_clustering"].nunique()),
                  "per_cell_acc": float((labels["predicted_labels"].astype(str).to_numpy() == truth).mean()),
                  "majority_acc": float((labels["majority_voting"].astype(str).to_numpy() == truth).mean())}))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlas", required=True)
    p.add_argument("--model", required=True, help="exported .onnx")
    p.add_argument("--cells", default="100000,1000000")
    p.add_argument("--query-dir", required=True)
    p.add_argument("--peer-python", default=".venv-bench/bin/python")
    p.add_argument("--celltypist-model", default=None, help="CellTypist .pkl; trained on the atlas if absent")
    p.add_argument("--skip-ours", action="store_true", help="only CellTypist's run (the queries must exist)")
    args = p.parse_args(argv)
    folder = Path(args.query_dir)
    folder.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "cellcontrast", "annotate", args.model]
    rows = []
    sizes = [int(n) for n in args.cells.split(",")]
    for n in [] if args.skip_ours else sizes:
        query = folder / f"query_{n}.h5ad"
        # built in a child: a parent holding the atlas would count in every child's peak RSS
        subprocess.run([sys.executable, str(Path(__file__).parent / "bench_annotate.py"), "--worker", "build",
                        "--atlas", args.atlas, "--cells", str(n), "--out", str(query)], check=True)
        for name, extra in (("annotate", []), ("annotate --majority-voting", ["--majority-voting"])):
            out = folder / f"out_{n}_{len(extra)}.h5ad"
            row = measure(f"{name} ({n} cells)", cli + [str(query), "--out", str(out), *extra])
            if row["rc"] == 0:
                acc = subprocess.run([sys.executable, "-c", ACCURACY, str(out), str(query)], capture_output=True,
                                     text=True, check=True)
                row.update(json.loads(acc.stdout.strip().splitlines()[-1]))
            rows.append(row)
            print(json.dumps(row), flush=True)
    if peer_has_celltypist(args.peer_python):
        ct_model = args.celltypist_model or str(folder / "celltypist.pkl")
        if not Path(ct_model).exists():
            subprocess.run([args.peer_python, "-c", CELLTYPIST_TRAIN, args.atlas, ct_model, "50000", ""], check=True)
        query = folder / f"query_{sizes[0]}.h5ad"
        row = measure(f"celltypist majority voting ({sizes[0]} cells)",
                      [args.peer_python, "-c", CELLTYPIST_MAJORITY, str(query), ct_model])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| run | wall s | peak RSS MiB | clusters | per-cell accuracy | majority accuracy |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["rc"] != 0:
            print(f"| {r['name']} | failed: {r.get('error', '')} | | | | |")
            continue
        print(f"| {r['name']} | {r['wall_s']:.1f} | {r['rss_mib']:.0f} | {r.get('clusters', '')} | "
              f"{r.get('per_cell_acc', float('nan')):.4f} | {r.get('majority_acc', float('nan')):.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
