"""Matching the query's genes to the model's, by name."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError


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


def found_mask(col_map: np.ndarray, n_model: int) -> np.ndarray:
    mask = np.zeros(n_model, dtype=bool)
    mask[col_map[col_map >= 0]] = True
    return mask
