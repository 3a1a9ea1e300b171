"""Which chain to use, chosen on validation one seed at a time.

Seeds redraw their splits from one atlas, so one seed's validation cells sit in the other
seeds' test sets. A choice averaged over seeds would therefore read the test cells of the
seed it is scored on; choosing per seed, on that seed's own validation part, never does.

With ``one_se``, the one-standard-error rule (Breiman et al. 1984; Hastie et al., ESL 7.10):
the simplest chain (first in ``prefer``) whose validation score is within one bootstrap
standard error of the best chain's. Validation sets of a few cells per type cannot tell
chains apart by less than that, and the simplest is the one that most often holds on new
cells.
"""

from __future__ import annotations

import pandas as pd

SELECTION_METRIC = "val_macro_f1"


def choose_per_seed(runs: pd.DataFrame, *, metric: str = SELECTION_METRIC, seed_key: str = "seed",
                    prefer: list[str] | None = None, method_key: str = "method",
                    one_se: bool = False) -> pd.DataFrame:
    """One row per seed: that seed's run with the highest ``metric``.

    Parameters
    ----------
    runs
        One row per (seed, chain) with the validation ``metric``; rows without it are ignored.
    metric
        A validation column; never a test column.
    seed_key
        The column naming each run's split (its seed, or fold).
    prefer, method_key
        On a tie (small validation sets often score several chains 1.0), the run whose
        ``method_key`` comes first in ``prefer`` (simplest first) wins; without it, the first row.
    one_se
        Choose the first in ``prefer`` among the runs within one standard error (column
        ``{metric}_se``) of the seed's best run; a best run without one falls back to the best.

    Returns
    -------
    The chosen rows, in seed order; a seed with no scored run has none.
    """
    if metric.startswith("test"):
        raise ValueError(f"a chain is chosen on validation, not on {metric!r}")
    scored = runs[runs[metric].notna()]
    if scored.empty:
        return scored
    rank = {m: i for i, m in enumerate(prefer or [])}
    order = scored.assign(_rank=[rank.get(m, len(rank)) for m in scored[method_key]] if prefer else 0,
                          _row=range(len(scored)))
    order = order.sort_values([seed_key, metric, "_rank", "_row"], ascending=[True, False, True, True], kind="stable")
    if one_se and f"{metric}_se" in order:
        best = order.drop_duplicates(seed_key).set_index(seed_key)
        floor = (best[metric] - best[f"{metric}_se"].fillna(0.0)).reindex(order[seed_key]).to_numpy()
        order = order[order[metric].to_numpy() >= floor - 1e-12]
        order = order.sort_values([seed_key, "_rank", metric, "_row"], ascending=[True, True, False, True],
                                  kind="stable")
    return order.drop_duplicates(seed_key).drop(columns=["_rank", "_row"])
