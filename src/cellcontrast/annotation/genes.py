"""Matching the query's genes to the model's: by name, or by a ``var`` column (``gene_key``),
with Ensembl version suffixes ignored, and a hint naming the column that would match."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pandas as pd

from cellcontrast.core.errors import InputError

# ENSG00000141510.17 -> ENSG00000141510 (any species' prefix: ENSMUSG, ENSDARG, ...)
_VERSIONED_ID = re.compile(r"^(ENS[A-Z]*\d{6,})\.\d+$")
_ENSEMBL_ID = re.compile(r"^ENS[A-Z]*\d{6,}(\.\d+)?$")


def strip_version(name: str) -> str:
    """An Ensembl ID without its version suffix; any other name unchanged."""
    match = _VERSIONED_ID.match(name)
    return match.group(1) if match else name


def identifier_kind(genes: Iterable[str]) -> str:
    """``"ensembl"`` when most names are Ensembl IDs, else ``"symbol"``."""
    genes = list(genes)
    hits = sum(bool(_ENSEMBL_ID.match(str(g))) for g in genes)
    return "ensembl" if genes and hits > len(genes) / 2 else "symbol"


def align_genes(
    query_genes: pd.Index, model_genes: list[str], case_insensitive: bool = False
) -> np.ndarray:
    """For each query gene, its column in the model (-1 if the model lacks it).

    Ensembl version suffixes are ignored on both sides. Raises `InputError` when a model gene
    matches more than one query gene (duplicated names).
    """
    lower = (lambda s: s.lower()) if case_insensitive else (lambda s: s)
    model_pos = {lower(strip_version(g)): i for i, g in enumerate(model_genes)}
    if len(model_pos) != len(model_genes):
        raise InputError(
            "the model's genes are not unique when case and versions are ignored; drop --case-insensitive"
        )
    col_map = np.fromiter(
        (model_pos.get(lower(strip_version(str(g))), -1) for g in query_genes), dtype=np.int64,
        count=len(query_genes),
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


def _overlap(names: Iterable[str], model_genes: set[str]) -> float:
    return len({strip_version(str(g)) for g in names} & model_genes) / max(1, len(model_genes))


def better_gene_key(columns: Mapping[str, Callable[[], Iterable[str]]], model_genes: list[str],
                    min_overlap: float) -> str | None:
    """The ``var`` column whose values hold at least ``min_overlap`` of the model's genes, if
    one does (the best); ``columns`` maps a column name (``""``: the index) to a function
    reading its values."""
    wanted = {strip_version(g) for g in model_genes}
    best, best_overlap = None, min_overlap
    for name, read in columns.items():
        try:
            overlap = _overlap(read(), wanted)
        except Exception:  # a column that cannot be read as names is no candidate
            continue
        if overlap >= best_overlap:
            best, best_overlap = name, overlap
    return best


def model_columns(var_names: pd.Index, model_genes: list[str], *, min_overlap: float,
                  case_insensitive: bool, gene_key: str | None, say,
                  other_columns: Mapping[str, Callable[[], Iterable[str]]] | None = None,
                 weights: np.ndarray | None = None) -> np.ndarray:
    """Each query gene's model column (-1: unused); refuses an overlap below ``min_overlap``,
    naming a ``var`` column of ``other_columns`` that would match (``--gene-key``).

    With ``weights`` (each model gene's share of what the model draws from it, `cellcontrast
    fit` records them) the overlap is the weight of the genes found, not their count: a query
    lacking a thousand genes the model barely reads is no worse than one lacking none, and one
    lacking its ten markers is refused.
    """
    col_map = align_genes(var_names, model_genes, case_insensitive)
    n_model = len(model_genes)
    found = int((col_map >= 0).sum())
    frac = found / n_model
    where = f"var[{gene_key!r}]" if gene_key else "the query's var_names"
    weighted = None if weights is None else float(np.asarray(weights)[found_mask(col_map, n_model)].sum())
    carried = "" if weighted is None else f", carrying {100 * weighted:.1f}% of what the model draws on"
    if (frac if weighted is None else weighted) < min_overlap:
        key = better_gene_key(other_columns or {}, model_genes, min_overlap)
        if key == "":
            hint = "drop --gene-key: the var_names hold them"
        elif key is not None:
            hint = f"try --gene-key {key} (gene_key={key!r}): that var column holds them"
        else:
            hint = "are gene names of the same kind (symbols vs Ensembl IDs)?" + (
                "" if case_insensitive else " try --case-insensitive")
        raise InputError(f"only {found} of {n_model} model genes ({100 * frac:.1f}%{carried}) found in {where} "
                         f"(need {100 * min_overlap:.0f}%, --min-overlap); {hint}")
    say(f"found {found} of {n_model} model genes ({100 * frac:.1f}%{carried}) in {where}; "
        f"{n_model - found} missing genes set to 0")
    return col_map
