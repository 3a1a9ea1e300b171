"""The grid's results table: display names and orders of settings and models, and the tidy
form every report reads (one row per setting x seed x base x component)."""

from __future__ import annotations

import pandas as pd

from cellcontrast.core.errors import InputError

SETTING_ORDER = ("default", "scarce", "natural", "heldout")


SETTING_NAMES = {"default": "Default", "scarce": "Data Scarce", "natural": "Natural", "heldout": "Held-out batch"}


BASE_NAMES = {"lr": "LR", "actinn": "ACTINN", "scdae": "scDAE"}


COMPONENT_NAMES = {"none": "Base", "mlp": "MLP", "mls": "MLS"}


# metric key -> (results column, column title in Table 1)
METRICS = {"top1": ("test_top1", "Top-1"), "top3": ("test_top3", "Top-3"),
           "macro_f1": ("test_macro_f1", "F1")}


KEYS = ["setting", "seed", "base", "component"]


def model_name(base: str, component: str) -> str:
    """Display name as in the paper: "LR", "LR + MLP", "scDAE + MLS"."""
    name = BASE_NAMES.get(base, base)
    return name if component == "none" else f"{name} + {COMPONENT_NAMES.get(component, component)}"


def ordered(values, order) -> list[str]:
    """Known values in `order`, then any others in sorted order."""
    present = {str(v) for v in values}
    return [v for v in order if v in present] + sorted(present - set(order))


def settings_in(results: pd.DataFrame) -> list[str]:
    """The settings present, in the order default, scarce, natural (then any others)."""
    return ordered(results["setting"].unique(), SETTING_ORDER)


def clean_results(results: pd.DataFrame) -> pd.DataFrame:
    """Check the columns, normalise identifiers to strings and keep one row per grid cell.

    A grid cell listed twice (a re-run appended to the table) keeps its last row.
    """
    needed = KEYS + [col for col, _ in METRICS.values()]
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise InputError(f"results lack the column(s) {', '.join(missing)}; expected {', '.join(needed)}")
    df = results.copy()
    for col in ("setting", "base", "component"):
        df[col] = df[col].astype(str).str.strip()
    for col, _ in METRICS.values():
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.drop_duplicates(subset=KEYS, keep="last").reset_index(drop=True)


def markdown_table(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for _, row in frame.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines)
