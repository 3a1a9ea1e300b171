"""The query's count matrix, read by row chunks: straight from an h5ad file with h5py
(CSR ranges, dense row slices, CSC through anndata), or from an AnnData in memory or backed.

Memory stays flat however many cells a file holds: only one chunk is read at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellcontrast.core.errors import InputError
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


def dataframe_index(group) -> pd.Index:
    """The index of an anndata-encoded dataframe group, without reading its columns."""
    name = group.attrs.get("_index", "_index")
    if isinstance(name, bytes):
        name = name.decode()
    values = read_elem(group[name])
    return pd.Index(np.asarray(values).astype(str))


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
    var_names = dataframe_index(file[var_group])

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
    hint = ", e.g. layer='counts' or layer='raw'"

    @classmethod
    def of(cls, adata, layer: str | None) -> MemoryMatrix:
        """The counts of ``adata``: ``X``, ``layers[layer]`` or ``raw`` (``layer="raw"``)."""
        if layer in (None, "", "X"):
            matrix, where, var_names = adata.X, "X", adata.var_names
        elif layer == "raw":
            if adata.raw is None:
                raise InputError("the AnnData has no .raw; drop layer='raw' to read X, or name one of its layers")
            matrix, where, var_names = adata.raw.X, "raw.X", adata.raw.var_names
        elif layer in adata.layers:
            matrix, where, var_names = adata.layers[layer], f"layers[{layer!r}]", adata.var_names
        else:
            have = ", ".join(map(str, adata.layers.keys())) or "none"
            raise InputError(f"the AnnData has no layer {layer!r} (layers: {have}); use layer='raw' for .raw "
                             "or layer=None for X")
        if matrix is None:
            raise InputError(f"the AnnData has no {where} matrix; pass layer= with the layer holding raw counts")
        if sp.issparse(matrix) and matrix.format == "csc":
            matrix = matrix.tocsr()  # rows of a CSC matrix cost a pass over all of it; one copy instead
        return cls(matrix, where, pd.Index(np.asarray(var_names).astype(str)))

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
