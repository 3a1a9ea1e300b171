"""Score the saved chains of a finished ``--unseen-types`` benchmark again with today's
open-set metrics (``train/open_set.py``), without retraining: for a metric added after the run,
such as the Unassigned rates with ``annotate --flag-unseen``.

    .venv/bin/python bench/rescore_open_set.py --benchmark-dir reports/unseen/atlas

Reads ``splits/<setting>/seed<k>`` and ``models/<setting>/seed<k>/<base>-<component>`` under the
folder (what ``cellcontrast benchmark --unseen-types N --out-dir`` writes), prints one Markdown
table per setting (mean over seeds or folds) and writes ``open_set_rescored.csv`` beside them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from cellcontrast.data.split_data import load_split_data
from cellcontrast.experiments.open_set_report import COLUMNS
from cellcontrast.nn.chain import load_chain, predict_proba
from cellcontrast.train.metrics import classification_metrics
from cellcontrast.train.open_set import open_set_metrics


def rescore(root: Path) -> pd.DataFrame:
    rows = []
    for split_dir in sorted(root.glob("splits/*/seed*")):
        data = load_split_data(split_dir)
        if not data.unseen_types:
            continue
        setting, seed = split_dir.parent.name, split_dir.name
        for model_dir in sorted((root / "models" / setting / seed).glob("*-*")):
            chain, _ = load_chain(model_dir)
            found = open_set_metrics(chain, data.X["train"], data.y["train"], data.X["val"], data.X["test"],
                                     data.X["unseen"], seed=int(seed.removeprefix("seed")))
            f1 = classification_metrics(data.y["test"], predict_proba(chain, data.X["test"]), len(data.classes))
            rows.append({"setting": setting, "seed": seed, "model": model_dir.name,
                         "test_macro_f1": f1["macro_f1"], **{f"test_{k}": v for k, v in found.items()}})
            print(f"{setting} {seed} {model_dir.name}: AUROC energy {found['unseen_auroc_energy']:.3f}, "
                  f"Unassigned with --flag-unseen {found['unseen_unassigned_flag_unseen']:.3f} unseen / "
                  f"{found['seen_unassigned_flag_unseen']:.3f} seen", flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--benchmark-dir", required=True, type=Path)
    args = p.parse_args()
    frame = rescore(args.benchmark_dir)
    if frame.empty:
        raise SystemExit(f"no split with unseen types under {args.benchmark_dir}/splits")
    frame.to_csv(args.benchmark_dir / "open_set_rescored.csv", index=False)
    columns = [c for c in COLUMNS if c in frame]
    for setting, sub in frame.groupby("setting"):
        mean = sub.groupby("model", sort=False)[columns].mean().rename(columns=COLUMNS)
        print(f"\n## {setting} ({sub['seed'].nunique()} seeds or folds)\n")
        print(mean.to_markdown(floatfmt=".3f"))


if __name__ == "__main__":
    main()
