"""Annotate many query files: one output per input, each written atomically, and a summary.

The inputs are shared among ``workers`` processes (dask.distributed, `cellcontrast.core.engine`:
a local cluster, or the cluster at ``scheduler``); with one worker and no scheduler they run
here, one after another. Each input streams in constant memory, as `annotate_file` does. An
input that fails (bad file, too few genes) is recorded in the summary and the others are still
annotated; the call then raises one `InputError` naming the failures.
"""

from __future__ import annotations

import glob
import os
import resource
import time
from pathlib import Path

import pandas as pd

from cellcontrast.annotation.stream import cores, fix_mmap_threshold_in_worker
from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path

SUMMARY = "summary.csv"
SUMMARY_COLUMNS = ["query", "out", "n_cells", "genes_found", "genes_total", "accuracy", "seconds", "worker_pid",
                   "worker_peak_rss_mib", "error"]


def expand_queries(queries: str | os.PathLike | list) -> list[Path]:
    """Paths and glob patterns (``'shards/*.h5ad'``) as a sorted list of distinct files."""
    items = [queries] if isinstance(queries, str | os.PathLike) else list(queries)
    found: list[Path] = []
    for item in map(str, items):
        matches = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        if not matches:
            raise InputError(f"no query file matches {item}")
        found += [Path(m) for m in matches]
    found = list(dict.fromkeys(found))
    stems = pd.Series([p.stem for p in found])
    if stems.duplicated().any():
        raise InputError(f"two queries share the name {stems[stems.duplicated()].iloc[0]!r}: their outputs "
                         "would collide in --out-dir; rename one")
    return found


def _annotate_one(model: str, query: str, out: str, options: dict) -> dict:
    """One input (in a worker process): its summary row, the error instead of raising."""
    from cellcontrast.annotation.api import annotate_file

    fix_mmap_threshold_in_worker()
    started = time.perf_counter()
    row = {"query": query, "out": out}
    try:
        summary = annotate_file(model, query, out, progress=False, log=lambda message: None, **options)
        row.update({k: summary.attrs.get(k) for k in ("n_cells", "genes_found", "genes_total", "accuracy")})
    except InputError as err:
        row["error"] = str(err)
    row["seconds"] = round(time.perf_counter() - started, 3)
    # the worker's peak so far (Linux: KiB), the memory a machine of the cluster must hold
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    row.update(worker_pid=os.getpid(), worker_peak_rss_mib=round(peak_kib / 1024, 1))
    return row


def annotate_files(model: str | os.PathLike, queries, out_dir: str | os.PathLike, *, workers: int = 1,
                   scheduler: str | None = None, threads: int = 0, log=None, **options) -> pd.DataFrame:
    """Annotate every query into ``out_dir/<name>.h5ad`` and write ``out_dir/summary.csv``.

    Parameters
    ----------
    model
        The exported ``.onnx`` annotator.
    queries
        ``.h5ad`` paths and glob patterns.
    out_dir
        Where the outputs and the summary go (made if missing).
    workers, scheduler
        Worker processes of a local Dask cluster; or a running scheduler's address.
    threads
        onnxruntime threads per input (0: the cores shared among the local workers).
    log
        Called with one line per finished input (default: print).
    **options
        As `annotate_file` (``min_confidence``, ``gene_key``, ``majority_voting``, ...).

    Returns
    -------
    pandas.DataFrame
        The summary: one row per input (``n_cells``, ``genes_found``, ``accuracy``,
        ``seconds``, the worker's pid and peak RSS, ``error``).

    Raises
    ------
    InputError
        No query matches, two share a name, or some inputs failed (the rest are written).
    """
    say = log if log is not None else print
    paths = expand_queries(queries)
    if not Path(model).is_file():
        raise InputError(f"no model file {model}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out-dir {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    if not threads:
        threads = max(1, cores() // max(1, workers)) if not scheduler else 1
    jobs = [(str(model), str(p), str(out / f"{p.stem}.h5ad"), {**options, "threads": threads}) for p in paths]
    rows = []
    for row in _run(jobs, workers, scheduler):
        rows.append(row)
        say(f"{row['query']}: {row['error']}" if row.get("error") else
            f"wrote {row['out']} ({row['n_cells']} cells, {row['seconds']:.1f} s)")
    summary = pd.DataFrame(rows, columns=SUMMARY_COLUMNS).sort_values("query", ignore_index=True)
    with atomic_path(out / SUMMARY) as tmp:
        summary.to_csv(tmp, index=False)
    failed = summary[summary["error"].notna()]
    if len(failed):
        raise InputError(f"{len(failed)} of {len(summary)} queries failed ({', '.join(map(str, failed['query']))}); "
                         f"the reasons are in {out / SUMMARY}")
    return summary


def _run(jobs: list[tuple], workers: int, scheduler: str | None):
    if workers <= 1 and not scheduler:
        for job in jobs:
            yield _annotate_one(*job)
        return
    from concurrent.futures import as_completed

    from cellcontrast.core.engine import task_executor

    with task_executor(workers, scheduler, pin=True) as pool:
        futures = [pool.submit(_annotate_one, *job) for job in jobs]
        for future in as_completed(futures):
            yield future.result()
