"""A split's parts as matrices and integer labels: what every training and tuning reads."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    # Test cells of the types removed from training (split.json ``unseen_types``) are in
    # X["unseen"] (y: index into unseen_types), not in X["test"]
    unseen_types: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.info)



def load_split_data(split_dir: str | Path, parts=("train", "val", "test")) -> SplitData:
    """Counts and integer labels of the split's parts (train/val/test by default; tuning asks
    for train and val only, so test.h5ad is never opened), classes in split.json's order."""
    info, parts = read_split(split_dir, parts=parts)
    classes, unseen = list(info["classes"]), list(info.get("unseen_types") or [])
    genes = parts["train"].var_names.astype(str).tolist()
    X, y = {}, {}
    for name, adata in parts.items():
        if adata.var_names.astype(str).tolist() != genes:
            raise InputError(f"{split_dir}/{name}.h5ad has other genes than train.h5ad; rebuild the split")
        labels = pd.Categorical(adata.obs[LABEL].astype(str), categories=classes + (unseen if name == "test" else []))
        if (labels.codes < 0).any():
            raise InputError(f"{split_dir}/{name}.h5ad has labels outside split.json's classes; rebuild the split")
        X[name] = sp.csr_matrix(adata.X, dtype=np.float32)
        y[name] = labels.codes.astype(np.int64)
    if unseen and "test" in X:
        new = y["test"] >= len(classes)
        X["unseen"], y["unseen"] = X["test"][new], y["test"][new] - len(classes)
        X["test"], y["test"] = X["test"][~new], y["test"][~new]
    return SplitData(info=info, classes=classes, genes=genes, X=X, y=y, unseen_types=unseen)

