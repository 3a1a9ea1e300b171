"""Streaming a query through the model: chunks read ahead on a thread, each checked as raw
counts, re-indexed to the model's genes, densified in small blocks and run by onnxruntime."""

from __future__ import annotations

import os
import queue
import sys
import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cellcontrast.data.counts import check_counts

# Rows per onnxruntime call (a read chunk of batch-size rows is split into these).
INFERENCE_ROWS = 1024


@dataclass
class ModelRows:
    """A read chunk checked and re-indexed to the model's genes: a CSR (int32 indices,
    float32 values) in model columns, or, for a dense query, the dense rows themselves."""

    n_model: int
    dense: np.ndarray | None = None
    indptr: np.ndarray | None = None
    indices: np.ndarray | None = None
    data: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        return len(self.dense) if self.dense is not None else len(self.indptr) - 1

    def csr(self) -> sp.csr_matrix:
        """Every row as a CSR matrix in model columns (the form a streaming fit trains on)."""
        if self.dense is not None:
            return sp.csr_matrix(self.dense)
        return sp.csr_matrix((self.data, self.indices, self.indptr), shape=(self.n_rows, self.n_model))

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) as a dense float32 [hi - lo, n_model] array."""
        if self.dense is not None:
            return self.dense[lo:hi]
        a, b = int(self.indptr[lo]), int(self.indptr[hi])
        indptr = self.indptr[lo:hi + 1] - self.indptr[lo]
        out = np.zeros((hi - lo, self.n_model), dtype=np.float32)
        # scipy's C scatter (repeated entries of a non-canonical CSR are summed; GIL released),
        # called on the arrays directly: a csr_matrix per block copied its slices and checked
        # them again, a quarter of the densifying time.
        try:
            from scipy.sparse._sparsetools import csr_todense

            csr_todense(hi - lo, self.n_model, indptr, self.indices[a:b], self.data[a:b], out)
            return out
        except (ImportError, TypeError):  # scipy moved or changed it: the public, slower route
            return sp.csr_matrix((self.data[a:b], self.indices[a:b], indptr), shape=out.shape).toarray()


def to_model_columns(chunk, col_map: np.ndarray, n_model: int, start: int, where: str,
                     hint: str = "") -> ModelRows:
    """Validate a read chunk and re-index its columns to the model's (unknown genes dropped)."""
    if not sp.issparse(chunk):
        chunk = np.asarray(chunk)
        check_counts(chunk, _chunk_name(where, start), hint)
        out = np.zeros((chunk.shape[0], n_model), dtype=np.float32)
        keep = col_map >= 0
        out[:, col_map[keep]] = chunk[:, keep]
        return ModelRows(n_model, dense=out)
    chunk = sp.csr_matrix(chunk)
    check_counts(chunk.data, _chunk_name(where, start), hint)
    data = chunk.data.astype(np.float32, copy=False)
    indptr = chunk.indptr.astype(np.int32, copy=False) if chunk.nnz < 2**31 else chunk.indptr
    if len(col_map) == n_model and np.array_equal(col_map, np.arange(n_model)):
        cols = chunk.indices  # the query's genes are the model's, in order
    else:
        cols = col_map.astype(np.int32)[chunk.indices]
        keep = cols >= 0
        if not keep.all():
            kept_before = np.concatenate(([0], np.cumsum(keep))).astype(indptr.dtype)
            data, cols, indptr = data[keep], cols[keep], kept_before[indptr]
    return ModelRows(n_model, indptr=indptr, indices=cols.astype(indptr.dtype, copy=False), data=data)


def _chunk_name(where: str, start: int) -> str:
    return f"the query's {where} (in the chunk from cell {start})"


def chunk_to_model(chunk, col_map: np.ndarray, n_model: int, start: int, where: str) -> np.ndarray:
    """Validate a chunk and scatter its columns into a dense [n, n_model] float32 array."""
    mapped = to_model_columns(chunk, col_map, n_model, start, where)
    return mapped.rows(0, mapped.n_rows)


def read_chunks(matrix, batch_size: int):
    """Yield (first row, chunk) for row chunks of the query: CSR (canonical) or dense."""
    start = 0
    while start < matrix.n_obs:
        stop = matrix.chunk_stop(start, batch_size)
        chunk = matrix.rows(start, stop)
        yield start, (sp.csr_matrix(chunk) if sp.issparse(chunk) else chunk)
        start = stop


def read_ahead(items, depth: int = 2):
    """The items of the iterator `items`, produced by a background thread up to `depth` ahead.

    Reading a chunk (h5py: mostly decompression) overlaps with checking, densifying and
    running the previous one (numpy, scipy and onnxruntime release the GIL): a run takes
    about the longer of the two rather than their sum. An error in the reader is raised
    here, in order.
    """

    blocks: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        blocks.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            blocks.put(done)
        except BaseException as err:  # handed to the consumer, raised there
            blocks.put(err)

    reader = threading.Thread(target=produce, name="cellcontrast-reader", daemon=True)
    reader.start()
    try:
        while True:
            item = blocks.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while reader.is_alive():  # unblock a reader waiting on a full queue, then let it end
            try:
                blocks.get_nowait()
            except queue.Empty:
                pass
            reader.join(timeout=0.05)


def top3(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = min(3, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(probs, idx, axis=1)


def cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def fix_mmap_threshold(nbytes: int = 64 << 20) -> None:
    """Fix glibc's mmap threshold at `nbytes` (it otherwise moves).

    glibc raises its mmap threshold each time a large block is freed, so the peak RSS of a
    streamed run wandered by 100-200 MiB from run to run. A fixed threshold stops that. Not
    lower than the per-block buffers (a few MB): blocks served by mmap are fresh pages every
    time, and their page faults cost a third of the run (1 MiB: 19.5 s, 64 MiB: 13.3 s for
    200k cells). Process-wide, hence applied by the command line and by the annotation tasks
    of Dask workers (a nanny sets ``MALLOC_TRIM_THRESHOLD_``, which also freezes glibc's mmap
    threshold at 128 KiB: a worker ran a 250k-cell shard in 24-26 s against 20 s for the
    command line on the same core; `core.engine`'s local clusters now unset it, a cluster
    started elsewhere may not); a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def fix_mmap_threshold_in_worker() -> None:
    """`fix_mmap_threshold` when this runs in a Dask worker, whose process is the engine's; in
    a user's own process (the Python API with one worker) malloc is left alone."""
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return
    fix_mmap_threshold()
