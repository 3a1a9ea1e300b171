"""Which chain to use, chosen on validation one seed at a time.

Seeds redraw their splits from one atlas, so one seed's validation cells sit in the other
seeds' test sets. A choice averaged over seeds would therefore read the test cells of the
seed it is scored on; choosing per seed, on that seed's own validation part, never does.
"""

from __future__ import annotations

import pandas as pd

SELECTION_METRIC = "val_macro_f1"


def choose_per_seed(runs: pd.DataFrame, *, metric: str = SELECTION_METRIC, seed_key: str = "seed") -> pd.DataFrame:
    """One row per seed: that seed's run with the highest ``metric`` (the first such row on a tie).

    Parameters
    ----------
    runs
        One row per (seed, chain) with the validation ``metric``; rows without it are ignored.
    metric
        A validation column; never a test column.
    seed_key
        The column naming each run's split (its seed, or fold).

    Returns
    -------
    The chosen rows, in seed order; a seed with no scored run has none.
    """
    if metric.startswith("test"):
        raise ValueError(f"a chain is chosen on validation, not on {metric!r}")
    scored = runs[runs[metric].notna()]
    if scored.empty:
        return scored
    rows = scored.groupby(seed_key, sort=True)[metric].idxmax()
    return scored.loc[rows.to_numpy()]
