"""Does the contrastive component earn its place on new donors? Each chain variant against its
own base and the best peer, fold by fold, and the figure (the paper's Figure 2, for new donors).

Reads the rows `bench/chain_on_query.py` appends (one fit per chain variant and held-out donor,
through ``cc.fit_annotator(..., batch_key="donor")``: every choice inside made on the
reference's own held-out donors) and the peers' rows of `bench/heldout_user_path.py`'s CSV for
the same folds. A variant is ``chain`` plus its ``--tag`` (``default``: the recipe as shipped,
components with cross-batch positives under ``--batch-key``; ``finetuned0.5``: the encoder
fine-tuned with ``contrastive_weight`` 0.5; ``centroid``: the component with the nearest-centroid
head). Prints a Markdown table: each variant's held-out-donor macro F1 per fold, mean and
standard error over folds, the paired difference to its base (``scdae`` for ``scdae+...``) with its
standard error, how many folds the grouped-validation score ranked it above its base and above
every other variant run on the fold (``top selection``: what a fit offered all of them would
take before its one-SE rule), with ``--together`` rows of the ``default`` group how often the fit offered that group chose it
(``chosen by fit``), what
`fit --batch-key` shipped on the fold (``cc_batchkey``), the best peer per fold and the peer with
the best mean; writes the figure with ``--png``.

    .venv/bin/python bench/contrastive_heldout.py --chains-csv human_chains.csv \\
        --peers-csv docs/results/heldout_user_path_head.csv --dataset human --png fig.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

PEERS = ("celltypist", "svm", "logreg", "knn", "scanvi")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chains-csv", type=Path, nargs="+", required=True,
                   help="chain_on_query.py's CSVs (several: e.g. one per worker that ran folds beside another)")
    p.add_argument("--peers-csv", type=Path, required=True)
    p.add_argument("--dataset", required=True,
                   help="the dataset column of the peers' CSV (human, mouse, atlas; cross-study for the pairs of "
                        "docs/results/user_path_random_crossstudy.csv)")
    p.add_argument("--png", type=Path)
    return p.parse_args(argv)


def variants(chains: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, fold): query macro F1 and the grouped-validation score."""
    # held-out-donor folds end in heldout_<donor>; cross-study ones in <ref>_to_<query>, the peers' "ref->query"
    fold = chains["fold"].str.rsplit("/", n=1).str[-1]
    donor = np.where(fold.str.startswith("heldout_"), fold.str.removeprefix("heldout_"),
                     fold.str.replace("_to_", "->", regex=False))
    # "more": further chains of the shipped recipe, fitted together in a second group
    chains = chains.assign(donor=donor,
                           variant=np.where(chains["tag"].isin(["default", "more"]), chains["chain"],
                                            chains["chain"] + " (" + chains["tag"] + ")"))
    return chains.drop_duplicates(["variant", "donor"], keep="last")


def base_of(variant: str) -> str:
    return variant.split("+")[0].split(" ")[0]


def table(rows: pd.DataFrame, peers: pd.DataFrame) -> pd.DataFrame:
    test = rows.pivot(index="variant", columns="donor", values="query_macro_f1")
    selection = rows.pivot(index="variant", columns="donor", values="selection_score")
    donors = list(test.columns)
    out = test.copy()
    out["mean"] = test.mean(axis=1)
    out["se"] = test.std(axis=1, ddof=1) / np.sqrt(test.notna().sum(axis=1))
    for variant in test.index:
        base = base_of(variant)
        if variant == base or base not in test.index:
            continue
        gap = (test.loc[variant] - test.loc[base]).dropna()  # paired: folds where both ran
        out.loc[variant, "vs base"] = gap.mean()
        out.loc[variant, "vs base se"] = gap.std(ddof=1) / np.sqrt(len(gap)) if len(gap) > 1 else np.nan
        both = (selection.loc[variant] - selection.loc[base]).dropna()
        out.loc[variant, "ranked above base"] = f"{int((both > 0).sum())} of {len(both)}"
    if "chosen" in rows:  # --together rows of the first group: what one fit offered them all shipped (one-SE rule)
        first = rows[rows["tag"].eq("default") & rows["chosen"].fillna("").ne("")]
        picked = first[first["chosen"].eq(first["chain"])].set_index("variant")["donor"].groupby(level=0).size()
        for variant in test.index:
            if variant in set(first["variant"]):
                out.loc[variant, "chosen by fit"] = f"{int(picked.get(variant, 0))} of {int(test.loc[variant].notna().sum())}"
    # what grouped validation would pick among every variant tried on the fold: the top selection score
    top = selection.idxmax(axis=0)
    for variant in test.index:
        out.loc[variant, "top selection"] = f"{int((top == variant).sum())} of {int(selection.loc[variant].notna().sum())}"
    methods = peers.pivot(index="method", columns="heldout_donor", values="macro_f1").reindex(columns=donors)
    if "cc_batchkey" in methods.index:  # what `fit --batch-key donor` ships with its default chains
        out.loc["shipped: fit --batch-key (default chains)", donors] = methods.loc["cc_batchkey"]
        out.loc["shipped: fit --batch-key (default chains)", "mean"] = methods.loc["cc_batchkey"].mean()
    best = methods.loc[[m for m in PEERS if m in methods.index]]
    peer_row = best.max(axis=0)
    out.loc["best peer", donors] = peer_row
    out.loc["best peer", "mean"] = peer_row.mean()
    out.loc["best peer", "vs base"] = np.nan
    out.loc["best peer", "ranked above base"] = ", ".join(best.idxmax(axis=0).astype(str))
    top = best.mean(axis=1).idxmax()  # the peer with the best mean
    out.loc[f"best peer by mean ({top})", donors] = best.loc[top]
    out.loc[f"best peer by mean ({top})", "mean"] = best.loc[top].mean()
    return out


def figure(out: pd.DataFrame, path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    donors = [c for c in out.columns if c not in ("mean", "se", "vs base", "vs base se", "ranked above base",
                                                 "top selection", "chosen by fit")]
    names = list(out.index)
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 4.5))
    width = 0.8 / len(donors)
    for i, donor in enumerate(donors):
        ax.bar(np.arange(len(names)) + (i - (len(donors) - 1) / 2) * width, out[donor].astype(float), width,
               label=donor if "->" in donor else f"{donor} held out")
    ax.errorbar(np.arange(len(names)), out["mean"].astype(float), yerr=out["se"].astype(float).fillna(0),
                fmt="o", color="black", label="mean ± SE")
    ax.set_xticks(np.arange(len(names)), names, rotation=30, ha="right")
    cross = any("->" in d for d in donors)  # reference -> query study pairs
    ax.set(ylabel="macro F1 on the query" if cross else "macro F1 on the held-out donor",
           title=f"{dataset}: each chain on " + ("another study" if cross else "a new donor"),
           ylim=(max(0.0, float(out[donors].min().min()) - 0.1), 1.0))
    ax.legend(fontsize=7, ncol=3, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args) -> int:
    rows = variants(pd.concat([pd.read_csv(path) for path in args.chains_csv], ignore_index=True))
    peers = pd.read_csv(args.peers_csv)
    # the cross-study CSV names its dataset "cross-study <pairs>": --dataset cross-study matches it
    peers = peers[peers["dataset"].eq(args.dataset) | peers["dataset"].str.startswith(args.dataset + " ")]
    out = table(rows, peers)
    print(out.astype(object).where(out.notna(), None).to_markdown(floatfmt=".3f", missingval=""))
    if args.png:
        figure(out, args.png, args.dataset)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(parse()))
