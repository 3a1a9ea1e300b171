"""Tuning of one setting: every base (its own key sizes) and then each component on the tuned,
frozen base, in worker processes, on the validation part of the setting's tuning split."""

from __future__ import annotations

import json
import sys
from concurrent.futures import as_completed
from pathlib import Path

import torch
from tqdm import tqdm

from cellcontrast.core.engine import task_executor
from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path
from cellcontrast.core.fingerprint import TRAINING_CODE, code_digest, fingerprint
from cellcontrast.core.params import load_params
from cellcontrast.experiments import tracking
from cellcontrast.experiments.grid import grid_config, merged_params
from cellcontrast.experiments.search_space import resolve_search_space, search_space_of, searches
from cellcontrast.experiments.tuning import tune
from cellcontrast.train import recipes


def tune_config(params: dict) -> dict:
    cfg = {"n_trials": 4, "base_trials": 3, "seed": 0, "storage": None, "experiment": "cellcontrast-tuning"}
    cfg.update(params.get("tune") or {})
    return cfg


def tuning_study_name(base: str, component: str, split_info: dict, space: dict, model_params: dict,
                      tuned: dict, n_trials: int, seed: int) -> str:
    """``{setting}-{base}-{component}-{digest}``: what the trials measured is in the digest (the
    split with its data's hash, search space, fixed params, already-tuned params, the recipe's
    defaults, trial target, sampler seed and the training code). Changing any of them starts a
    new study instead of resuming one whose trials were scored on another atlas, range, recipe
    or code, whose stale best would otherwise be returned without a new trial."""
    # recipes.DEFAULT_PARAMS read at call time: a changed recipe is a new study
    recipe = {name: recipes.DEFAULT_PARAMS.get(name) for name in (base, component)}
    code = code_digest(*TRAINING_CODE, "experiments/tuning.py")  # other training code: a new study
    digest = fingerprint(space, model_params, tuned, n_trials, recipe, seed, split_info, code)
    return f"{split_info['setting']}-{base}-{component}-{digest[:8]}"


def _tune_base(job: dict) -> dict:
    """Tune one base in a worker: first its own key sizes (component none), then each
    component on top of the tuned, frozen base. Writes tuned_dir/setting/base.json."""
    torch.set_num_threads(job["threads"])
    space, tcfg = job["search_space"], job["tune"]
    split_info = json.loads((Path(job["split_dir"]) / "split.json").read_text())
    best: dict = {}
    for component in job["components"]:
        n_trials = tcfg["base_trials"] if component == "none" else tcfg["n_trials"]
        if n_trials < 1:
            continue
        fixed = resolve_search_space(job["base"], component, space)
        if component == "none" and not searches(fixed):  # all fixed: a study would repeat one fit
            best[job["base"]] = {key: spec[1] for key, spec in fixed.items()}
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


def tune_setting(setting: str, cfg: dict, tcfg: dict, search_space: dict, seed: int | None = None) -> dict:
    """Tune every base (and its components) of one setting on one split's validation part:
    the setting's tuning split (``split_root/setting/tuning``, no cell of any evaluated seed's
    test part), written to ``tuned_dir/setting/`` (the grid's default for every seed), or seed
    ``seed``'s own split, written to ``tuned_dir/setting/seed{seed}/`` (read by that seed only;
    a held-out-batch fold is tuned so)."""
    split_dir = Path(cfg["split_root"]) / setting / ("tuning" if seed is None else f"seed{seed}")
    if not (split_dir / "split.json").exists():
        how = "`cellcontrast split --tuning`" if seed is None else "`cellcontrast split`"
        raise InputError(f"no split at {split_dir}; run `dvc repro` or {how} first")
    out_dir = Path(cfg["tuned_dir"]) / setting / ("" if seed is None else f"seed{seed}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tracking.setup(tcfg["experiment"])
    jobs = [{"setting": setting, "base": base, "components": cfg["components"], "split_dir": str(split_dir),
             "out": str(out_dir / f"{base}.json"), "search_space": search_space, "tune": tcfg,
             "model_params": cfg["model_params"], "threads": cfg["threads"]}
            for base in sorted(cfg["bases"], key=lambda b: {"scdae": 0, "actinn": 1}.get(b, 2))]
    results = {}
    with task_executor(cfg["workers"], cfg.get("scheduler")) as pool, tqdm(total=len(jobs), desc=f"tune {setting}", unit="base",
                                             file=sys.stderr) as bar:
        for future in as_completed([pool.submit(_tune_base, job) for job in jobs]):
            done = future.result()
            results[done["base"]] = done["params"]
            bar.update(1)
            tqdm.write(f"tuned {setting} {done['base']}: {json.dumps(done['params'])}", file=sys.stderr)
    return results


def tune_setting_from_params(params_path: str, setting: str, scheduler: str | None = None) -> dict:
    params = load_params(params_path)
    tcfg, cfg = tune_config(params), grid_config(params)
    return tune_setting(setting, {**cfg, "scheduler": scheduler or cfg.get("scheduler")}, tcfg, search_space_of(tcfg))
