"""Read a labelled atlas of raw counts from .h5ad, and refuse bad input with one clear line.

Every model in cellcontrast is fit on raw counts and carries its own preprocessing, so the
reader's job is to find the counts (X, a layer, or .raw), check that they are counts, and
return a small, uniform AnnData: CSR float32 counts in X, the label in obs['cell_type'].
"""

from __future__ import annotations

import sys
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellcontrast.core.errors import InputError, first_line
from cellcontrast.core.names import LABEL
from cellcontrast.data.counts import check_counts, matrix_values


def open_h5ad(path: str | Path, backed: bool = False) -> ad.AnnData:
    """Open an .h5ad file, turning every way it can fail into an InputError."""
    path = _checked_path(path)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:  # anndata/h5py raise many types for damaged files
        raise InputError(f"cannot read {path} as .h5ad (truncated or damaged?): {first_line(err)}") from None


def read_obs(path: str | Path) -> pd.DataFrame:
    """Only the cell table of an .h5ad file (anndata's backed mode would load every layer too)."""
    path = _checked_path(path)
    try:
        with h5py.File(path, "r") as f:
            return ad.io.read_elem(f["obs"])
    except Exception as err:  # noqa: BLE001 - as open_h5ad
        raise InputError(f"cannot read {path} as .h5ad (truncated or damaged?): {first_line(err)}") from None


def _checked_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputError(f"no such file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not an .h5ad file")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    if not is_hdf5:
        raise InputError(f"{path} is not an .h5ad file (not HDF5); convert it with anndata first")
    return path


def select_counts(adata: ad.AnnData, layer: str | None, path: str | Path = "") -> tuple[object, pd.Index]:
    """Return (matrix, gene names) of the raw counts: X, a named layer, or .raw ('raw')."""
    if layer in (None, "", "X"):
        return adata.X, adata.var_names
    if layer == "raw":
        if adata.raw is None:
            raise InputError(f"--layer raw: {path} has no .raw; its layers are: {_names(adata.layers)}")
        return adata.raw.X, adata.raw.var_names
    if layer not in adata.layers:
        hint = " (or --layer raw, .raw is present)" if adata.raw is not None else ""
        raise InputError(f"no layer {layer!r} in {path}; its layers are: {_names(adata.layers)}{hint}")
    return adata.layers[layer], adata.var_names


def _names(keys) -> str:
    keys = list(keys)
    return ", ".join(map(str, keys)) if keys else "(none)"


def check_atlas_counts(X, where: str, layer: str | None = None, adata: ad.AnnData | None = None) -> None:
    """`check_counts` on a whole matrix, the advice naming where else counts may be."""
    check_counts(matrix_values(X), where, _where_counts_may_be(adata, layer))


def _where_counts_may_be(adata: ad.AnnData | None, layer: str | None) -> str:
    if adata is None:
        return ""
    options = [f"--layer {name}" for name in adata.layers.keys() if name != layer]
    if adata.raw is not None and layer != "raw":
        options.append("--layer raw")
    return f" (try {' or '.join(options)})" if options else " (this file holds no other matrix)"


def apply_filters(obs: pd.DataFrame, filters: dict[str, str] | None, path) -> np.ndarray:
    """Boolean mask of cells matching every COLUMN=VALUE filter (string comparison)."""
    mask = np.ones(len(obs), dtype=bool)
    for column, value in (filters or {}).items():
        if column not in obs.columns:
            raise InputError(f"--filter {column}={value}: no obs column {column!r} in {path}; columns are: {_names(obs.columns)}")
        col = obs[column].astype(str).to_numpy()
        hit = col == value
        if not hit.any():
            shown = ", ".join(sorted(set(col))[:12])
            raise InputError(f"--filter {column}={value} matches no cell; values of {column!r} are: {shown}")
        mask &= hit
    if not mask.any():
        raise InputError(f"the filters {filters} together match no cell")
    return mask


def read_atlas(
    path: str | Path,
    label_key: str = LABEL,
    layer: str | None = None,
    filters: dict[str, str] | None = None,
) -> ad.AnnData:
    """Read, filter and validate a labelled atlas file (see `prepare_atlas`)."""
    return prepare_atlas(open_h5ad(path), label_key=label_key, layer=layer, filters=filters, source=path)


def prepare_atlas(
    adata: ad.AnnData,
    label_key: str = LABEL,
    layer: str | None = None,
    filters: dict[str, str] | None = None,
    source: str | Path = "the AnnData",
) -> ad.AnnData:
    """Filter and validate a labelled atlas held in memory.

    Returns an AnnData with CSR float32 raw counts in X, unique gene names, the label as a
    string column obs['cell_type'] (cells without a label dropped, with a note), and the other
    obs columns kept. ``source`` names the data in messages.
    """
    path = source
    if label_key not in adata.obs.columns:
        raise InputError(
            f"no label column {label_key!r} in {path}; obs columns are: {_names(adata.obs.columns)} (use --label-key)"
        )
    X, genes = select_counts(adata, layer, path)
    mask = apply_filters(adata.obs, filters, path)
    where = f"{path}" + (f" layer {layer!r}" if layer else " X")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(f"{where} is empty ({X.shape[0]} cells x {X.shape[1]} genes)")
    if genes.has_duplicates:
        dup = genes[genes.duplicated()].unique()[:3].tolist()
        raise InputError(f"{path} has duplicate gene names (e.g. {dup}); make them unique (var_names_make_unique)")
    mask &= _labelled(adata.obs[label_key], mask, path, label_key)
    X = _in_memory(X)
    X = X[mask] if not mask.all() else X
    check_atlas_counts(X, where, layer, adata)
    # A copy: the caller's matrix (an AnnData in a notebook) is never changed.
    X = sp.csr_matrix(X, dtype=np.float32, copy=True)
    X.eliminate_zeros()
    X.sort_indices()

    obs = adata.obs.loc[mask].copy()
    obs[LABEL] = pd.Categorical(obs[label_key].astype(str).str.strip())
    if obs.index.has_duplicates:
        print(f"note: {path} has duplicate cell names; made unique by suffixes", file=sys.stderr)
        obs.index = ad.utils.make_index_unique(obs.index.astype(str))
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes.astype(str), name=None)))


def _in_memory(X):
    """A backed matrix (h5py dataset, anndata's sparse dataset) read into memory."""
    if sp.issparse(X) or isinstance(X, np.ndarray):
        return X
    if isinstance(X, h5py.Dataset):
        return X[()]
    if hasattr(X, "to_memory"):
        return X.to_memory()
    return np.asarray(X)


def _labelled(labels: pd.Series, mask: np.ndarray, path, label_key: str) -> np.ndarray:
    """Cells with a label; the others are left out with a note (none at all: refused)."""
    missing = labels.isna().to_numpy() | (labels.astype(str).str.strip() == "").to_numpy()
    if not (mask & ~missing).any():  # refuse before the note: a refusal is one line
        raise InputError(f"no cell of {path} has a label in {label_key!r}")
    if (missing & mask).any():
        print(f"note: {int((missing & mask).sum())} cells without a label in {label_key!r} are left out",
              file=sys.stderr)
    return ~missing
