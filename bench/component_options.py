"""Validation figures for the recipe's options: each option against the default on the same
splits, with the same tuned parameters, judged on VALIDATION.

    .venv/bin/python bench/component_options.py [--split-root data/splits] [--tuned-dir models/tuned]
        [--settings default,scarce] [--seeds 0,1] [--bases lr,actinn,scdae] [--components mlp,mls]
        [--options mlp.head_solver=adam,mls.views=2,lr.standardize=true] [--out reports/component_options.csv]

An option is ``model.key=value`` (model: a base or a component). For every split, base and
component (``none``: the base alone) the chain is trained once with the default recipe and once
per option that concerns it, and the table prints mean validation macro F1 (what a choice may
rest on) beside mean test macro F1 (reported, never used). The runs go to MLflow experiment
``component-options``. Used for the step-4 head solver (L-BFGS against the base's Adam recipe),
noisy views, class-balanced batches and LR's scaling (README, models section).
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import pandas as pd
import torch
import yaml

from cellcontrast.data.split_data import load_split_data
from cellcontrast.experiments.cell import train_cell
from cellcontrast.experiments.grid import merged_params, tuned_params


def parse_option(text: str) -> tuple[str, str, object]:
    name, _, value = text.partition("=")
    model, _, key = name.strip().partition(".")
    return model, key, yaml.safe_load(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split-root", default="data/splits")
    p.add_argument("--tuned-dir", default="models/tuned")
    p.add_argument("--params", default="params.yaml", help="its model_params are applied under the tuned values")
    p.add_argument("--settings", default="default,scarce")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--bases", default="lr,actinn,scdae")
    p.add_argument("--components", default="mlp,mls")
    p.add_argument("--options", default="mlp.head_solver=adam,mls.head_solver=adam")
    p.add_argument("--out", default="reports/component_options.csv")
    args = p.parse_args()
    torch.set_num_threads(1)
    fixed = (yaml.safe_load(Path(args.params).read_text()) or {}).get("model_params") or {}
    options = [("default", None)] + [(o, parse_option(o)) for o in args.options.split(",") if o]
    rows = []
    splits = itertools.product(args.settings.split(","), [int(s) for s in args.seeds.split(",")])
    for (setting, seed), base in itertools.product(list(splits), args.bases.split(",")):
        split = Path(args.split_root) / setting / f"seed{seed}"
        data = load_split_data(split)
        for component, (name, option) in itertools.product(args.components.split(","), options):
            if option and option[0] not in (base, component):
                continue
            params = merged_params(fixed, tuned_params(args.tuned_dir, setting, base, seed))
            if option:
                model, key, value = option
                params[model] = {**(params.get(model) or {}), key: value}
            with tempfile.TemporaryDirectory() as tmp:
                (row,) = [r for r in train_cell(split, base, [component], params, experiment="component-options",
                                                out_root=tmp, data=data, quiet=True) if r["component"] == component]
            rows.append({"setting": setting, "seed": seed, "base": base, "component": component, "option": name,
                         "val_macro_f1": row["val_macro_f1"], "test_macro_f1": row["test_macro_f1"]})
            print(f"{setting} seed {seed} {base}+{component} {name}: val {row['val_macro_f1']:.4f} "
                  f"test {row['test_macro_f1']:.4f}", flush=True)
    table = pd.DataFrame(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    means = table.groupby(["setting", "base", "component", "option"], sort=False)[["val_macro_f1", "test_macro_f1"]]
    print(means.mean().round(4).to_markdown())


if __name__ == "__main__":
    main()
