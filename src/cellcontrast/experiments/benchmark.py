"""`cellcontrast benchmark`: splits, tuning, grid and report on any atlas, in one command."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pandas as pd

from cellcontrast.core.errors import InputError
from cellcontrast.core.names import LABEL
from cellcontrast.core.params import load_params, setting_params
from cellcontrast.data.atlas import read_atlas
from cellcontrast.data.heldout import batch_values, make_heldout_split
from cellcontrast.data.splits import (
    make_split,
    make_tuning_split,
    remove_unseen_types,
    split_atlas_to_dir,
)
from cellcontrast.experiments.grid import grid_config, run_grid
from cellcontrast.experiments.report import make_report
from cellcontrast.experiments.search_space import search_space_of
from cellcontrast.experiments.setting_tuning import tune_config, tune_setting
from cellcontrast.train.recipes import check_params


def benchmark(atlas: str | Path, *, out_dir: str | Path, settings: list[str] | tuple[str, ...] = ("default", "scarce"),
              seeds: int = 5, tune_trials: int = 0, params_path: str | Path = "params.yaml",
              label_key: str = LABEL, layer: str | None = None, filters: dict[str, str] | None = None,
              batch_key: str | None = None, unseen_types: int = 0, scheduler: str | None = None) -> pd.DataFrame:
    """Split ``atlas`` for every setting and seed, tune (``tune_trials`` > 0), train the grid and
    write the report, all under ``out_dir``; returns the results table.

    A held-out-batch setting (``heldout``, with ``batch_key``) has one fold per batch in place
    of the seeds, and each fold is tuned on its own training batches only. With
    ``unseen_types`` N, each seed's split loses N types (seeded) from train and validation but
    keeps their test cells, and the results gain how well each chain flags them
    (``test_unseen_auroc_*``, Unassigned rates); each seed is then tuned on its own split, which
    lacks its unseen types. ``scheduler``: a Dask scheduler's address for the grid and tuning
    (default: params.yaml's ``grid.scheduler``, else a local cluster).
    """
    params = load_params(params_path)
    settings = [s.strip() for s in settings if s.strip()]
    if seeds < 1:
        raise InputError("--seeds must be at least 1")
    out = Path(out_dir)
    folds = _check_inputs(atlas, params, settings, list(range(seeds)), label_key, layer, filters, batch_key,
                          unseen_types)
    for setting in settings:
        for seed in folds[setting]:
            split_dir = out / "splits" / setting / f"seed{seed}"
            info = split_atlas_to_dir(atlas, setting, seed, split_dir, settings=params, label_key=label_key,
                                      layer=layer, filters=filters,
                                      batch_key=batch_key if _is_heldout(params, setting) else None,
                                      unseen_types=unseen_types)
            where = f"fold {seed} (holds out {info['holdout']})" if "holdout" in info else f"seed {seed}"
            print(f"split {setting} {where}: K={info['k']}, cells {info['n_cells']}", file=sys.stderr)
        if tune_trials > 0 and not _is_heldout(params, setting) and not unseen_types:
            # tuned on cells that no seed's test part holds (one shared study would otherwise
            # choose on seed 0's validation cells, which sit in the other seeds' test sets)
            info = split_atlas_to_dir(atlas, setting, tune_config(params)["seed"], out / "splits" / setting / "tuning",
                                      settings=params, label_key=label_key, layer=layer, filters=filters,
                                      tuning_for=folds[setting])
            print(f"split {setting} tuning: K={info['k']}, cells {info['n_cells']}", file=sys.stderr)
    cfg = grid_config(params)
    cfg.update(settings=settings, seeds=list(range(seeds)), seeds_by_setting=folds, split_root=str(out / "splits"),
               tuned_dir=str(out / "tuned"), models_dir=str(out / "models"), results=str(out / "results.csv"),
               experiment=f"benchmark-{Path(atlas).stem}", scheduler=scheduler or cfg.get("scheduler"))
    if tune_trials > 0:
        tcfg = tune_config(params)
        tcfg.update(n_trials=tune_trials, base_trials=tune_trials,
                    storage=f"sqlite:///{out.resolve()}/optuna.db", experiment=cfg["experiment"] + "-tuning")
        for setting in settings:
            # a fold's test batch is in every other fold's training batches, and a seed's unseen
            # types are another seed's training types: one study per fold (seed) then
            for seed in folds[setting] if _is_heldout(params, setting) or unseen_types else [None]:
                tune_setting(setting, cfg, tcfg, search_space_of(params.get("tune")), seed=seed)
    table = run_grid(cfg)
    paths = make_report(table, out, experiment=cfg["experiment"])
    print(f"wrote {cfg['results']} and the report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return table


def _is_heldout(params: dict, setting: str) -> bool:
    return "batch_key" in ((params.get("settings") or {}).get(setting) or {})


def _check_inputs(atlas, params: dict, settings: list[str], seeds: list[int], label_key: str,
                  layer: str | None, filters: dict[str, str] | None, batch_key: str | None,
                  unseen_types: int = 0) -> dict[str, list[int]]:
    """Read the atlas and draw every split (without writing it), and check the model
    parameters, so that a bad atlas, setting or parameter stops the benchmark with one line
    before anything is written under out_dir or trained. Returns each setting's seeds (a
    held-out-batch setting: one fold per batch)."""
    chosen = {setting: setting_params(params, setting, batch_key if _is_heldout(params, setting) else None)
              for setting in settings}
    if batch_key and not any(s["heldout"] for s in chosen.values()):
        raise InputError("--batch-key is for a setting that leaves one batch out: add heldout to --settings")
    check_params(params.get("model_params") or {})
    folds = {}
    # Notes and warnings are held back here: they come again when the splits are written.
    with contextlib.redirect_stderr(io.StringIO()):
        adata = read_atlas(atlas, label_key=label_key, layer=layer, filters=filters)
        for setting, s in chosen.items():
            if s["heldout"]:
                batches = batch_values(adata.obs, s["batch_key"])
                names = sorted(set(batches))
                for fold, name in enumerate(names):
                    split = make_heldout_split(adata.obs[LABEL], batches, name, s["min_cells"], s["val_fraction"],
                                               s["cap"])
                    remove_unseen_types(adata.obs[LABEL], split.indices, split.classes, unseen_types, fold)
                folds[setting] = list(range(len(names)))
                continue
            for seed in seeds:
                split = make_split(adata.obs[LABEL], s["k"], s["cap"], seed, s["fractions"], s["equalize"])
                remove_unseen_types(adata.obs[LABEL], split.indices, split.classes, unseen_types, seed)
            make_tuning_split(adata.obs[LABEL], s["k"], s["cap"], seeds, s["fractions"], s["equalize"])
            folds[setting] = list(seeds)
    return folds
