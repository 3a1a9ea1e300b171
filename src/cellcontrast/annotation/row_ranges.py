"""One large query across workers: its rows split into ranges, each range streamed through the
model by a worker (`cellcontrast.core.engine`: a local Dask cluster or a running one), the
parts joined in the query's order. Every worker reads only its rows, in chunks, so its memory
stays flat; the joined predictions (top-3 per cell, and the probabilities when asked for) are
what the single-process path holds too. The outputs are then written once, atomically.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from cellcontrast.annotation.prediction import joined_predictions, predict_matrix
from cellcontrast.annotation.stream import fix_mmap_threshold_in_worker

# Ranges per worker: a worker that finishes early takes the next range.
RANGES_PER_WORKER = 2


@dataclass
class RowRange:
    """Rows [lo, hi) of a query matrix, read as a matrix of their own."""

    matrix: object
    lo: int
    hi: int

    @property
    def n_obs(self) -> int:
        return self.hi - self.lo

    def __getattr__(self, name):  # where, hint, var_names, gene_key: the query's own
        return getattr(self.matrix, name)

    def chunk_stop(self, start: int, batch_size: int) -> int:
        return min(self.matrix.chunk_stop(self.lo + start, batch_size), self.hi) - self.lo

    def rows(self, start: int, stop: int):
        return self.matrix.rows(self.lo + start, self.lo + stop)


def row_ranges(n_obs: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering [0, n_obs), sizes differing by at most one."""
    parts = max(1, min(parts, n_obs))
    edges = np.linspace(0, n_obs, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def predict_range(model: str, query: str, layer: str | None, gene_key: str | None, col_map: np.ndarray,
                  lo: int, hi: int, batch_size: int, probabilities: bool, novelty: str | None, threads: int):
    """In a worker: the predictions of rows [lo, hi) of the query file."""
    from cellcontrast.annotation.model import load_model
    from cellcontrast.annotation.query import open_query

    fix_mmap_threshold_in_worker()
    annotator = load_model(model, threads=threads)
    with h5py.File(query, "r") as f, ThreadPoolExecutor(max_workers=threads) as pool:
        matrix = open_query(f, layer, pool, gene_key)
        return predict_matrix(annotator, RowRange(matrix, lo, hi), col_map, batch_size,
                              probabilities=probabilities, novelty=novelty, progress=False)


def predict_in_parts(annotator, matrix, col_map: np.ndarray, batch_size: int, *, query: Path, layer: str | None,
                     gene_key: str | None, workers: int, scheduler: str | None, threads: int,
                     probabilities: bool = False, novelty: str | None = None, progress=None):
    """`predict_matrix` over the query's rows, shared among workers; the same result."""
    import sys
    from concurrent.futures import as_completed

    from tqdm import tqdm

    from cellcontrast.core.engine import task_executor

    ranges = row_ranges(matrix.n_obs, workers * RANGES_PER_WORKER)
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    with task_executor(workers, scheduler, pin=True) as pool, tqdm(total=matrix.n_obs, unit="cells", desc="annotate",
                                                          file=sys.stderr, disable=disable) as bar:
        futures = {pool.submit(predict_range, str(annotator.path), str(query), layer, gene_key, col_map, lo, hi,
                               batch_size, probabilities, novelty, threads): i for i, (lo, hi) in enumerate(ranges)}
        parts = [None] * len(ranges)
        for future in as_completed(futures):
            parts[futures[future]] = future.result()
            bar.update(len(parts[futures[future]].top_p))
    return joined_predictions(parts, col_map)
