"""Which rule for choosing the chain holds up on test: the best validation macro F1, or the
one-standard-error rule (``cellcontrast.experiments.selection``), measured on a finished
``bench/compare_peers.py`` folder without retraining.

    .venv/bin/python bench/selection_rules.py --peers-dir reports/peers

For every dataset, setting and seed in ``peers.csv`` it reloads each saved chain, predicts that
seed's validation cells, and computes the bootstrap standard error of the validation macro F1
(``train.metrics.macro_f1_standard_error``). Each rule then chooses per seed on validation only;
the table gives the chosen chains' mean test macro F1 beside the best peer's, and what each rule
chose. Test figures are read only to score a choice, never to make it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from cellcontrast.core.names import CHAINS_SIMPLEST_FIRST
from cellcontrast.data.split_data import load_split_data
from cellcontrast.experiments.selection import choose_per_seed
from cellcontrast.nn.chain import load_chain, predict_proba
from cellcontrast.train.metrics import classification_metrics, macro_f1_standard_error

SIMPLEST_FIRST = list(CHAINS_SIMPLEST_FIRST)


def _with_standard_errors(peers_dir: Path, chains: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (dataset, setting, seed), group in chains.groupby(["dataset", "setting", "seed"]):
        split = load_split_data(peers_dir / dataset / "splits" / setting / f"seed{seed}", parts=("train", "val"))
        for _, row in group.iterrows():
            base, _, component = row["method"].partition("+")
            chain, _ = load_chain(peers_dir / dataset / "models" / setting / f"seed{seed}" / f"{base}-{component or 'none'}")
            proba = predict_proba(chain, split.X["val"])
            found = classification_metrics(split.y["val"], proba, len(split.classes))["macro_f1"]
            if abs(found - row["val_macro_f1"]) > 1e-3:
                raise SystemExit(f"{dataset}/{setting}/seed{seed}/{row['method']}: saved chain gives val macro F1 "
                                 f"{found:.4f}, peers.csv {row['val_macro_f1']:.4f}; not the same run")
            se = macro_f1_standard_error(split.y["val"], proba.argmax(axis=1), len(split.classes))
            rows.append({**row.to_dict(), "val_macro_f1_se": se})
        print(f"{dataset} {setting} seed {seed}: {len(group)} chains", flush=True)
    return pd.DataFrame(rows)


def compare(peers_dir: Path) -> pd.DataFrame:
    runs = pd.read_csv(peers_dir / "peers.csv")
    chains = _with_standard_errors(peers_dir, runs[runs["kind"] == "cellcontrast"])
    peers = runs[runs["kind"] == "peer"]
    out = []
    for (dataset, setting), group in chains.groupby(["dataset", "setting"], sort=False):
        best = choose_per_seed(group, prefer=SIMPLEST_FIRST)
        one_se = choose_per_seed(group, prefer=SIMPLEST_FIRST, one_se=True)
        lr = group[group["method"] == "lr"]
        peer_means = peers[(peers["dataset"] == dataset) & (peers["setting"] == setting)] \
            .groupby("method")["test_macro_f1"].mean()
        out.append({"dataset": dataset, "setting": setting, "seeds": group["seed"].nunique(),
                    "best val": best["test_macro_f1"].mean(), "one-SE": one_se["test_macro_f1"].mean(),
                    "LR": lr["test_macro_f1"].mean(), "best peer": peer_means.max(),
                    "best peer is": peer_means.idxmax(),
                    "median val SE": group["val_macro_f1_se"].median(),
                    "chosen (best val)": _counts(best), "chosen (one-SE)": _counts(one_se)})
    return pd.DataFrame(out)


def _counts(chosen: pd.DataFrame) -> str:
    return ", ".join(f"{m} x{n}" for m, n in chosen["method"].value_counts().items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers-dir", required=True, type=Path, nargs="+")
    args = p.parse_args()
    table = pd.concat([compare(d) for d in args.peers_dir], ignore_index=True)
    for rule in ("best val", "one-SE", "LR"):
        table[f"{rule} - peer"] = table[rule] - table["best peer"]
    print(table.to_markdown(index=False, floatfmt=".3f"))
    for rule in ("best val", "one-SE", "LR"):
        gap = table[f"{rule} - peer"]
        print(f"{rule}: at least the best peer in {int((gap >= 0).sum())} of {len(gap)}; "
              f"mean gap {gap.mean():+.3f}, worst {gap.min():+.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
