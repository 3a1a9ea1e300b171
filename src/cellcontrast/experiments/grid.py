"""The paper's grid: every setting x seed x base x component, trained with the tuned
parameters, in worker processes.

Grid tasks are (setting, seed, base), each training the base once and then its contrastive
components (``cell.train_cell``); finished runs are recognised, so a restarted grid only trains
what is missing.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import as_completed
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from cellcontrast.core.engine import task_executor
from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path
from cellcontrast.core.names import BASES, COMPONENTS
from cellcontrast.core.params import load_params
from cellcontrast.experiments import tracking
from cellcontrast.experiments.cell import train_cell

DEFAULTS = {
    "bases": list(BASES),
    "components": list(COMPONENTS),
    "workers": 2,
    "threads": 1,
    "scheduler": None,
    "experiment": "cellcontrast",
    "split_root": "data/splits",
    "tuned_dir": "models/tuned",
    "models_dir": "models/grid",
    "results": "reports/results.csv",
    "model_params": {},
}


RESULT_COLUMNS = ["setting", "seed", "base", "component", "run_id", "val_top1", "val_top3",
                  "val_macro_f1", "test_top1", "test_top3", "test_macro_f1", "train_seconds"]


def grid_config(params: dict) -> dict:
    """The grid's knobs from params.yaml, with defaults for what is not there."""
    cfg = {**DEFAULTS, **(params.get("grid") or {})}
    cfg["settings"] = list((params.get("grid") or {}).get("settings") or params.get("settings", {}).keys())
    cfg["seeds"] = list(params.get("seeds", [0, 1, 2, 3, 4]))
    cfg["model_params"] = params.get("model_params") or {}
    return cfg


def merged_params(model_params: dict, tuned: dict) -> dict:
    """Fixed recipe overrides from params.yaml, then the tuned values on top, per model name."""
    names = set(model_params) | set(tuned)
    return {name: {**(model_params.get(name) or {}), **(tuned.get(name) or {})} for name in names}


def tuned_params(tuned_dir: str | Path, setting: str, base: str, seed: int | None = None) -> dict:
    """The tuned parameters of ``base``: the seed's own study when there is one
    (``tuned_dir/setting/seed{seed}/``), else the setting's (``tuned_dir/setting/``), else none."""
    own = Path(tuned_dir) / setting / f"seed{seed}" / f"{base}.json"
    path = own if seed is not None and own.exists() else Path(tuned_dir) / setting / f"{base}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _train_task(task: dict) -> list[dict]:
    """One grid task in a worker process: a base and its components on one split."""
    torch.set_num_threads(task["threads"])
    return train_cell(
        task["split_dir"], task["base"], task["components"], task["params"],
        experiment=task["experiment"], out_root=task["out_root"], skip_finished=True, quiet=True,
        tags={"grid": "1"},
    )


def _summary(row: dict) -> str:
    state = "skipped (already finished)" if row.get("skipped") else f"{row.get('train_seconds', 0):.1f} s"
    return (f"{row['setting']:>8} seed {row['seed']} {row['base']:>6}+{row['component']:<4} "
            f"val F1 {row.get('val_macro_f1', float('nan')):.3f}  test top-1 {row.get('test_top1', float('nan')):.3f} "
            f"F1 {row.get('test_macro_f1', float('nan')):.3f}  [{state}]")


def grid_tasks(cfg: dict) -> list[dict]:
    """One task per (setting, seed, base), the longest first (`_task_cost`)."""
    tasks = []
    for setting in cfg["settings"]:
        # a held-out-batch setting has one fold per batch in place of the seeds
        for seed in (cfg.get("seeds_by_setting") or {}).get(setting, cfg["seeds"]):
            split_dir = Path(cfg["split_root"]) / setting / f"seed{seed}"
            if not (split_dir / "split.json").exists():
                raise InputError(f"no split at {split_dir}; run `dvc repro splits` or `cellcontrast split` first")
            for base in cfg["bases"]:
                tasks.append({
                    "split_dir": str(split_dir), "base": base, "components": cfg["components"],
                    "params": merged_params(cfg["model_params"], tuned_params(cfg["tuned_dir"], setting, base, seed)),
                    "experiment": cfg["experiment"], "threads": cfg["threads"],
                    "out_root": str(Path(cfg["models_dir"]) / setting / f"seed{seed}"),
                })
    tasks.sort(key=lambda t: (-_task_cost(t), t["split_dir"]))
    return tasks


# Seconds a training cell costs each base's task (its components included), measured in
# `make run` on Default (10,000 cells): scDAE ~110 s a task, LR ~70 s, ACTINN ~20 s.
_SECONDS_PER_CELL = {"scdae": 0.011, "lr": 0.007, "svm": 0.007, "actinn": 0.002}


def _task_cost(task: dict) -> float:
    """A task's expected seconds, for longest-first order: the two workers then finish
    together instead of one waiting on a long task started last."""
    info = json.loads((Path(task["split_dir"]) / "split.json").read_text())
    return _SECONDS_PER_CELL.get(task["base"], 0.01) * float(info.get("n_cells", {}).get("train", 1))


def run_grid(cfg: dict) -> pd.DataFrame:
    """Train every setting x seed x base x component; write and return the results table."""
    tasks = grid_tasks(cfg)
    # Create the store and experiment here: two workers creating them at once race.
    tracking.setup(cfg["experiment"])
    rows = []
    with task_executor(cfg["workers"], cfg.get("scheduler")) as pool, tqdm(total=len(tasks) * len(cfg["components"]), desc="grid",
                                                    unit="run", file=sys.stderr) as bar:
        futures = [pool.submit(_train_task, t) for t in tasks]
        for future in as_completed(futures):
            for row in future.result():
                rows.append(row)
                bar.update(1)
                tqdm.write(_summary(row), file=sys.stderr)
    table = pd.DataFrame(rows)
    table = table.reindex(columns=RESULT_COLUMNS + [c for c in table.columns if c not in RESULT_COLUMNS])
    table = table.sort_values(["setting", "seed", "base", "component"]).drop(columns=["skipped"], errors="ignore")
    with atomic_path(cfg["results"]) as tmp:
        table.to_csv(tmp, index=False)
    print(f"wrote {cfg['results']}: {len(table)} runs", file=sys.stderr)
    return table


def run_grid_from_params(params_path: str, scheduler: str | None = None) -> pd.DataFrame:
    cfg = grid_config(load_params(params_path))
    return run_grid({**cfg, "scheduler": scheduler or cfg.get("scheduler")})
