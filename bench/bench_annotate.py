"""Benchmark `cellcontrast annotate` on a large query: speed (cells/s) and peak memory (RSS).

    python bench/bench_annotate.py --atlas data/atlas.h5ad --cells 1000000 \
        --out data/query_1m.h5ad --model models/best.onnx --model-dir models/best_chain

1. Builds (or reuses, when it has the requested number of cells) a query by resampling the
   atlas's cells with replacement, written as a gzip-compressed CSR .h5ad by appending row
   blocks, so that building a 1M-cell file needs no more memory than one block.
2. Runs each measurement in its own subprocess and reads that child's own peak RSS from
   ``os.wait4`` (``ru_maxrss``), wall time from the parent (start-up and imports included,
   i.e. what a user waits for):
   (a) reading the matrix chunk by chunk: with h5py ranges of indptr/indices/data (what
       annotate does) and with anndata's backed sparse slicing, for comparison;
   (b) ``cellcontrast annotate`` with the ONNX model (``--model``);
   (c) the same chain in torch eager (``--model-dir``: load_chain, same chunks, same gene
       alignment);
   (d) CellTypist's annotate, only if ``celltypist`` imports in ``--peer-python`` (default
       ``.venv-bench/bin/python``); it is given a CellTypist model (``--celltypist-model``)
       or one trained on the atlas first (training time not counted).
3. Prints a table and the ratios against (b).

Each of (b)-(d) needs its input; a missing one is reported as 'skipped'.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 50_000  # cells per appended block when building the query
H5_CHUNK = 1 << 18  # elements per HDF5 chunk of data/indices (1 MiB of float32)


# ------------------------------------------------------------------ building the query


def _atlas_counts(atlas, layer):
    if layer in (None, "", "X"):
        return atlas.X
    if layer == "raw":
        return atlas.raw.X
    return atlas.layers[layer]


def build_query(atlas_path: Path, n_cells: int, out: Path, layer: str | None, seed: int = 0) -> Path:
    """Resample `n_cells` cells of the atlas (with replacement) into a gzip CSR .h5ad."""
    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    if out.exists():
        with h5py.File(out, "r") as f:
            shape = tuple(f["X"].attrs.get("shape", f["X"].shape if hasattr(f["X"], "shape") else (0, 0)))
        if shape[0] == n_cells:
            print(f"reusing {out} ({shape[0]} cells x {shape[1]} genes)")
            return out
    t0 = time.perf_counter()
    atlas = ad.read_h5ad(atlas_path)
    counts = sp.csr_matrix(_atlas_counts(atlas, layer))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, atlas.n_obs, size=n_cells)
    obs = pd.DataFrame(index=pd.Index([f"q{i}" for i in range(n_cells)]))
    for col in ("cell_type",):
        if col in atlas.obs:
            obs[col] = pd.Categorical(atlas.obs[col].to_numpy()[pick])
    var = pd.DataFrame(index=atlas.var_names.astype(str))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part.h5ad")
    kwargs = {"compression": "gzip", "chunks": (H5_CHUNK,)}
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, {})
        for start in range(0, n_cells, BLOCK):
            block = counts[pick[start:start + BLOCK]].astype(np.float32)
            block.sort_indices()
            if start == 0:
                write_elem(f, "X", block, dataset_kwargs=kwargs)
            else:
                sparse_dataset(f["X"]).append(block)
    os.replace(tmp, out)
    size = out.stat().st_size / 2**20
    print(f"built {out}: {n_cells} cells x {atlas.n_vars} genes, {size:.0f} MiB, {time.perf_counter() - t0:.0f} s")
    return out


# ------------------------------------------------------------------ workers (run in a subprocess)


def worker_read_h5py(query: str, batch_size: int, layer: str | None) -> dict:
    import h5py
    import numpy as np

    from cellcontrast.annotation.query import open_query

    nnz = 0
    with h5py.File(query, "r") as f:
        m = open_query(f, layer)
        for start in range(0, m.n_obs, batch_size):
            block = m.rows(start, min(start + batch_size, m.n_obs))
            nnz += block.nnz if hasattr(block, "nnz") else int(np.count_nonzero(block))
        return {"cells": m.n_obs, "nnz": nnz}


def worker_read_anndata(query: str, batch_size: int, layer: str | None) -> dict:
    import anndata as ad
    import numpy as np

    adata = ad.read_h5ad(query, backed="r")
    x = adata.X if layer in (None, "X") else (adata.raw.X if layer == "raw" else adata.layers[layer])
    nnz = 0
    for start in range(0, adata.n_obs, batch_size):
        block = x[start:min(start + batch_size, adata.n_obs)]
        nnz += block.nnz if hasattr(block, "nnz") else int(np.count_nonzero(block))
    return {"cells": adata.n_obs, "nnz": nnz}


def worker_check_output(query: str, annotated: str) -> dict:
    """No cell lost: the annotation has every query cell, in order, each with a label and a confidence."""
    import anndata
    import numpy as np

    q = anndata.read_h5ad(query, backed="r")
    out = anndata.read_h5ad(annotated)
    conf = out.obs["cellcontrast_confidence"].to_numpy()
    return {"query_cells": int(q.n_obs), "annotated_cells": int(out.n_obs),
            "same_cells_in_order": bool(np.array_equal(q.obs_names.to_numpy(), out.obs_names.to_numpy())),
            "all_labelled": bool(out.obs["cellcontrast_label"].notna().all()),
            "confidence_in_0_1": bool(np.all((conf > 0) & (conf <= 1)))}


def worker_torch(query: str, batch_size: int, layer: str | None, model_dir: str, threads: int) -> dict:
    import h5py
    import numpy as np
    import torch

    from cellcontrast.annotation.genes import align_genes
    from cellcontrast.annotation.query import open_query
    from cellcontrast.annotation.stream import chunk_to_model
    from cellcontrast.nn.chain import load_chain

    if threads > 0:
        torch.set_num_threads(threads)
    chain, config = load_chain(model_dir)
    genes = config["genes"]
    counts = np.zeros(len(config.get("classes") or config["class_names"]), dtype=np.int64)
    with h5py.File(query, "r") as f, torch.inference_mode():
        m = open_query(f, layer)
        col_map = align_genes(m.var_names, genes)
        for start in range(0, m.n_obs, batch_size):
            stop = min(start + batch_size, m.n_obs)
            dense = chunk_to_model(m.rows(start, stop), col_map, len(genes), start, m.where)
            probs = chain(torch.from_numpy(dense))
            counts += np.bincount(probs.argmax(1).numpy(), minlength=len(counts))
        return {"cells": m.n_obs, "predicted_per_class": counts.tolist()}


# The CellTypist side runs in the peer interpreter: everything it needs is in this string.
CELLTYPIST_TRAIN = r"""
import sys, numpy as np, scanpy as sc, celltypist
atlas, out, n_max, layer = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
a = sc.read_h5ad(atlas)
if layer == "raw": a = a.raw.to_adata()
elif layer not in ("", "X"): a.X = a.layers[layer]
if a.n_obs > n_max:
    a = a[np.random.default_rng(0).choice(a.n_obs, n_max, replace=False)].copy()
sc.pp.normalize_total(a, target_sum=1e4); sc.pp.log1p(a)
model = celltypist.train(a, labels="cell_type", use_SGD=True, mini_batch=True, epochs=5,
                         feature_selection=False, check_expression=False)
model.write(out)
"""

CELLTYPIST_RUN = r"""
import json, sys, time, scanpy as sc, celltypist
query, model = sys.argv[1], sys.argv[2]
a = sc.read_h5ad(query)
sc.pp.normalize_total(a, target_sum=1e4); sc.pp.log1p(a)
res = celltypist.annotate(a, model=model, mode="best match")
print(json.dumps({"cells": int(a.n_obs), "labels": int(res.predicted_labels.iloc[:, 0].nunique())}))
"""


# ------------------------------------------------------------------ measuring


class TreeRss:
    """The peak of the summed RSS of a process and all its descendants (the Dask workers of
    ``fit --workers``, ``annotate --workers``), sampled from /proc on a thread every
    ``interval`` seconds. Shared pages (libraries) count once per process: an upper bound.
    A peak shorter than the interval can be missed; ``os.wait4``'s figure has no such gap but
    covers one process only. 0 off Linux."""

    def __init__(self, pid: int, interval: float = 0.25):
        import threading

        self.pid, self.interval, self.peak_mib = pid, interval, 0.0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20 if hasattr(os, "sysconf") else 0
        while not self._done.wait(self.interval):
            self.peak_mib = max(self.peak_mib, sum(_rss_pages(p) for p in _descendants(self.pid)) * page_mib)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _descendants(root: int) -> list[int]:
    """``root`` and every process below it (from each process's parent in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):  # gone meanwhile
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _rss_pages(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def measure(name: str, cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd`; wall time and the child's own peak RSS (os.wait4), plus its last JSON line.

    Linux counts the memory of the process that forked the child in the child's ru_maxrss
    (the pre-exec image), so this parent stays slim: no numpy, no anndata; the query is built
    in a subprocess too. The floor of every figure is a bare interpreter (~10 MiB).
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        tree = TreeRss(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        tree.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    row = {"name": name, "wall_s": wall, "rss_mib": usage.ru_maxrss / 1024, "tree_rss_mib": tree.peak_mib,
           "rc": proc.returncode,
           "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}  # the child's and its reaped children's
    if proc.returncode != 0:
        row["error"] = (stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            row.update(json.loads(line))
            break
    return row


def peer_has_celltypist(python: str) -> bool:
    if not Path(python).exists():
        return False
    return subprocess.run([python, "-c", "import celltypist"], capture_output=True).returncode == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--atlas", help="atlas .h5ad with raw counts to resample cells from")
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--out", required=True, help="query .h5ad to build or reuse")
    p.add_argument("--layer", default=None, help="counts layer of the atlas ('raw' for .raw)")
    p.add_argument("--model", default=None, help="exported .onnx for (b)")
    p.add_argument("--model-dir", default=None, help="saved chain folder for (c)")
    p.add_argument("--peer-python", default=".venv-bench/bin/python", help="interpreter with celltypist for (d)")
    p.add_argument("--celltypist-model", default=None, help="CellTypist .pkl; trained on the atlas if absent")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--annotated", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:  # a child process: one measurement, result as a JSON line
        if args.worker == "build":
            build_query(Path(args.atlas), args.cells, Path(args.out), args.layer)
            return 0
        if args.worker == "read-h5py":
            result = worker_read_h5py(args.out, args.batch_size, args.layer)
        elif args.worker == "read-anndata":
            result = worker_read_anndata(args.out, args.batch_size, args.layer)
        elif args.worker == "check-output":
            result = worker_check_output(args.out, args.annotated)
        else:
            result = worker_torch(args.out, args.batch_size, args.layer, args.model_dir, args.threads)
        print(json.dumps(result))
        return 0

    query = Path(args.out)
    if args.atlas:  # in a subprocess: see measure()
        build = [sys.executable, os.path.abspath(__file__), "--worker", "build", "--atlas", args.atlas,
                 "--cells", str(args.cells), "--out", str(query)] + (["--layer", args.layer] if args.layer else [])
        subprocess.run(build, check=True)
    elif not query.exists():
        p.error("--out does not exist: give --atlas to build it")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    me = [sys.executable, os.path.abspath(__file__), "--out", str(query), "--batch-size", str(args.batch_size)]
    if args.layer:
        me += ["--layer", args.layer]

    rows: list[dict] = []
    rows.append(measure("(a) read chunks, h5py ranges", [*me, "--worker", "read-h5py"], env))
    rows.append(measure("(a') read chunks, anndata backed", [*me, "--worker", "read-anndata"], env))
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            cmd = [sys.executable, "-m", "cellcontrast", "annotate", args.model, str(query),
                   "--out", f"{tmp}/annotated.h5ad", "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads)]
            if args.layer:
                cmd += ["--layer", args.layer]
            rows.append(measure("(b) cellcontrast annotate (onnx)", cmd, env))
            if not rows[-1].get("rc"):
                check = subprocess.run([*me, "--worker", "check-output", "--annotated", f"{tmp}/annotated.h5ad"],
                                       capture_output=True, text=True, env=env)
                lost = json.loads(check.stdout.strip().splitlines()[-1]) if check.returncode == 0 else None
                rows[-1]["output_check"] = lost or {"error": check.stderr.strip()[-200:]}
        else:
            rows.append({"name": "(b) cellcontrast annotate (onnx)", "skipped": "no --model"})
    if args.model_dir:
        rows.append(measure("(c) torch eager chain", [*me, "--worker", "torch", "--model-dir", args.model_dir,
                                                      "--threads", str(args.threads)], env))
    else:
        rows.append({"name": "(c) torch eager chain", "skipped": "no --model-dir"})
    if peer_has_celltypist(args.peer_python):
        ct_model = args.celltypist_model
        if not ct_model:
            if not args.atlas:
                rows.append({"name": "(d) celltypist annotate", "skipped": "needs --atlas or --celltypist-model"})
            else:
                ct_model = str(query.with_suffix(".celltypist.pkl"))
                if not Path(ct_model).exists():
                    subprocess.run([args.peer_python, "-c", CELLTYPIST_TRAIN, args.atlas, ct_model, "50000",
                                    args.layer or ""], check=True, env=env)
        if ct_model:
            rows.append(measure("(d) celltypist annotate", [args.peer_python, "-c", CELLTYPIST_RUN, str(query),
                                                           ct_model], env))
    else:
        rows.append({"name": "(d) celltypist annotate", "skipped": f"celltypist not importable in {args.peer_python}"})

    print()
    print(f"query: {query} ({query.stat().st_size / 2**20:.0f} MiB), batch size {args.batch_size}, "
          f"threads {args.threads or 'default'}, cpus {os.cpu_count()}")
    # The annotate CLI prints no JSON: its cell count is the one the readers saw.
    known_cells = next((r["cells"] for r in rows if "cells" in r), args.cells)
    print(f"{'measurement':<36} {'cells':>9} {'wall s':>8} {'cells/s':>10} {'peak RSS MiB':>13}")
    for row in rows:
        if "skipped" in row:
            print(f"{row['name']:<36} skipped ({row['skipped']})")
        elif row.get("rc"):
            print(f"{row['name']:<36} FAILED rc={row['rc']}: {row.get('error', '')}")
        else:
            cells = row.get("cells", known_cells)
            row["cells_per_s"] = cells / row["wall_s"]
            print(f"{row['name']:<36} {cells:>9} {row['wall_s']:>8.2f} {row['cells_per_s']:>10.0f} {row['rss_mib']:>13.0f}")
    ref = next((r for r in rows if r["name"].startswith("(b)") and "cells_per_s" in r), None)
    if ref:
        print("\nratios against (b) cellcontrast annotate (onnx):")
        for row in rows:
            if row is ref or "cells_per_s" not in row:
                continue
            print(f"  {row['name']:<36} speed x{row['cells_per_s'] / ref['cells_per_s']:.2f}   "
                  f"peak RSS x{row['rss_mib'] / ref['rss_mib']:.2f}")
        check = ref.get("output_check", {})
        intact = (check.get("annotated_cells") == check.get("query_cells") and check.get("same_cells_in_order")
                  and check.get("all_labelled") and check.get("confidence_in_0_1"))
        print(f"\noutput check of (b): {json.dumps(check)}")
        if not intact:
            print("ERROR: the annotation lost or mislabelled cells", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
