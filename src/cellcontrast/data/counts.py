"""The one check that a matrix holds raw counts, for training data and queries alike.

Every model is fitted on raw counts and carries its own normalisation, so scaled, centred or
log-normalised values give wrong predictions without any error. They are refused here, with
one line saying what was seen and where the counts may be instead.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cellcontrast.core.errors import InputError

# Values further than this from a whole number are not counts (float32 sums of counts are exact
# far beyond any cell's depth; this leaves room for files that stored counts / 1 in float16).
INTEGER_TOLERANCE = 1e-3
# float32, in which every model computes, holds whole numbers exactly up to 2**24: a larger
# "count" of one gene in one cell is no count (real data stay below about 1e6).
LARGEST_COUNT = 2**24


def matrix_values(X) -> np.ndarray:
    """The stored values of a dense or sparse matrix, as one flat array (no copy for sparse)."""
    return X.data if sp.issparse(X) else np.asarray(X).ravel()


def check_counts(values: np.ndarray, where: str, hint: str = "") -> None:
    """Refuse non-numeric, NaN, infinite, negative and non-integer values.

    ``where`` names the matrix ("atlas.h5ad X", "the query's layers/counts, chunk at cell 0");
    ``hint`` is appended to the advice, e.g. " (try --layer counts)".
    """
    values = np.asarray(values).reshape(-1)
    if values.size == 0:
        return
    if values.dtype.kind not in "biuf":
        raise InputError(f"{where} holds {values.dtype} values, not numbers")
    lowest, highest = values.min(), values.max()  # NaN anywhere makes both NaN
    if values.dtype.kind == "f" and not (np.isfinite(lowest) and np.isfinite(highest)):
        n_bad = int((~np.isfinite(values)).sum())
        raise InputError(f"{where} has NaN or infinite values ({n_bad} of them); pass raw counts{hint}")
    if lowest < 0:
        raise InputError(f"{where} has negative values (min {float(lowest):g}): scaled or centred data "
                         f"was given; pass raw counts{hint}")
    # As a Python float: compared as float16, the limit itself overflows (a RuntimeWarning on
    # stderr beside the one-line refusal).
    if float(highest) > LARGEST_COUNT:
        raise InputError(f"{where} has values up to {float(highest):.4g}, above {LARGEST_COUNT:,} "
                         f"(float32 holds no whole number beyond it): not counts; pass raw counts{hint}")
    if values.dtype.kind != "f":  # integers are counts once they are not negative
        return
    off = np.rint(values)
    np.subtract(values, off, out=off)
    np.abs(off, out=off)
    worst = int(np.argmax(off))
    if off[worst] > INTEGER_TOLERANCE:
        kind = "log-normalised" if highest < 30 else "normalised"
        raise InputError(f"{where} values are not counts: looks like {kind} data "
                         f"(e.g. {float(values[worst]):.4g}); pass raw counts{hint}")
