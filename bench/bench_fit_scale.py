"""`fit` as references grow: wall time, peak RSS and macro F1 against CellTypist on the same cells.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_fit_scale.py --out-dir /tmp/fit-scale \\
        --sizes 100000,250000 --genes 2000,20000 [--methods cellcontrast,celltypist_sgd,celltypist]

For each gene count and reference size, a simulated atlas of four individuals
(`cellcontrast simulate`, cached in ``--out-dir``): individuals L1-L3 are the reference (``size``
cells, about), at most ``--query-cells`` cells of L4 the query, a new individual. Each method runs
as its own process, measured from outside (wall time, the process's own peak RSS, and the peak
of its process tree's summed RSS, which counts the Dask workers of ``--fit-args "--workers 2"``,
as `bench_annotate.py` measures):

- ``cellcontrast``: ``cellcontrast fit --reference R --out A.onnx`` with its defaults, then
  ``annotate`` on the query (timed apart); the card's validation macro F1;
- ``celltypist``: ``celltypist.train`` with its defaults, in the peers' environment
  (``make bench-venv``), on log1p counts scaled to 10,000 per cell, as bench/peers.py feeds it;
- ``celltypist_sgd``: ``celltypist.train(use_SGD=True, mini_batch=True)``, the mode its docs
  recommend for large references.

Every method is capped by ``--cap-minutes``; a run that does not finish (or is killed for memory)
is a row that says so. Prints one JSON line per run and a markdown table at the end; rows are
appended to ``--csv`` as they finish, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_annotate import measure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUERY_INDIVIDUAL = "L4"
METHODS = ("cellcontrast", "celltypist_sgd", "celltypist")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--sizes", default="100000,250000,500000,1000000", help="reference cells, comma-separated")
    p.add_argument("--genes", default="2000,20000", help="gene counts, comma-separated")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--query-cells", type=int, default=20_000)
    p.add_argument("--cap-minutes", type=float, default=60.0, help="per run")
    p.add_argument("--bench-python", default=str(ROOT / ".venv-bench/bin/python"),
                   help="Python of the peers' venv (celltypist)")
    p.add_argument("--resample-from", type=int, default=0, metavar="SIZE",
                   help="build each reference by resampling cells (with replacement, as bench_annotate.py builds its "
                        "query) from the prepared reference of SIZE cells at the same gene count, its query reused: "
                        "where simulating a million cells is itself the bottleneck")
    p.add_argument("--fit-args", default="", help="more options for `cellcontrast fit` (e.g. \"--sample-cells 20000\")")
    p.add_argument("--mem-cap-gib", type=float, default=0,
                   help="cap each CellTypist run's address space (prlimit --as) so that running out of memory ends "
                        "that run, not another process on the machine (0: no cap)")
    p.add_argument("--csv", type=Path, help="append one row per run (default: OUT_DIR/fit_scale.csv)")
    p.add_argument("--worker", choices=["split", "score", "celltypist"], help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------ workers (each in a subprocess)


def worker_split(atlas: str, folder: str, query_cells: int) -> dict:
    """reference.h5ad (every individual but L4) and query.h5ad (L4, at most query_cells)."""
    import anndata as ad
    import numpy as np

    a = ad.read_h5ad(atlas)
    held = (a.obs["individual"].astype(str) == QUERY_INDIVIDUAL).to_numpy()
    query = np.flatnonzero(held)
    query = np.sort(np.random.default_rng(0).choice(query, min(query.size, query_cells), replace=False))
    a[~held].write_h5ad(Path(folder) / "reference.h5ad")
    a[query].write_h5ad(Path(folder) / "query.h5ad")
    return {"reference_cells": int((~held).sum()), "query_cells": int(query.size), "genes": int(a.n_vars)}


def _macro_f1(truth, pred, reference_types) -> float:
    from sklearn.metrics import f1_score

    labels = sorted(set(reference_types) & (set(truth) | set(pred)))
    return float(f1_score(truth, pred, labels=labels, average="macro", zero_division=0))


def worker_score(model: str, folder: str) -> dict:
    """cellcontrast's annotator on the query: macro F1 over the reference's types."""
    import anndata as ad

    import cellcontrast as cc

    query = ad.read_h5ad(Path(folder) / "query.h5ad")
    types = ad.read_h5ad(Path(folder) / "reference.h5ad", backed="r").obs["cell_type"].astype(str).unique()
    t0 = time.perf_counter()
    pred = cc.annotate(query, model, min_confidence=0.0, copy=True).obs["cellcontrast_label"].astype(str)
    return {"annotate_s": round(time.perf_counter() - t0, 1),
            "heldout_macro_f1": round(_macro_f1(query.obs["cell_type"].astype(str), pred, types), 4)}


def worker_celltypist(folder: str, sgd: bool) -> dict:
    """celltypist.train on the reference (its defaults, or mini-batch SGD), then the query."""
    import warnings

    import anndata as ad
    import celltypist
    import numpy as np
    import scipy.sparse as sp
    from peers import log_normalise

    def normalised(path):
        a = ad.read_h5ad(path)
        out = ad.AnnData(X=log_normalise(sp.csr_matrix(a.X, dtype=np.float32)), obs=a.obs[["cell_type"]].copy())
        out.var_names = a.var_names
        return out

    reference = normalised(Path(folder) / "reference.h5ad")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = celltypist.train(reference, labels="cell_type", n_jobs=1,
                                 **({"use_SGD": True, "mini_batch": True} if sgd else {}))
    train_s = time.perf_counter() - t0
    query = normalised(Path(folder) / "query.h5ad")
    result = celltypist.annotate(query, model=model, mode="best match", majority_voting=False)
    pred = result.predicted_labels["predicted_labels"].astype(str)
    return {"train_s": round(train_s, 1),
            "heldout_macro_f1": round(_macro_f1(query.obs["cell_type"].astype(str), pred,
                                                reference.obs["cell_type"].astype(str).unique()), 4)}


# ------------------------------------------------------------------ main


def _run(name: str, cmd: list[str], cap_s: float, env: dict | None = None) -> dict:
    row = measure(name, ["timeout", "--signal=KILL", str(int(cap_s)), *cmd], env=env)
    if row["rc"] in (137, -9):  # SIGKILL: the cap's, or the kernel's when memory ran out
        row["error"] = (f"killed at the {cap_s / 60:.0f}-minute cap" if row["wall_s"] >= cap_s - 1 else
                        f"killed after {row['wall_s']:.0f} s at {row['rss_mib'] / 1024:.1f} GiB: out of memory")
    return row


def _worker(python: str, kind: str, **kwargs) -> list[str]:
    return [python, str(Path(__file__).resolve()), "--out-dir", ".", "--worker", kind, "--args", json.dumps(kwargs)]


def _prepare(out: Path, size: int, genes: int, query_cells: int, resample_from: int = 0) -> Path:
    """The cached reference/query folder for one (size, genes)."""
    folder = out / f"ref_{size}c_{genes}g"
    if (folder / "query.h5ad").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    if resample_from:
        import shutil

        from bench_annotate import build_query

        source = _prepare(out, resample_from, genes, query_cells)
        build_query(source / "reference.h5ad", size, folder / "reference.h5ad", None)
        shutil.copy(source / "query.h5ad", folder / "query.h5ad")
        return folder
    atlas = folder / "atlas.h5ad"
    total = int(size * 4 / 3)  # L4 holds about a quarter of the cells
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cellcontrast", "simulate", "--out", str(atlas), "--cells", str(total),
                    "--genes", str(genes), "--individuals", "4"], check=True)
    info = json.loads(subprocess.run(_worker(sys.executable, "split", atlas=str(atlas), folder=str(folder),
                                             query_cells=query_cells),
                                     check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    atlas.unlink()
    print(f"prepared {folder.name}: {info} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def _cellcontrast(folder: Path, cap_s: float, fit_args: str = "") -> dict:
    model = folder / "cellcontrast" / "annotator.onnx"
    model.parent.mkdir(exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{model.parent / 'mlflow.db'}"}
    row = _run("cellcontrast", [sys.executable, "-m", "cellcontrast", "fit", "--reference",
                                str(folder / "reference.h5ad"), "--out", str(model), "--no-register",
                                *fit_args.split()], cap_s, env)
    if row["rc"] != 0:
        return row
    card = model.with_suffix(".card.md").read_text()
    row["chosen"] = next((line.split("**")[1] for line in card.splitlines() if "Chosen chain" in line), "")
    val = next((line for line in card.splitlines() if line.startswith(f"| {row['chosen']} (chosen)")), "")
    row["val_macro_f1"] = float(val.split("|")[2]) if val else None
    scored = _run("score", _worker(sys.executable, "score", model=str(model), folder=str(folder)), cap_s)
    row.update({k: scored.get(k) for k in ("annotate_s", "heldout_macro_f1")})
    return row


def main(args) -> int:
    if args.worker:
        kwargs = json.loads(args.args)
        if args.worker == "celltypist":
            sys.path.insert(0, str(Path(__file__).resolve().parent))
        result = {"split": worker_split, "score": worker_score, "celltypist": worker_celltypist}[args.worker](**kwargs)
        print(json.dumps(result))
        return 0
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    csv = args.csv or out / "fit_scale.csv"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cap_s = args.cap_minutes * 60
    rows = []
    for genes in [int(g) for g in args.genes.split(",")]:
        for size in [int(s) for s in args.sizes.split(",")]:
            folder = _prepare(out, size, genes, args.query_cells, args.resample_from)
            for method in methods:
                if method == "cellcontrast":
                    row = {**_cellcontrast(folder, cap_s, args.fit_args), "fit_args": args.fit_args}
                else:
                    cap = ["prlimit", f"--as={int(args.mem_cap_gib * 2**30)}"] if args.mem_cap_gib else []
                    row = _run(method, [*cap, *_worker(args.bench_python, "celltypist", folder=str(folder),
                                                       sgd=method == "celltypist_sgd")], cap_s)
                    if row["rc"] != 0 and args.mem_cap_gib and "MemoryError" in row.get("error", ""):
                        row["error"] = f"out of memory at the {args.mem_cap_gib:g} GiB cap"
                row = {"genes": genes, "reference_cells": size, "method": method, **row}
                print(json.dumps(row), flush=True)
                rows.append(row)
                _append(csv, row)
    _print_table(rows)
    return 0


COLUMNS = ["genes", "reference_cells", "method", "wall_s", "rss_mib", "tree_rss_mib", "val_macro_f1", "heldout_macro_f1",
           "chosen", "train_s", "annotate_s", "fit_args", "error"]


def _append(csv: Path, row: dict) -> None:
    import csv as csvlib

    new = not csv.exists()
    with csv.open("a", newline="") as f:
        writer = csvlib.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " |")
    print("|---" * len(COLUMNS) + "|")
    for r in rows:
        cells = [(f"{r[c]:.3f}" if "f1" in c else f"{r[c]:.0f}") if isinstance(r.get(c), float)
                 else str(r.get(c, "") or "") for c in COLUMNS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    raise SystemExit(main(parse()))
