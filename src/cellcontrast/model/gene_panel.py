"""The genes an annotator is trained on: those the reference detects, and (when the query is
known) those the query measures too, as reference-mapping tools do.

A reference written by Cell Ranger lists ~33,000 genes, most never detected; a query from
another lab lists the ~14,000 it kept. A gene never detected in the reference carries nothing
a model can learn (its counts are all zero, so no cell's library size changes without it),
and a model that lists it asks every query for it. Dropping it is exact. Restricting the
reference to the query's genes is not (a cell's library size then sums fewer genes), but it
trains the model on exactly what it will be given instead of reading absent genes as zeros.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import anndata
import numpy as np

from cellcontrast.annotation.genes import strip_version
from cellcontrast.core.errors import InputError

# A known query must share at least this share of the reference's detected genes.
MIN_SHARED = 0.5


def detected_genes(atlas: anndata.AnnData) -> np.ndarray:
    """Boolean mask of the genes with a count in at least one cell."""
    return np.asarray((atlas.X != 0).sum(axis=0)).ravel() > 0


def gene_panel(atlas: anndata.AnnData, genes: Iterable[str] | None = None, *, source: str = "genes=",
               say=None) -> anndata.AnnData:
    """``atlas`` restricted to the genes it detects and, with ``genes`` (a query's var_names),
    to those among them (names matched with Ensembl versions ignored). Says what it dropped.

    Raises `InputError` when ``genes`` shares less than ``MIN_SHARED`` of the detected genes.
    """
    say = say or (lambda text: print(text, file=sys.stderr))
    keep = detected_genes(atlas)
    n_detected = int(keep.sum())
    if n_detected < atlas.n_vars:
        say(f"note: {atlas.n_vars - n_detected} of {atlas.n_vars} reference genes are never detected; "
            "the annotator leaves them out")
    if genes is not None:
        wanted = {strip_version(str(g)) for g in genes}
        measured = np.fromiter((strip_version(str(g)) in wanted for g in atlas.var_names), dtype=bool,
                               count=atlas.n_vars)
        shared = int((keep & measured).sum())
        if shared < MIN_SHARED * max(n_detected, 1):
            raise InputError(f"{source} shares only {shared} of the reference's {n_detected} detected genes "
                             f"({100 * shared / max(n_detected, 1):.1f}%, need {100 * MIN_SHARED:.0f}%); "
                             "are gene names of the same kind (symbols vs Ensembl IDs)?")
        say(f"note: training on the {shared} detected reference genes that {source} measures too")
        keep &= measured
    return atlas if keep.all() else atlas[:, keep].copy()
