"""Annotate a query `.h5ad` with an exported ONNX annotator, without torch.

The query is streamed: its count matrix (``X``, a named layer, or ``.raw``) is read in row
chunks straight from the HDF5 file (for CSR, ranges of ``indptr``/``indices``/``data``; for
dense, row slices), so memory stays flat however many cells the file holds. Each chunk is
validated (raw, non-negative, finite, integer counts), aligned to the model's genes by name
(genes the query lacks are zeros), and run through onnxruntime.

Output layout (a NEW file; the query is opened read-only and never modified):

* ``obs``: the query's ``obs`` (same index, same columns) plus ``cellcontrast_label``
  (the predicted type, ``Unassigned`` below ``min_confidence``), ``cellcontrast_confidence``
  (the highest probability), ``cellcontrast_raw_label`` (the argmax before the threshold),
  ``cellcontrast_top1..3`` and ``cellcontrast_top1_prob..top3_prob``;
* ``X``: none, and ``var`` is empty: the file's shape is ``(n_cells, 0)``. The query's matrix
  is not copied (it can be tens of GB); join the predictions back with
  ``query.obs = query.obs.join(out.obs.filter(like="cellcontrast_"))``;
* ``obsm['cellcontrast_probabilities']`` (``[n_cells, n_classes]`` float32, opt-in, columns in
  the order of ``uns['cellcontrast']['classes']``; held in memory while annotating);
* ``uns['cellcontrast']``: the model's metadata, the gene overlap and the options used.

The CSV (optional) holds the same ``cellcontrast_*`` columns indexed by cell id. Both files
are written atomically: an error found in the last chunk still leaves no output behind.

This module must not import torch (nor mlflow or sklearn): `cellcontrast annotate` runs on
the light install.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellcontrast.core.version import __version__
from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path

UNASSIGNED = "Unassigned"
PREFIX = "cellcontrast_"
PROBABILITIES_KEY = "cellcontrast_probabilities"
# Rows per onnxruntime call (a read chunk of --batch-size rows is split into these).
INFERENCE_ROWS = 1024
# Most bytes of matrix values read at once (a chunk holds fewer rows than --batch-size when
# its rows are wider than this allows).
READ_BYTES = 128 << 20
# Values further than this from an integer are not counts.
_INTEGER_TOLERANCE = 1e-3


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------


@dataclass
class OnnxAnnotator:
    """An onnxruntime session over an exported annotator, with its decoded metadata."""

    path: Path
    session: Any
    genes: list[str]
    classes: list[str]
    metadata: dict[str, Any]
    input_name: str
    output_name: str

    def predict_proba(self, counts: np.ndarray) -> np.ndarray:
        """Probabilities [n, n_classes] for counts [n, n_genes] in the model's gene order."""
        counts = np.ascontiguousarray(counts, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: counts})[0]


def load_model(path: str | os.PathLike, threads: int = 0) -> OnnxAnnotator:
    """Open an exported annotator; every kind of bad file is an `InputError`."""
    import onnxruntime as ort

    path = Path(path)
    hint = "export one with `cellcontrast export`"
    if not path.exists():
        raise InputError(f"model file {path} does not exist; {hint}")
    if not path.is_file():
        raise InputError(f"model {path} is not a file; pass the .onnx file written by `cellcontrast export`")
    if threads < 0:
        raise InputError(f"--threads {threads} must be 0 (all cores) or a positive number")

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: no optimiser chatter on stderr
    # The CPU arena keeps buffers for reuse: blocks are at most INFERENCE_ROWS rows, so it
    # stays small, and without it every activation is a fresh malloc (about 5% slower).
    opts.enable_cpu_mem_arena = True
    # Idle pool threads sleep instead of spinning: the reader thread needs the core meanwhile
    # (8.7 s against 9.5 s for 200k cells on 2 cores).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_mem_pattern = True
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as err:
        raise InputError(
            f"{path} is not a readable ONNX model (corrupt, truncated or another format): "
            f"{_one_line(err)[:200]}; {hint}"
        ) from err

    raw = dict(session.get_modelmeta().custom_metadata_map)
    meta: dict[str, Any] = dict(raw)
    for key in ("genes", "classes"):
        try:
            value = json.loads(raw[key])
        except KeyError:
            raise InputError(
                f"{path} is an ONNX model without cellcontrast metadata ({key!r} missing); "
                f"{hint}"
            ) from None
        except ValueError:
            raise InputError(f"{path} has unreadable {key!r} metadata; {hint}") from None
        if not isinstance(value, list) or not value:
            raise InputError(f"{path} has an empty {key!r} metadata list; {hint}")
        meta[key] = [str(v) for v in value]
    for key in ("metrics", "output_names"):
        if key in raw:
            try:
                meta[key] = json.loads(raw[key])
            except ValueError:
                meta[key] = raw[key]

    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise InputError(f"{path} has {len(inputs)} inputs; a cellcontrast annotator has one (counts); {hint}")
    input_name = inputs[0].name
    width = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
    if isinstance(width, int) and width != len(meta["genes"]):
        raise InputError(
            f"{path} takes {width} genes but its metadata lists {len(meta['genes'])}; {hint}"
        )
    outputs = [o.name for o in session.get_outputs()]
    output_name = "probabilities" if "probabilities" in outputs else outputs[0]
    if len(set(meta["genes"])) != len(meta["genes"]):
        raise InputError(f"{path} lists duplicated genes in its metadata; {hint}")
    return OnnxAnnotator(path, session, meta["genes"], meta["classes"], meta, input_name, output_name)


# --------------------------------------------------------------------------------------
# The query, streamed from HDF5
# --------------------------------------------------------------------------------------


def _read_elem(elem):
    import anndata

    reader = getattr(getattr(anndata, "io", None), "read_elem", None)
    if reader is None:  # anndata < 0.11
        from anndata.experimental import read_elem as reader
    return reader(elem)


def _dataframe_index(group) -> pd.Index:
    """The index of an anndata-encoded dataframe group, without reading its columns."""
    name = group.attrs.get("_index", "_index")
    if isinstance(name, bytes):
        name = name.decode()
    values = _read_elem(group[name])
    return pd.Index(np.asarray(values).astype(str))


@dataclass
class QueryMatrix:
    """Row-chunk reader over an h5ad count matrix (CSR, CSC or dense) opened with h5py."""

    file: Any
    where: str
    n_obs: int
    n_vars: int
    kind: str  # "csr", "csc" or "dense"
    var_names: pd.Index
    _elem: Any = None
    _indptr: np.ndarray | None = field(default=None, repr=False)
    _backed: Any = field(default=None, repr=False)
    # CSR data and indices read by inflating their gzip chunks in threads (h5chunks), if stored so
    _inflated: tuple | None = field(default=None, repr=False)

    def chunk_stop(self, start: int, batch_size: int, max_bytes: int | None = None) -> int:
        """End of the chunk starting at `start`: `batch_size` rows, fewer if they exceed `max_bytes`."""
        max_bytes = READ_BYTES if max_bytes is None else max_bytes
        stop = min(start + batch_size, self.n_obs)
        if self.kind == "dense":
            itemsize = int(self._elem.dtype.itemsize)
            rows = max(1, max_bytes // max(1, self.n_vars * itemsize))
            return min(stop, start + rows)
        if self.kind == "csr":
            # data + indices take about 8 bytes per stored value
            limit = int(self._indptr[start]) + max_bytes // 8
            last = int(np.searchsorted(self._indptr, limit, side="right")) - 1
            return max(start + 1, min(stop, last))
        return stop

    def rows(self, start: int, stop: int):
        """Rows [start, stop) as a scipy CSR matrix (sparse) or a numpy array (dense)."""
        import scipy.sparse as sp

        if self.kind == "dense":
            return np.asarray(self._elem[start:stop])
        if self.kind == "csr":
            lo, hi = int(self._indptr[start]), int(self._indptr[stop])
            indptr = self._indptr[start : stop + 1] - lo
            if self._inflated is not None:
                waits = [array.submit(lo, hi) for array in self._inflated]  # both inflate at once
                data, indices = (wait() for wait in waits)
            else:
                data = self._elem["data"][lo:hi]
                indices = self._elem["indices"][lo:hi]
            return sp.csr_matrix((data, indices, indptr), shape=(stop - start, self.n_vars))
        # CSC cannot be read by rows cheaply; anndata's backed slicing does what can be done.
        if self._backed is None:
            import anndata

            opener = getattr(getattr(anndata, "io", None), "sparse_dataset", None)
            if opener is None:  # anndata < 0.11
                from anndata.experimental import sparse_dataset as opener
            self._backed = opener(self._elem)
        return sp.csr_matrix(self._backed[start:stop])


def open_query(file, layer: str | None, pool=None) -> QueryMatrix:
    """Locate the count matrix and its gene names in an open h5ad (h5py.File).

    With a thread ``pool``, gzip-compressed CSR arrays are inflated on its threads (see
    ``h5chunks``); the pool must outlive the reads.
    """
    if layer in (None, "", "X"):
        where, var_group = "X", "var"
    elif layer == "raw":
        where, var_group = "raw/X", "raw/var"
        if "raw" not in file or "X" not in file["raw"]:
            raise InputError("the query has no .raw; drop --layer raw to read X, or name one of its layers")
    else:
        where, var_group = f"layers/{layer}", "var"
        layers = sorted(file["layers"].keys()) if "layers" in file else []
        if layer not in layers:
            have = ", ".join(layers) if layers else "none"
            raise InputError(
                f"the query has no layer {layer!r} (layers: {have}); use --layer raw for .raw or omit --layer for X"
            )
    if where not in file:
        raise InputError(f"the query has no {where} matrix; pass --layer with the layer holding raw counts")
    if var_group not in file:
        raise InputError(f"the query has no {var_group} table with gene names; is it an AnnData .h5ad?")
    var_names = _dataframe_index(file[var_group])

    elem = file[where]
    attrs = dict(elem.attrs)
    encoding = attrs.get("encoding-type", attrs.get("h5sparse_format", ""))
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if hasattr(elem, "shape") and not hasattr(elem, "keys"):  # a dataset: dense
        if elem.ndim != 2:
            raise InputError(f"the query's {where} has {elem.ndim} dimensions; expected cells x genes")
        n_obs, n_vars = (int(s) for s in elem.shape)
        kind, indptr = "dense", None
    elif encoding in ("csr_matrix", "csr", "csc_matrix", "csc"):
        n_obs, n_vars = (int(s) for s in attrs.get("shape", attrs.get("h5sparse_shape")))
        kind = "csr" if encoding.startswith("csr") else "csc"
        indptr = np.asarray(elem["indptr"][:], dtype=np.int64) if kind == "csr" else None
    else:
        raise InputError(
            f"the query's {where} is stored as {encoding or 'an unknown encoding'}; "
            "expected a dense array or a CSR/CSC sparse matrix"
        )
    if n_vars != len(var_names):
        raise InputError(f"the query's {where} has {n_vars} columns but {var_group} lists {len(var_names)} genes")
    matrix = QueryMatrix(file, where, n_obs, n_vars, kind, var_names, elem, indptr)
    if kind == "csr" and pool is not None:
        from cellcontrast.data.h5chunks import ChunkedGzipArray

        arrays = (elem["data"], elem["indices"])
        if all(ChunkedGzipArray.supports(a) for a in arrays):
            matrix._inflated = tuple(ChunkedGzipArray(a, pool) for a in arrays)
    return matrix


def align_genes(
    query_genes: pd.Index, model_genes: list[str], case_insensitive: bool = False
) -> np.ndarray:
    """For each query gene, its column in the model (-1 if the model lacks it).

    Raises `InputError` when a model gene matches more than one query gene (duplicated names).
    """
    norm = (lambda s: s.lower()) if case_insensitive else (lambda s: s)
    model_pos = {norm(g): i for i, g in enumerate(model_genes)}
    if len(model_pos) != len(model_genes):
        raise InputError(
            "the model's genes are not unique when case is ignored; drop --case-insensitive"
        )
    col_map = np.fromiter(
        (model_pos.get(norm(g), -1) for g in query_genes), dtype=np.int64, count=len(query_genes)
    )
    hits = col_map[col_map >= 0]
    if len(hits) != len(np.unique(hits)):
        counts = np.bincount(hits, minlength=len(model_genes))
        dup = [model_genes[i] for i in np.flatnonzero(counts > 1)[:3]]
        kind = "case-insensitive " if case_insensitive else ""
        raise InputError(
            f"the query has duplicated {kind}gene names that the model uses ({', '.join(dup)}, ...): "
            "make them unique (adata.var_names_make_unique()) or sum the duplicates first"
        )
    return col_map


def _check_counts(values: np.ndarray, start: int, where: str) -> None:
    """Refuse negative, non-finite and non-integer values (values of one chunk)."""
    if values.size == 0:
        return
    lowest, highest = values.min(), values.max()  # NaN anywhere makes both NaN
    if not (np.isfinite(lowest) and np.isfinite(highest)):
        raise InputError(
            f"the query's {where} holds NaN or infinite values (first in the chunk starting at cell "
            f"{start}); pass raw counts, e.g. --layer counts or --layer raw"
        )
    if lowest < 0:
        raise InputError(
            f"the query's {where} holds negative values (e.g. {float(lowest):g}); this looks "
            "like scaled data: pass raw counts, e.g. --layer counts or --layer raw"
        )
    if values.dtype.kind in "biu":  # integers are counts once they are not negative
        return
    frac = np.rint(values)
    np.subtract(values, frac, out=frac)
    np.abs(frac, out=frac)
    if frac.max() > _INTEGER_TOLERANCE:
        kind = "log-normalised" if highest < 30 else "normalised"
        raise InputError(
            f"the query's {where} values are not counts: looks like {kind} data "
            f"(e.g. {float(values.flat[int(np.argmax(frac))]):g}); pass raw counts, e.g. --layer counts or --layer raw"
        )


@dataclass
class _ModelRows:
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
            import scipy.sparse as sp

            return sp.csr_matrix((self.data[a:b], self.indices[a:b], indptr), shape=out.shape).toarray()


def _to_model_columns(chunk, col_map: np.ndarray, n_model: int, start: int, where: str) -> _ModelRows:
    """Validate a read chunk and re-index its columns to the model's (unknown genes dropped)."""
    import scipy.sparse as sp

    if not sp.issparse(chunk):
        chunk = np.asarray(chunk)
        _check_counts(chunk, start, where)
        out = np.zeros((chunk.shape[0], n_model), dtype=np.float32)
        keep = col_map >= 0
        out[:, col_map[keep]] = chunk[:, keep]
        return _ModelRows(n_model, dense=out)
    chunk = sp.csr_matrix(chunk)
    _check_counts(chunk.data, start, where)
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
    return _ModelRows(n_model, indptr=indptr, indices=cols.astype(indptr.dtype, copy=False), data=data)


def _chunk_to_model(chunk, col_map: np.ndarray, n_model: int, start: int, where: str) -> np.ndarray:
    """Validate a chunk and scatter its columns into a dense [n, n_model] float32 array."""
    mapped = _to_model_columns(chunk, col_map, n_model, start, where)
    return mapped.rows(0, mapped.n_rows)


# --------------------------------------------------------------------------------------
# Annotate
# --------------------------------------------------------------------------------------


def _read_chunks(matrix: QueryMatrix, batch_size: int):
    """Yield (first row, chunk) for row chunks of the query: CSR (canonical) or dense."""
    import scipy.sparse as sp

    start = 0
    while start < matrix.n_obs:
        stop = matrix.chunk_stop(start, batch_size)
        chunk = matrix.rows(start, stop)
        yield start, (sp.csr_matrix(chunk) if sp.issparse(chunk) else chunk)
        start = stop


def _read_ahead(items, depth: int = 2):
    """The items of the iterator `items`, produced by a background thread up to `depth` ahead.

    Reading a chunk (h5py: mostly decompression) overlaps with checking, densifying and
    running the previous one (numpy, scipy and onnxruntime release the GIL): a run takes
    about the longer of the two rather than their sum. An error in the reader is raised
    here, in order.
    """
    import queue
    import threading

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


def _top3(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    k = min(3, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx.astype(np.int32), np.take_along_axis(probs, idx, axis=1)


def _predictions_frame(
    obs_names: pd.Index, classes: list[str], top_idx: np.ndarray, top_p: np.ndarray, min_confidence: float
) -> pd.DataFrame:
    names = np.asarray(classes + [""], dtype=object)
    n = len(obs_names)
    conf = top_p[:, 0].astype(np.float32)
    raw = names[top_idx[:, 0]]
    label = np.where(conf >= min_confidence, raw, UNASSIGNED)
    cats = list(dict.fromkeys([*classes, UNASSIGNED]))
    frame = {
        f"{PREFIX}label": pd.Categorical(label, categories=cats),
        f"{PREFIX}confidence": conf,
        f"{PREFIX}raw_label": pd.Categorical(raw, categories=classes),
    }
    for j in range(3):
        if j < top_idx.shape[1]:
            frame[f"{PREFIX}top{j + 1}"] = pd.Categorical(names[top_idx[:, j]], categories=classes)
        else:  # fewer than 3 classes
            frame[f"{PREFIX}top{j + 1}"] = pd.Categorical([None] * n, categories=classes)
    for j in range(3):
        frame[f"{PREFIX}top{j + 1}_prob"] = (
            top_p[:, j].astype(np.float32) if j < top_p.shape[1] else np.zeros(n, dtype=np.float32)
        )
    return pd.DataFrame(frame, index=obs_names)


def _summary(pred: pd.DataFrame) -> pd.DataFrame:
    labels = pred[f"{PREFIX}label"]
    grouped = pred.groupby(labels, observed=True)[f"{PREFIX}confidence"]
    summary = pd.DataFrame({"n_cells": grouped.size(), "mean_confidence": grouped.mean()})
    summary["fraction"] = summary["n_cells"] / max(len(pred), 1)
    summary.index.name = "label"
    return summary.sort_values("n_cells", ascending=False)[["n_cells", "fraction", "mean_confidence"]]


def _uns_safe(value):
    """Make metadata storable in .uns (no None, nested dicts of strings/numbers/arrays)."""
    if isinstance(value, dict):
        return {str(k): _uns_safe(v) for k, v in value.items()}
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return np.asarray([str(v) for v in value], dtype=object)
    return value


def _write_h5ad(path: Path, obs: pd.DataFrame, uns: dict, probabilities: np.ndarray | None) -> None:
    import anndata

    adata = anndata.AnnData(obs=obs, var=pd.DataFrame(index=pd.Index([], dtype=str)))
    if probabilities is not None:
        adata.obsm[PROBABILITIES_KEY] = probabilities
    adata.uns["cellcontrast"] = uns
    adata.write_h5ad(path)


def _set_mode(path: Path) -> None:
    """The usual file mode (0666 minus umask) rather than mkstemp's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def annotate(
    model_path: str | os.PathLike,
    query_path: str | os.PathLike,
    out_path: str | os.PathLike,
    csv_path: str | os.PathLike | None = None,
    layer: str | None = None,
    batch_size: int = 8192,
    min_confidence: float = 0.0,
    min_overlap: float = 0.5,
    case_insensitive: bool = False,
    store_probabilities: bool = False,
    threads: int = 0,
    label_key: str | None = None,
    progress: bool | None = None,
    log=None,
) -> pd.DataFrame:
    """Annotate the cells of `query_path` with the ONNX annotator `model_path`.

    Writes a new `.h5ad` (`out_path`, layout in the module docstring) and optionally a CSV,
    both atomically. Returns a summary: one row per predicted label with `n_cells`,
    `fraction` and `mean_confidence`; `summary.attrs` holds the gene overlap, the number of
    cells and (with `label_key`) the accuracy. Messages go to `log` (default: stdout);
    `progress=None` shows a progress bar on stderr only when it is a terminal.
    """
    import h5py
    from tqdm.auto import tqdm

    say = log if log is not None else print
    query_path, out_path = Path(query_path), Path(out_path)
    csv_path = Path(csv_path) if csv_path else None

    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1")
    if not 0.0 <= min_confidence <= 1.0:
        raise InputError(f"--min-confidence {min_confidence} must lie between 0 and 1")
    if not 0.0 <= min_overlap <= 1.0:
        raise InputError(f"--min-overlap {min_overlap} must lie between 0 and 1")
    if not query_path.is_file():
        raise InputError(f"query file {query_path} does not exist; pass an .h5ad with raw counts")
    for target in [out_path] + ([csv_path] if csv_path else []):
        if target.exists() and target.resolve() == query_path.resolve():
            raise InputError(f"output {target} is the query file itself; write the annotation to a new file")
    if csv_path is not None and csv_path.resolve() == out_path.resolve():
        raise InputError("--csv and --out name the same file; give them different names")
    if not h5py.is_hdf5(query_path):
        raise InputError(f"query {query_path} is not an .h5ad (HDF5) file; convert it with anndata first")

    model = load_model(model_path, threads=threads)
    n_model = len(model.genes)

    try:
        query_file = h5py.File(query_path, "r")
    except OSError as err:
        raise InputError(f"cannot read the query {query_path} (truncated or damaged?): {_one_line(err)[:200]}") from None
    # Threads that inflate the query's gzip chunks (h5chunks) beside the annotating thread.
    pool = ThreadPoolExecutor(max_workers=threads or _cores(), thread_name_prefix="cellcontrast-inflate")
    with query_file as f, pool:
        try:
            matrix = open_query(f, layer, pool)
            obs = _read_elem(f["obs"]) if "obs" in f else None
        except InputError:
            raise
        except Exception as err:
            raise InputError(f"cannot read the query {query_path}: {_one_line(err)[:200]}") from err
        if obs is None or len(obs) != matrix.n_obs:
            raise InputError(f"the query's obs does not match its {matrix.where} ({matrix.n_obs} cells)")
        if matrix.n_obs == 0 or matrix.n_vars == 0:
            raise InputError(
                f"the query is empty ({matrix.n_obs} cells x {matrix.n_vars} genes); pass an .h5ad with cells and genes"
            )
        if label_key is not None and label_key not in obs.columns:
            raise InputError(
                f"--label-key {label_key!r} is not an obs column of the query "
                f"(columns: {', '.join(map(str, obs.columns[:10])) or 'none'})"
            )

        col_map = align_genes(matrix.var_names, model.genes, case_insensitive)
        found = int((col_map >= 0).sum())
        frac = found / n_model
        if frac < min_overlap:
            hint = (
                "are gene names of the same kind (symbols vs Ensembl IDs)?"
                + ("" if case_insensitive else " try --case-insensitive")
            )
            raise InputError(
                f"only {found} of {n_model} model genes ({100 * frac:.1f}%) found in the query "
                f"(need {100 * min_overlap:.0f}%, --min-overlap); {hint}"
            )
        say(
            f"found {found} of {n_model} model genes ({100 * frac:.1f}%) in the query; "
            f"{n_model - found} missing genes set to 0"
        )

        n = matrix.n_obs
        top_idx = np.zeros((n, min(3, len(model.classes))), dtype=np.int32)
        top_p = np.zeros(top_idx.shape, dtype=np.float32)
        probabilities = np.zeros((n, len(model.classes)), dtype=np.float32) if store_probabilities else None
        disable = (not sys.stderr.isatty()) if progress is None else (not progress)
        chunks = _read_ahead(_read_chunks(matrix, batch_size))
        with tqdm(total=n, unit="cells", desc="annotate", file=sys.stderr, disable=disable) as bar, \
                contextlib.closing(chunks):  # stops the reader before the file closes, even on error
            for start, chunk in chunks:
                mapped = _to_model_columns(chunk, col_map, n_model, start, matrix.where)
                # onnxruntime gets at most INFERENCE_ROWS rows at a time: its activations
                # (several [rows, width] tensors) stay small while reads stay large.
                for lo in range(0, mapped.n_rows, INFERENCE_ROWS):
                    hi = min(lo + INFERENCE_ROWS, mapped.n_rows)
                    a, b = start + lo, start + hi
                    probs = model.predict_proba(mapped.rows(lo, hi))
                    if probs.shape != (b - a, len(model.classes)):
                        raise InputError(f"the model returned shape {probs.shape} for {b - a} cells; re-export it")
                    top_idx[a:b], top_p[a:b] = _top3(probs)
                    if probabilities is not None:
                        probabilities[a:b] = probs
                    bar.update(b - a)

    obs.index = obs.index.astype(str)
    if obs.index.has_duplicates:  # joining on a duplicated index would multiply the rows
        import anndata

        obs.index = anndata.utils.make_index_unique(obs.index)
        say("note: the query has duplicate cell names; made unique by suffixes (-1, -2, ...)")
    pred = _predictions_frame(obs.index, model.classes, top_idx, top_p, min_confidence)
    out_obs = obs.drop(columns=[c for c in obs.columns if c in pred.columns]).join(pred)

    missing = [g for g, ok in zip(model.genes, _found_mask(col_map, n_model), strict=True) if not ok]
    meta = {k: v for k, v in model.metadata.items() if k not in ("genes",)}
    uns = _uns_safe({
        "model": str(Path(model_path).name),
        "model_metadata": {**meta, "metrics": json.dumps(meta.get("metrics", {}))},
        "classes": model.classes,
        "genes_found": found,
        "genes_total": n_model,
        "gene_overlap": float(frac),
        "genes_missing": missing,
        "query": str(query_path.name),
        "layer": layer or "X",
        "min_confidence": float(min_confidence),
        "case_insensitive": bool(case_insensitive),
        "cellcontrast_version": __version__,
    })

    summary = _summary(pred)
    summary.attrs.update({"n_cells": n, "genes_found": found, "genes_total": n_model})
    if label_key is not None:
        truth = obs[label_key].astype(str).to_numpy()
        known = np.isin(truth, model.classes)
        if known.any():
            acc = float(np.mean(pred[f"{PREFIX}raw_label"].astype(str).to_numpy()[known] == truth[known]))
            summary.attrs["accuracy"] = acc
            say(
                f"accuracy against obs[{label_key!r}]: {acc:.4f} on {int(known.sum())} of {n} cells "
                "whose label is a model class"
            )
        else:
            say(f"accuracy: no cell's obs[{label_key!r}] label is among the model's classes")

    with atomic_path(out_path) as tmp_out:
        _write_h5ad(tmp_out, out_obs, uns, probabilities)
        _set_mode(tmp_out)
        if csv_path is not None:
            with atomic_path(csv_path) as tmp_csv:
                pred.to_csv(tmp_csv, index_label="cell_id")
                _set_mode(tmp_csv)

    n_unassigned = int((pred[f"{PREFIX}label"] == UNASSIGNED).sum())
    say(
        f"annotated {n} cells into {out_path}"
        + (f" and {csv_path}" if csv_path else "")
        + (f"; {n_unassigned} Unassigned (confidence < {min_confidence:g})" if min_confidence > 0 else "")
    )
    return summary


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _found_mask(col_map: np.ndarray, n_model: int) -> np.ndarray:
    mask = np.zeros(n_model, dtype=bool)
    mask[col_map[col_map >= 0]] = True
    return mask


def _fixed_mmap_threshold(nbytes: int = 64 << 20) -> None:
    """Fix glibc's mmap threshold at `nbytes` (it otherwise moves).

    glibc raises its mmap threshold each time a large block is freed, so the peak RSS of a
    streamed run wandered by 100-200 MiB from run to run. A fixed threshold stops that. Not
    lower than the per-block buffers (a few MB): blocks served by mmap are fresh pages every
    time, and their page faults cost a third of the run (1 MiB: 19.5 s, 64 MiB: 13.3 s for
    200k cells). Process-wide, hence applied by the command line only; a no-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, int(nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def annotate_from_cli(args) -> pd.DataFrame:
    """`cellcontrast annotate MODEL QUERY --out OUT [...]`."""
    _fixed_mmap_threshold()
    return annotate(
        args.model,
        args.query,
        args.out,
        csv_path=args.csv,
        layer=args.layer,
        batch_size=args.batch_size,
        min_confidence=args.min_confidence,
        min_overlap=args.min_overlap,
        case_insensitive=args.case_insensitive,
        store_probabilities=args.probabilities,
        threads=args.threads,
        label_key=getattr(args, "label_key", None),
    )
