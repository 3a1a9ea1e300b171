"""`Chain`, the trained annotator a user holds in Python: load, save, export, predict."""

from __future__ import annotations

import os
from pathlib import Path

import anndata
import numpy as np
import scipy.sparse as sp

from cellcontrast.annotation.genes import align_genes
from cellcontrast.core.errors import InputError
from cellcontrast.data.atlas import select_counts
from cellcontrast.data.counts import check_counts, matrix_values
from cellcontrast.export.onnx import export_chain_to_onnx, normalize_config
from cellcontrast.nn.chain import ChainModule, load_chain_folder, predict_proba, save_chain


class Chain:
    """A trained chain, preprocessing -> encoder -> (component) -> head, with its genes and classes.

    Made by `cellcontrast.fit` or loaded from a folder that ``cellcontrast train`` or
    `Chain.save` wrote. `export` writes the one ONNX file that `cellcontrast.annotation` runs.

    Attributes
    ----------
    module
        The torch module: raw counts ``[cells, genes]`` in, calibrated probabilities out.
    config
        Genes, class names, base, component, parameters and validation metrics.
    """

    def __init__(self, module: ChainModule, config: dict):
        self.module = module.eval()
        self.config = dict(config)

    @property
    def genes(self) -> list[str]:
        """The input genes, in the order the module expects its columns."""
        return list(self.config["genes"])

    @property
    def classes(self) -> list[str]:
        """The cell types, in the order of the probability columns."""
        return list(self.config["class_names"])

    @property
    def metrics(self) -> dict:
        """Validation metrics (macro F1, top-1, top-3, ECE, temperature)."""
        return dict(self.config.get("metrics") or {})

    def __repr__(self) -> str:
        base, component = self.config.get("base"), self.config.get("component")
        return f"Chain({base} + {component}: {len(self.genes)} genes -> {len(self.classes)} types)"

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Chain:
        """Load a chain folder (``chain.pt`` + ``config.json``), weights only (no pickle runs).

        ``folder`` may also be the ``--out-dir`` of one ``cellcontrast train``.
        """
        return cls(*load_chain_folder(folder))

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``chain.pt`` and ``config.json`` into ``folder`` (atomically); returns it."""
        if not isinstance(self.module, ChainModule):
            raise InputError("an ensemble annotator, or one whose energy is another chain's, is kept as its ONNX "
                             "file (Chain.export), not as a chain folder")
        return save_chain(self.module, self.config, folder)

    def export(self, path: str | os.PathLike) -> Path:
        """Export to one self-contained ONNX file (checked against torch); returns its path."""
        path = Path(path)
        if path.suffix.lower() != ".onnx":
            raise InputError(f"{path} should end in .onnx")
        return export_chain_to_onnx(self.module, normalize_config(self.config), path)

    def predict_proba(self, adata: anndata.AnnData, *, layer: str | None = None) -> np.ndarray:
        """Calibrated class probabilities ``[cells, classes]`` of an AnnData's raw counts, its
        genes matched to the chain's by name (genes it lacks count as zeros)."""
        if not isinstance(adata, anndata.AnnData):
            raise InputError(f"predict_proba takes an AnnData, not {type(adata).__name__}")
        X, var_names = select_counts(adata, layer, "the AnnData")
        X = sp.csr_matrix(X, dtype=np.float32)
        check_counts(matrix_values(X), "the AnnData's counts")
        col_map = align_genes(var_names.astype(str), self.genes)
        keep = np.flatnonzero(col_map >= 0)
        if keep.size == 0:
            raise InputError("none of the chain's genes is in the AnnData; are gene names of the same kind?")
        # A 0/1 matrix moves the query's columns into the chain's gene order.
        move = sp.csr_matrix((np.ones(keep.size, np.float32), (np.arange(keep.size), col_map[keep])),
                             shape=(keep.size, len(self.genes)))
        return predict_proba(self.module, X[:, keep] @ move)
