"""The report's unseen-types table: how well each chain flags test cells of the types that
``--unseen-types`` removed from its training (``train/open_set.py`` scores them)."""

from __future__ import annotations

import pandas as pd

from cellcontrast.core.names import BASES, COMPONENTS
from cellcontrast.experiments.results import (
    SETTING_NAMES,
    clean_results,
    model_name,
    ordered,
    settings_in,
)

SCORE_NAMES = {"max_prob": "1 − top probability", "energy": "energy", "knn": "kNN distance",
               "centroid": "centroid distance", "expression": "expression"}
# The open-set metrics a chain logs (train/open_set.py) -> table heading; peers have the first
# three only. compare_peers.py reads this too.
OPEN_SET_COLUMNS = {
    "test_unseen_auroc_max_prob": f"AUROC {SCORE_NAMES['max_prob']}",
    "test_unseen_unassigned": "unseen Unassigned @0.5",
    "test_seen_unassigned": "seen Unassigned @0.5",
    **{f"test_unseen_auroc_{s}": f"AUROC {SCORE_NAMES[s]}" for s in ("energy", "knn", "centroid", "expression")},
    "test_unseen_unassigned_flag_unseen": "unseen Unassigned @0.5 --flag-unseen",
    "test_seen_unassigned_flag_unseen": "seen Unassigned @0.5 --flag-unseen",
    "test_unseen_unassigned_flag_expression": "unseen Unassigned @0.5 --flag-unseen expression",
    "test_seen_unassigned_flag_expression": "seen Unassigned @0.5 --flag-unseen expression",
    "test_unseen_flagged_knn": "unseen flagged (kNN, 5% of val)",
    "test_seen_flagged_knn": "seen flagged (kNN)",
    "test_unseen_flagged_centroid": "unseen flagged (centroid, 5% of val)",
    "test_seen_flagged_centroid": "seen flagged (centroid)",
}
COLUMNS = {"test_macro_f1": "seen macro F1", **OPEN_SET_COLUMNS}  # results column -> table heading


def unseen_frame(results: pd.DataFrame) -> pd.DataFrame | None:
    """Mean over seeds of every open-set metric, per setting and chain; None without them."""
    if "test_unseen_auroc_max_prob" not in results.columns:
        return None
    df = clean_results(results).dropna(subset=["test_unseen_auroc_max_prob"])
    if df.empty:
        return None
    rows = []
    for setting in settings_in(df):
        sub = df[df["setting"] == setting]
        for base in ordered(sub["base"].unique(), BASES):
            for component in ordered(sub["component"].unique(), COMPONENTS):
                runs = sub[(sub["base"] == base) & (sub["component"] == component)]
                if len(runs):
                    rows.append({"setting": setting, "model": model_name(base, component), "seeds": len(runs),
                                 **{c: runs[c].mean() for c in COLUMNS if c in runs}})
    return pd.DataFrame(rows)


def unseen_markdown(frame: pd.DataFrame) -> str:
    """One table per setting: seen-type macro F1, AUROC of each novelty score (unseen against
    seen test cells), and the share of each group Unassigned or flagged."""
    sections = ["# Unseen types: test cells of types removed from training, mean over seeds",
                "AUROC: unseen against seen test cells by each novelty score. Unassigned @0.5: the "
                "annotator's default `--min-confidence`; with `--flag-unseen`, also the cells above the energy "
                "that flags 5% of validation; with `--flag-unseen expression`, above the expression score "
                "that flags 1% of validation. Flagged (kNN): above the threshold that flags 5% of the "
                "validation cells (all of known types)."]
    for setting, sub in frame.groupby("setting", sort=False):
        table = sub.drop(columns="setting").rename(columns=COLUMNS)
        head = "| " + " | ".join(table.columns) + " |"
        rule = "|" + "|".join([":---"] + ["---:"] * (len(table.columns) - 1)) + "|"
        body = ["| " + " | ".join(v if isinstance(v, str) else (str(v) if isinstance(v, int) else f"{v:.3f}")
                                  for v in row) + " |" for row in table.itertuples(index=False)]
        sections.append(f"## {SETTING_NAMES.get(setting, setting)} (`{setting}`)\n\n" + "\n".join([head, rule, *body]))
    return "\n\n".join(sections) + "\n"
