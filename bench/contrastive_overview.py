"""The paper's Figure 2 for new donors and studies: every base alone and with each form of the
contrastive component, in every setting of docs/results/contrastive_heldout.md, in one figure
and one table.

Reads the committed rows (`bench/chain_on_query.py`'s CSVs, through `contrastive_heldout.py`'s
`variants` and `table`): the mean macro F1 over the held-out donors (or the two directions
across species) and its standard error, each form's paired difference to its base, what
`fit --batch-key donor` ships and the best peer. A form that was not run is left blank.

    .venv/bin/python bench/contrastive_overview.py --png docs/results/contrastive_overview.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_heldout import table, variants  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
# title, chain rows, peers' rows, the peers' dataset, whether the references hold two batches or
# more (the mouse folds train on one donor: positives come from any cell of the type, the paper's)
SETTINGS = (
    ("human pancreas, 4 new donors", "contrastive_heldout_human.csv", "heldout_user_path_stop35.csv", "human", True),
    ("mouse pancreas, 2 new donors", "contrastive_heldout_mouse.csv", "heldout_user_path_stop35.csv", "mouse", False),
    ("simulated atlas, 4 new individuals", "contrastive_heldout_atlas.csv", "heldout_user_path_stop35.csv", "atlas",
     True),
    ("across species, 2 directions", "contrastive_crossstudy.csv", "user_path_random_crossstudy_stop35.csv",
     "cross-study", True),
)
BASES = ("lr", "scdae", "actinn")
# each form's column and the variant suffix it reads (several: the first that was run)
FORMS = {
    "alone": ("",),
    "MLP-CL": ("+mlp (labels)",),
    "MLS-CL": ("+mls (labels)",),
    "MLP-CL, cross-batch": ("+mlp",),
    "MLS-CL, cross-batch": ("+mls",),
    "MLP-CL, centroid head": ("+mlp (centroid)",),
    "encoder fine-tuned": (" (finetuned-validated)", " (finetuned0.5)"),
}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="where the CSVs are (docs/results)")
    p.add_argument("--png", type=Path)
    return p.parse_args(argv)


def _variant(found: pd.DataFrame, base: str, suffixes: tuple[str, ...], several_batches: bool) -> str | None:
    for suffix in suffixes:
        if not several_batches and suffix in ("+mlp (labels)", "+mls (labels)"):
            suffix = suffix.removesuffix(" (labels)")  # one training donor: the default rows are the paper's
        elif not several_batches and suffix in ("+mlp", "+mls"):
            return None  # no other donor to take positives from
        if f"{base}{suffix}" in found.index:
            return f"{base}{suffix}"
    return None


def overview(results: Path) -> pd.DataFrame:
    """One row per (setting, base, form): mean, se, vs base, vs base se, shipped, best peer."""
    rows = []
    for title, chains_csv, peers_csv, dataset, several in SETTINGS:
        peers = pd.read_csv(results / peers_csv)
        peers = peers[peers["dataset"].eq(dataset) | peers["dataset"].str.startswith(dataset + " ")]
        found = table(variants(pd.read_csv(results / chains_csv)), peers)
        chosen = _contrastive_chosen(pd.read_csv(results / chains_csv))
        shipped = found.filter(like="shipped", axis=0)["mean"]
        peer = found.loc["best peer", "mean"]
        for base in BASES:
            for form, suffixes in FORMS.items():
                name = _variant(found, base, suffixes, several)
                got = found.loc[name] if name is not None else pd.Series(dtype=object)
                rows.append({"setting": title, "base": base, "form": form, "variant": name,
                             "mean": got.get("mean"), "se": got.get("se"), "vs base": got.get("vs base"),
                             "vs base se": got.get("vs base se"),
                             "shipped": shipped.iloc[0] if len(shipped) else np.nan, "best peer": peer,
                             "contrastive chosen": chosen})
    return pd.DataFrame(rows)


def _contrastive_chosen(chains: pd.DataFrame) -> str:
    """In how many folds the fit offered the first group (``default``) shipped a contrastive chain."""
    first = chains[chains["tag"].eq("default") & chains["chosen"].fillna("").ne("")].groupby("fold")["chosen"].first()
    return f"{int(first.str.contains('+', regex=False).sum())} of {len(first)}"


def _cell(row) -> str:
    if row["variant"] is None or pd.isna(row["mean"]):
        return ""
    if row["form"] == "alone" or pd.isna(row["vs base"]):
        return f"{row['mean']:.3f}"
    return f"{row['mean']:.3f} ({row['vs base']:+.3f} ± {row['vs base se']:.3f})"


def markdown(found: pd.DataFrame) -> str:
    cells = found.assign(cell=found.apply(_cell, axis=1))
    wide = cells.pivot_table(index=["setting", "base"], columns="form", values="cell", aggfunc="first", sort=False)
    wide = wide.reindex(columns=list(FORMS)).fillna("")
    lines = ["| setting | base | " + " | ".join(FORMS) + " |", "|---|---|" + "---|" * len(FORMS)]
    for (setting, base), row in wide.iterrows():
        lines.append(f"| {setting} | {base} | " + " | ".join(row) + " |")
    lines += ["", "| setting | contrastive chain chosen by grouped validation | fit --batch-key ships | best peer of each fold |",
              "|---|---|---|---|"]
    for setting, row in found.groupby("setting", sort=False).first().iterrows():
        lines.append(f"| {setting} | {row['contrastive chosen']} | {row['shipped']:.3f} | {row['best peer']:.3f} |")
    return "\n".join(lines)


def figure(found: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(found["setting"]))
    fig, axes = plt.subplots(2, -(-len(settings) // 2), figsize=(11, 8.5), sharey=True)
    width = 0.8 / len(FORMS)
    colors = plt.get_cmap("tab10")
    for ax, setting in zip(axes.ravel(), settings, strict=True):
        part = found[found["setting"].eq(setting)]
        for i, form in enumerate(FORMS):
            bars = part[part["form"].eq(form)].set_index("base").reindex(list(BASES))
            x = np.arange(len(BASES)) + (i - (len(FORMS) - 1) / 2) * width
            ax.bar(x, bars["mean"].astype(float), width, yerr=bars["se"].astype(float).fillna(0),
                   color=colors(i), label=form, error_kw={"elinewidth": 0.8})
        ax.axhline(float(part["shipped"].iloc[0]), color="black", ls="--", lw=1, label="fit --batch-key ships")
        ax.axhline(float(part["best peer"].iloc[0]), color="grey", ls=":", lw=1.5, label="best peer of each fold")
        ax.set_xticks(np.arange(len(BASES)), list(BASES))
        ax.set_title(setting, fontsize=10)
    for ax in axes[:, 0]:
        ax.set_ylabel("macro F1 on the new donor or study\n(mean ± SE over folds)")
    axes[0, 0].set_ylim(0, 1)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)


def main(args) -> int:
    found = overview(args.results)
    print(markdown(found))
    if args.png:
        figure(found, args.png)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse()))
