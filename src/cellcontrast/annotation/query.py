"""The query's count matrix, read by row chunks: straight from an h5ad file with h5py
(CSR ranges, dense row slices, CSC through anndata), or from an AnnData in memory or backed.

Memory stays flat however many cells a file holds: only one chunk is read at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellcontrast.core.errors import InputError, first_line
from cellcontrast.data.h5chunks import ChunkedGzipArray

# Most bytes of matrix values read at once (a chunk holds fewer rows than the batch size when
# its rows are wider than this allows).
READ_BYTES = 128 << 20


def read_elem(elem):
    import anndata

    reader = getattr(getattr(anndata, "io", None), "read_elem", None)
    if reader is None:  # anndata < 0.11
        from anndata.experimental import read_elem as reader
    return reader(elem)


def _names(values) -> pd.Index:
    """Gene or cell names as a string Index."""
    return pd.Index(np.asarray(values).astype(str))


def dataframe_index(group) -> pd.Index:
    """The index of an anndata-encoded dataframe group, without reading its columns."""
    name = group.attrs.get("_index", "_index")
    if isinstance(name, bytes):
        name = name.decode()
    return _names(read_elem(group[name]))


def _name_columns_h5(group, skip: str | None) -> dict:
    """Readers of a var group's columns that hold strings (candidates for ``--gene-key``)."""
    # "" stands for the index (var_names), a candidate only when a column is in use
    readers = {} if skip is None else {"": lambda: dataframe_index(group)}
    for name in group.keys():
        encoding = group[name].attrs.get("encoding-type", "")
        encoding = encoding.decode() if isinstance(encoding, bytes) else encoding
        if name != skip and name != group.attrs.get("_index") and encoding in ("string-array", "categorical"):
            readers[name] = (lambda elem: lambda: _names(read_elem(elem)))(group[name])
    return readers


def gene_names_h5(group, gene_key: str | None, where: str) -> pd.Index:
    """The gene names of a var group: its index, or the column ``gene_key``."""
    if gene_key is None:
        return dataframe_index(group)
    columns = [c for c in group.keys() if c != group.attrs.get("_index")]
    if gene_key not in columns:
        raise InputError(f"--gene-key {gene_key!r} is not a column of the query's {where} "
                         f"(columns: {', '.join(columns[:10]) or 'none'})")
    return _names(read_elem(group[gene_key]))


@dataclass
class QueryMatrix:
    """Row-chunk reader over an h5ad count matrix (CSR, CSC or dense) opened with h5py."""

    # Where raw counts may be, for a refusal of the query's values.
    hint = ", e.g. --layer counts or --layer raw"

    file: Any
    where: str
    n_obs: int
    n_vars: int
    kind: str  # "csr", "csc" or "dense"
    var_names: pd.Index
    _elem: Any = None
    _var_group: Any = field(default=None, repr=False)
    gene_key: str | None = None
    _indptr: np.ndarray | None = field(default=None, repr=False)
    _backed: Any = field(default=None, repr=False)
    # CSR data and indices read by inflating their gzip chunks in threads (h5chunks), if stored so
    _inflated: tuple | None = field(default=None, repr=False)

    def other_gene_columns(self) -> dict:
        """Readers of the var columns (and index) not used as gene names: the refusal's hint."""
        return _name_columns_h5(self._var_group, self.gene_key)

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


def open_query(file, layer: str | None, pool=None, gene_key: str | None = None) -> QueryMatrix:
    """Locate the count matrix and its gene names (``var_names``, or the var column
    ``gene_key``) in an open h5ad (h5py.File).

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
    var_names = gene_names_h5(file[var_group], gene_key, var_group)

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
    matrix = QueryMatrix(file, where, n_obs, n_vars, kind, var_names, _elem=elem, _indptr=indptr,
                         _var_group=file[var_group], gene_key=gene_key)
    if kind == "csr" and pool is not None:

        arrays = (elem["data"], elem["indices"])
        if all(ChunkedGzipArray.supports(a) for a in arrays):
            matrix._inflated = tuple(ChunkedGzipArray(a, pool) for a in arrays)
    return matrix


@dataclass
class MemoryMatrix:
    """Row chunks of an AnnData's count matrix: in memory (dense, CSR, CSC) or backed."""

    matrix: Any
    where: str
    var_names: pd.Index
    var: pd.DataFrame | None = None
    gene_key: str | None = None
    hint = ", e.g. layer='counts' or layer='raw'"

    @classmethod
    def of(cls, adata, layer: str | None, gene_key: str | None = None) -> MemoryMatrix:
        """The counts of ``adata``: ``X``, ``layers[layer]`` or ``raw`` (``layer="raw"``); gene
        names from ``var_names`` or the var column ``gene_key``."""
        if layer in (None, "", "X"):
            matrix, where, var = adata.X, "X", adata.var
        elif layer == "raw":
            if adata.raw is None:
                raise InputError("the AnnData has no .raw; drop layer='raw' to read X, or name one of its layers")
            matrix, where, var = adata.raw.X, "raw.X", adata.raw.var
        elif layer in adata.layers:
            matrix, where, var = adata.layers[layer], f"layers[{layer!r}]", adata.var
        else:
            have = ", ".join(map(str, adata.layers.keys())) or "none"
            raise InputError(f"the AnnData has no layer {layer!r} (layers: {have}); use layer='raw' for .raw "
                             "or layer=None for X")
        if matrix is None:
            raise InputError(f"the AnnData has no {where} matrix; pass layer= with the layer holding raw counts")
        if gene_key is not None and gene_key not in var.columns:
            raise InputError(f"gene_key {gene_key!r} is not a var column of the AnnData "
                             f"(columns: {', '.join(map(str, var.columns[:10])) or 'none'})")
        if sp.issparse(matrix) and matrix.format == "csc":
            matrix = matrix.tocsr()  # rows of a CSC matrix cost a pass over all of it; one copy instead
        names = var.index if gene_key is None else var[gene_key]
        return cls(matrix, where, _names(names), var, gene_key)

    def other_gene_columns(self) -> dict:
        """Readers of the var columns (and index) not used as gene names: the refusal's hint."""
        readers = {} if self.gene_key is None else {"": lambda: _names(self.var.index)}
        for name in self.var.columns:
            column = self.var[name]
            if name != self.gene_key and (column.dtype == object or isinstance(column.dtype, pd.CategoricalDtype)
                                          or pd.api.types.is_string_dtype(column.dtype)):
                readers[str(name)] = (lambda c: lambda: _names(c))(column)
        return readers

    @property
    def n_obs(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.matrix.shape[1])

    def chunk_stop(self, start: int, batch_size: int, max_bytes: int | None = None) -> int:
        return min(start + batch_size, self.n_obs)

    def rows(self, start: int, stop: int):
        """Rows [start, stop) as a scipy CSR matrix (sparse) or a numpy array (dense)."""
        block = self.matrix[start:stop]
        if hasattr(block, "to_memory"):
            block = block.to_memory()
        return block if sp.issparse(block) else np.asarray(block)


def check_paths(query_path: Path, out_path: Path, csv_path: Path | None) -> None:
    if not query_path.is_file():
        raise InputError(f"query file {query_path} does not exist; pass an .h5ad with raw counts")
    for target in [out_path] + ([csv_path] if csv_path else []):
        if target.exists() and target.resolve() == query_path.resolve():
            raise InputError(f"output {target} is the query file itself; write the annotation to a new file")
    if csv_path is not None and csv_path.resolve() == out_path.resolve():
        raise InputError("--csv and --out name the same file; give them different names")
    if not h5py.is_hdf5(query_path):
        raise InputError(f"query {query_path} is not an .h5ad (HDF5) file; convert it with anndata first")


def read_query(f, query_path: Path, layer: str | None, pool, label_key: str | None, gene_key: str | None):
    """The count matrix and obs of an open query file, both checked."""
    try:
        matrix = open_query(f, layer, pool, gene_key)
        obs = read_elem(f["obs"]) if "obs" in f else None
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot read the query {query_path}: {first_line(err, 200)}") from err
    if obs is None or len(obs) != matrix.n_obs:
        raise InputError(f"the query's obs does not match its {matrix.where} ({matrix.n_obs} cells)")
    check_not_empty(matrix)
    if label_key is not None and label_key not in obs.columns:
        raise InputError(f"--label-key {label_key!r} is not an obs column of the query "
                         f"(columns: {', '.join(map(str, obs.columns[:10])) or 'none'})")
    return matrix, obs


def check_not_empty(matrix) -> None:
    if matrix.n_obs == 0 or matrix.n_vars == 0:
        raise InputError(f"the query is empty ({matrix.n_obs} cells x {matrix.n_vars} genes); "
                         "pass an .h5ad with cells and genes")
