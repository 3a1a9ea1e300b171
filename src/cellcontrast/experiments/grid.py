"""The paper's whole experiment: tuning per setting x base x component, the grid over seeds,
and `benchmark`, which runs splits, tuning, grid and report on any atlas in one command.

Work is spread over `workers` processes (each with `threads` torch threads): grid tasks are
(setting, seed, base), each training the base once and then its contrastive components.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path
from cellcontrast.core.params import load_params

DEFAULTS = {
    "bases": ["lr", "actinn", "scdae"],
    "components": ["none", "mlp", "mls"],
    "workers": 2,
    "threads": 1,
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


def tuned_params(tuned_dir: str | Path, setting: str, base: str) -> dict:
    path = Path(tuned_dir) / setting / f"{base}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _train_task(task: dict) -> list[dict]:
    """One grid task in a worker process: a base and its components on one split."""
    import torch

    from cellcontrast.experiments.cell import train_cell

    torch.set_num_threads(task["threads"])
    return train_cell(
        task["split_dir"], task["base"], task["components"], task["params"],
        experiment=task["experiment"], out_root=task["out_root"], skip_finished=True, quiet=True,
        tags={"grid": "1"},
    )


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a worker whose parent is gone (killed, even by SIGKILL) exits within
    half a second, instead of training on unseen (finishing runs while a restarted grid redoes
    them) and then waiting for ever on the dead parent's queue."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="cellcontrast-parent-watch", daemon=True).start()


def _pool(workers: int) -> ProcessPoolExecutor:
    # spawn: torch and sqlite handles must not be shared with a forked parent.
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))


def _summary(row: dict) -> str:
    state = "skipped (already finished)" if row.get("skipped") else f"{row.get('train_seconds', 0):.1f} s"
    return (f"{row['setting']:>8} seed {row['seed']} {row['base']:>6}+{row['component']:<4} "
            f"val F1 {row.get('val_macro_f1', float('nan')):.3f}  test top-1 {row.get('test_top1', float('nan')):.3f} "
            f"F1 {row.get('test_macro_f1', float('nan')):.3f}  [{state}]")


def run_grid(cfg: dict) -> pd.DataFrame:
    """Train every setting x seed x base x component; write and return the results table."""
    from tqdm import tqdm

    tasks = []
    for setting in cfg["settings"]:
        for seed in cfg["seeds"]:
            split_dir = Path(cfg["split_root"]) / setting / f"seed{seed}"
            if not (split_dir / "split.json").exists():
                raise InputError(f"no split at {split_dir}; run `dvc repro splits` or `cellcontrast split` first")
            for base in cfg["bases"]:
                tasks.append({
                    "split_dir": str(split_dir), "base": base, "components": cfg["components"],
                    "params": merged_params(cfg["model_params"], tuned_params(cfg["tuned_dir"], setting, base)),
                    "experiment": cfg["experiment"], "threads": cfg["threads"],
                    "out_root": str(Path(cfg["models_dir"]) / setting / f"seed{seed}"),
                })
    # Slow bases first, so the two workers finish together.
    cost = {"scdae": 0, "actinn": 1, "lr": 2}
    tasks.sort(key=lambda t: (cost.get(t["base"], 3), t["split_dir"]))
    from cellcontrast.experiments import tracking

    # Create the store and experiment here: two workers creating them at once race.
    tracking.setup(cfg["experiment"])
    rows = []
    with _pool(cfg["workers"]) as pool, tqdm(total=len(tasks) * len(cfg["components"]), desc="grid",
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


def run_grid_from_params(params_path: str) -> pd.DataFrame:
    return run_grid(grid_config(load_params(params_path)))


def tune_config(params: dict) -> dict:
    cfg = {"n_trials": 4, "base_trials": 3, "seed": 0, "storage": None, "experiment": "cellcontrast-tuning"}
    cfg.update(params.get("tune") or {})
    return cfg


def tuning_study_name(base: str, component: str, split_info: dict, space: dict, model_params: dict,
                      tuned: dict, n_trials: int, seed: int) -> str:
    """``{setting}-{base}-{component}-{digest}``: what the trials measured is in the digest (the
    split with its data's hash, search space, fixed params, already-tuned params, the recipe's
    defaults, trial target and sampler seed). Changing any of them starts a new study instead
    of resuming one whose trials were scored on another atlas, range or recipe, whose stale
    best would otherwise be returned without a new trial."""
    from cellcontrast.experiments.tracking import fingerprint
    from cellcontrast.train.training import DEFAULT_PARAMS

    recipe = {name: DEFAULT_PARAMS.get(name) for name in (base, component)}
    digest = fingerprint(space, model_params, tuned, n_trials, recipe, seed, split_info)
    return f"{split_info['setting']}-{base}-{component}-{digest[:8]}"


def _tune_base(job: dict) -> dict:
    """Tune one base in a worker: first its own key sizes (component none), then each
    component on top of the tuned, frozen base. Writes tuned_dir/setting/base.json."""
    import torch

    from cellcontrast.experiments.tuning import tune

    torch.set_num_threads(job["threads"])
    space, tcfg = job["search_space"], job["tune"]
    split_info = json.loads((Path(job["split_dir"]) / "split.json").read_text())
    best: dict = {}
    for component in job["components"]:
        n_trials = tcfg["base_trials"] if component == "none" else tcfg["n_trials"]
        if n_trials < 1:
            continue
        study = tuning_study_name(job["base"], component, split_info, space, job["model_params"], best,
                                  n_trials, tcfg["seed"])
        result = tune(
            job["split_dir"], job["base"], component, n_trials, storage=tcfg["storage"],
            study_name=study, out=str(Path(job["out"]).with_suffix(f".{component}.json")),
            search_space=space, base_params=merged_params(job["model_params"], best).get(job["base"]),
            experiment=tcfg["experiment"], seed=tcfg["seed"], threads=job["threads"], progress=False,
            component_params=None if component == "none" else job["model_params"].get(component),
        )
        if component == "none":
            best[job["base"]] = result.get(job["base"], {})
        else:
            best[component] = result.get(component, {})
    with atomic_path(job["out"]) as tmp:
        tmp.write_text(json.dumps(best, indent=2) + "\n")
    return {"base": job["base"], "params": best}


def tune_setting(setting: str, cfg: dict, tcfg: dict, search_space: dict) -> dict:
    """Tune every base (and its components) of one setting on seed 0's validation split."""
    from tqdm import tqdm

    from cellcontrast.experiments import tracking

    split_dir = Path(cfg["split_root"]) / setting / f"seed{cfg['seeds'][0]}"
    if not (split_dir / "split.json").exists():
        raise InputError(f"no split at {split_dir}; run `dvc repro splits` or `cellcontrast split` first")
    out_dir = Path(cfg["tuned_dir"]) / setting
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup(tcfg["experiment"])
    jobs = [{"setting": setting, "base": base, "components": cfg["components"], "split_dir": str(split_dir),
             "out": str(out_dir / f"{base}.json"), "search_space": search_space, "tune": tcfg,
             "model_params": cfg["model_params"], "threads": cfg["threads"]}
            for base in sorted(cfg["bases"], key=lambda b: {"scdae": 0, "actinn": 1}.get(b, 2))]
    results = {}
    with _pool(cfg["workers"]) as pool, tqdm(total=len(jobs), desc=f"tune {setting}", unit="base",
                                             file=sys.stderr) as bar:
        for future in as_completed([pool.submit(_tune_base, job) for job in jobs]):
            done = future.result()
            results[done["base"]] = done["params"]
            bar.update(1)
            tqdm.write(f"tuned {setting} {done['base']}: {json.dumps(done['params'])}", file=sys.stderr)
    return results


def tune_setting_from_params(params_path: str, setting: str) -> dict:
    params = load_params(params_path)
    tcfg = tune_config(params)
    space = {k: v for k, v in tcfg.items() if k not in ("n_trials", "base_trials", "seed", "storage", "experiment")}
    return tune_setting(setting, grid_config(params), tcfg, space)


def _check_benchmark_inputs(args, params: dict, settings: list[str], seeds: list[int]) -> None:
    """Read the atlas and draw every split (without writing it), and check the model
    parameters, so that a bad atlas, setting or parameter stops the benchmark with one line
    before anything is written under --out-dir or trained."""
    import contextlib
    import io

    from cellcontrast.experiments.cell import _check_params
    from cellcontrast.data.atlas import LABEL, read_atlas
    from cellcontrast.core.params import setting_params
    from cellcontrast.data.splits import make_split

    chosen = {setting: setting_params(params, setting) for setting in settings}
    _check_params(params.get("model_params") or {})
    # Notes and warnings are held back here: they come again when the splits are written.
    with contextlib.redirect_stderr(io.StringIO()):
        labels = read_atlas(args.atlas, label_key=args.label_key, layer=args.layer, filters=args.filters).obs[LABEL]
        for s in chosen.values():
            for seed in seeds:
                make_split(labels, s["k"], s["cap"], seed, s["fractions"], s["equalize"])


def benchmark(args) -> pd.DataFrame:
    """`cellcontrast benchmark`: splits, tuning, grid and report on any atlas, into out_dir."""
    from cellcontrast.experiments.report import make_report
    from cellcontrast.data.splits import split_atlas_to_dir

    params = load_params(args.params)
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if args.seeds < 1:
        raise InputError("--seeds must be at least 1")
    out = Path(args.out_dir)
    seeds = list(range(args.seeds))
    _check_benchmark_inputs(args, params, settings, seeds)
    for setting in settings:
        for seed in seeds:
            split_dir = out / "splits" / setting / f"seed{seed}"
            info = split_atlas_to_dir(args.atlas, setting, seed, split_dir, settings=params,
                                      label_key=args.label_key, layer=args.layer, filters=args.filters)
            print(f"split {setting} seed {seed}: K={info['k']}, cells {info['n_cells']}", file=sys.stderr)
    cfg = grid_config(params)
    cfg.update(settings=settings, seeds=seeds, split_root=str(out / "splits"), tuned_dir=str(out / "tuned"),
               models_dir=str(out / "models"), results=str(out / "results.csv"),
               experiment=f"benchmark-{Path(args.atlas).stem}")
    if args.tune_trials > 0:
        tcfg = tune_config(params)
        tcfg.update(n_trials=args.tune_trials, base_trials=args.tune_trials,
                    storage=f"sqlite:///{out.resolve()}/optuna.db", experiment=cfg["experiment"] + "-tuning")
        space = {k: v for k, v in (params.get("tune") or {}).items()
                 if k not in ("n_trials", "base_trials", "seed", "storage", "experiment")}
        for setting in settings:
            tune_setting(setting, cfg, tcfg, space)
    table = run_grid(cfg)
    paths = make_report(table, out, experiment=cfg["experiment"])
    print(f"wrote {cfg['results']} and the report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return table
