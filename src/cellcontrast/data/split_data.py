"""A split's parts as matrices and integer labels: what every training and tuning reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellcontrast.core.errors import InputError
from cellcontrast.core.fingerprint import fingerprint
from cellcontrast.core.names import LABEL
from cellcontrast.data.splits import read_split


@dataclass
class SplitData:
    info: dict
    classes: list[str]
    genes: list[str]
    X: dict[str, sp.csr_matrix]
    y: dict[str, np.ndarray]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.info)



def load_split_data(split_dir: str | Path, parts=("train", "val", "test")) -> SplitData:
    """Counts and integer labels of the split's parts (train/val/test by default; tuning asks
    for train and val only, so test.h5ad is never opened), classes in split.json's order."""
    info, parts = read_split(split_dir, parts=parts)
    classes = list(info["classes"])
    genes = parts["train"].var_names.astype(str).tolist()
    X, y = {}, {}
    for name, adata in parts.items():
        if adata.var_names.astype(str).tolist() != genes:
            raise InputError(f"{split_dir}/{name}.h5ad has other genes than train.h5ad; rebuild the split")
        labels = pd.Categorical(adata.obs[LABEL].astype(str), categories=classes)
        if (labels.codes < 0).any():
            raise InputError(f"{split_dir}/{name}.h5ad has labels outside split.json's classes; rebuild the split")
        X[name] = sp.csr_matrix(adata.X, dtype=np.float32)
        y[name] = labels.codes.astype(np.int64)
    return SplitData(info=info, classes=classes, genes=genes, X=X, y=y)

