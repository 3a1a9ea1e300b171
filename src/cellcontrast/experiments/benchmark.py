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
from cellcontrast.data.splits import make_split, split_atlas_to_dir
from cellcontrast.experiments.grid import grid_config, run_grid
from cellcontrast.experiments.report import make_report
from cellcontrast.experiments.search_space import search_space_of
from cellcontrast.experiments.setting_tuning import tune_config, tune_setting
from cellcontrast.train.recipes import check_params


def benchmark(atlas: str | Path, *, out_dir: str | Path, settings: list[str] | tuple[str, ...] = ("default", "scarce"),
              seeds: int = 5, tune_trials: int = 0, params_path: str | Path = "params.yaml",
              label_key: str = LABEL, layer: str | None = None,
              filters: dict[str, str] | None = None) -> pd.DataFrame:
    """Split ``atlas`` for every setting and seed, tune (``tune_trials`` > 0), train the grid and
    write the report, all under ``out_dir``; returns the results table."""
    params = load_params(params_path)
    settings = [s.strip() for s in settings if s.strip()]
    if seeds < 1:
        raise InputError("--seeds must be at least 1")
    out = Path(out_dir)
    seed_list = list(range(seeds))
    _check_inputs(atlas, params, settings, seed_list, label_key, layer, filters)
    for setting in settings:
        for seed in seed_list:
            split_dir = out / "splits" / setting / f"seed{seed}"
            info = split_atlas_to_dir(atlas, setting, seed, split_dir, settings=params,
                                      label_key=label_key, layer=layer, filters=filters)
            print(f"split {setting} seed {seed}: K={info['k']}, cells {info['n_cells']}", file=sys.stderr)
    cfg = grid_config(params)
    cfg.update(settings=settings, seeds=seed_list, split_root=str(out / "splits"), tuned_dir=str(out / "tuned"),
               models_dir=str(out / "models"), results=str(out / "results.csv"),
               experiment=f"benchmark-{Path(atlas).stem}")
    if tune_trials > 0:
        tcfg = tune_config(params)
        tcfg.update(n_trials=tune_trials, base_trials=tune_trials,
                    storage=f"sqlite:///{out.resolve()}/optuna.db", experiment=cfg["experiment"] + "-tuning")
        for setting in settings:
            tune_setting(setting, cfg, tcfg, search_space_of(params.get("tune")))
    table = run_grid(cfg)
    paths = make_report(table, out, experiment=cfg["experiment"])
    print(f"wrote {cfg['results']} and the report: {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return table


def _check_inputs(atlas, params: dict, settings: list[str], seeds: list[int], label_key: str,
                  layer: str | None, filters: dict[str, str] | None) -> None:
    """Read the atlas and draw every split (without writing it), and check the model
    parameters, so that a bad atlas, setting or parameter stops the benchmark with one line
    before anything is written under out_dir or trained."""
    chosen = {setting: setting_params(params, setting) for setting in settings}
    check_params(params.get("model_params") or {})
    # Notes and warnings are held back here: they come again when the splits are written.
    with contextlib.redirect_stderr(io.StringIO()):
        labels = read_atlas(atlas, label_key=label_key, layer=layer, filters=filters).obs[LABEL]
        for s in chosen.values():
            for seed in seeds:
                make_split(labels, s["k"], s["cap"], seed, s["fractions"], s["equalize"])
