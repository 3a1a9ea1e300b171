"""One short function per command: read the parsed options, call the library with keyword
arguments. Each imports its library module when it runs, so that `cellcontrast annotate` works
on the light install (no torch) and `--help` is instant."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cellcontrast.core.errors import InputError


def parse_filters(items: list[str]) -> dict[str, str]:
    filters = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--filter {item!r} must look like COLUMN=VALUE, for example individual=L3")
        key, value = item.split("=", 1)
        filters[key.strip()] = value.strip()
    return filters


def simulate(args: argparse.Namespace) -> None:
    from cellcontrast.data.simulate import simulate_atlas_to_file

    simulate_atlas_to_file(args.out, n_cells=args.cells, n_types=args.types, n_genes=args.genes,
                           n_individuals=args.individuals, seed=args.seed)


def split(args: argparse.Namespace) -> None:
    from cellcontrast.core.params import load_params
    from cellcontrast.data.splits import split_atlas_to_dir

    params = load_params(args.params)
    tuning_for = list(params.get("seeds", [0, 1, 2, 3, 4])) if args.tuning else None
    info = split_atlas_to_dir(args.atlas, setting=args.setting, seed=args.seed, out_dir=args.out_dir,
                              settings=params, label_key=args.label_key, layer=args.layer,
                              filters=parse_filters(args.filter), batch_key=args.batch_key, holdout=args.holdout,
                              tuning_for=tuning_for, unseen_types=args.unseen_types)
    shown = ("setting", "k", "n_per_type", "seed", "holdout", "excludes_test_of_seeds", "unseen_types", "n_cells")
    print(json.dumps({k: info[k] for k in shown if k in info}))


def holdout(args: argparse.Namespace) -> None:
    from cellcontrast.data.splits import write_holdout_query

    write_holdout_query(args.atlas, args.split_dir, args.out, max_cells=args.max_cells)


def train(args: argparse.Namespace) -> None:
    import torch

    from cellcontrast.experiments.cell import train_cell
    from cellcontrast.train.recipes import read_params_file

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_cell(args.split_dir, args.base, [args.component], read_params_file(args.params),
               seed=args.seed, experiment=args.experiment, out_root=args.out_dir)


def tune(args: argparse.Namespace) -> None:
    """The search space from params.yaml's `tune:` section (if the file is there), fixed recipe
    overrides from its `model_params:`; prints one JSON line."""
    from cellcontrast.core.params import load_params
    from cellcontrast.experiments.search_space import search_space_of
    from cellcontrast.experiments.tuning import run_study

    params: dict = {}
    if args.params:
        if Path(args.params).exists():
            params = load_params(args.params)
        elif args.params != "params.yaml":  # the default may be absent: then the built-in space
            raise InputError(f"no params file {args.params}")
    tcfg = params.get("tune") or {}
    if not isinstance(tcfg, dict):
        raise InputError(f"{args.params}: `tune` must be a mapping")
    model_params = params.get("model_params") or {}
    try:
        seed = int(tcfg.get("seed", 0))
    except (TypeError, ValueError):
        raise InputError(f"{args.params}: tune.seed must be a whole number") from None
    result = run_study(
        args.split_dir, args.base, args.component, args.n_trials, storage=args.storage or tcfg.get("storage"),
        study_name=args.study_name, out=args.out, search_space=search_space_of(tcfg),
        base_params=model_params.get(args.base), experiment=args.experiment, seed=seed,
        threads=int((params.get("grid") or {}).get("threads") or 0), progress=True,
        component_params=model_params.get(args.component) if args.component != "none" else None)
    print(json.dumps({"study": result.study_name, "best_value": round(result.best_value, 6),
                      "best_trial": result.best_trial, "n_finished_trials": result.n_finished,
                      "out": str(result.out), "params": result.params}), flush=True)


def tune_setting(args: argparse.Namespace) -> None:
    from cellcontrast.experiments.setting_tuning import tune_setting_from_params

    tune_setting_from_params(args.params, args.setting, scheduler=args.scheduler)


def grid(args: argparse.Namespace) -> None:
    from cellcontrast.experiments.grid import run_grid_from_params

    run_grid_from_params(args.params, scheduler=args.scheduler)


def report(args: argparse.Namespace) -> None:
    """Options from params.yaml's `report:` section."""
    import sys

    from cellcontrast.core.params import load_params
    from cellcontrast.experiments.report import (
        make_report,
        read_results,
        summarize,
        table1_markdown,
    )

    cfg = load_params(args.params).get("report") or {}
    results = read_results(cfg.get("results", "reports/results.csv"))
    paths = make_report(results, cfg.get("out_dir", "reports"), log_to_mlflow=bool(cfg.get("log_to_mlflow", True)),
                        experiment=cfg.get("experiment", "cellcontrast"))
    print(table1_markdown(summarize(results)), end="")
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)


def benchmark(args: argparse.Namespace) -> None:
    from cellcontrast.experiments.benchmark import benchmark as run_benchmark

    run_benchmark(args.atlas, out_dir=args.out_dir, settings=args.settings.split(","), seeds=args.seeds,
                  tune_trials=args.tune_trials, params_path=args.params, label_key=args.label_key,
                  layer=args.layer, filters=parse_filters(args.filter), batch_key=args.batch_key,
                  unseen_types=args.unseen_types, scheduler=args.scheduler)


def export(args: argparse.Namespace) -> None:
    from cellcontrast.experiments.registry import export_annotator

    print(export_annotator(args.out, model_dir=args.model_dir, run_id=args.run_id, best=bool(args.best),
                           experiment=args.experiment, setting=args.setting, seed=args.seed,
                           register=not args.no_register))


def fit(args: argparse.Namespace) -> None:
    import time

    from cellcontrast.data.atlas import open_h5ad
    from cellcontrast.experiments.fit_annotator import fit_annotator
    from cellcontrast.train.recipes import read_params_file

    started = time.perf_counter()
    params = read_params_file(args.params)
    genes = None
    if args.query:  # only its gene names: the file stays on disk
        query = open_h5ad(args.query, backed=True)
        genes = query.var_names.copy()
        query.file.close()
    # The path: only obs is read first; a reference above --max-cells-in-memory is read in chunks.
    result = fit_annotator(args.reference, args.label_key, chains=args.chains, layer=args.layer,
                           filters=parse_filters(args.filter), seed=args.seed, params=params,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                           batch_key=args.batch_key, val_folds=args.val_folds, checkpoints_on=args.checkpoints_on,
                           genes=genes, genes_source=f"--query {args.query}", ensemble=not args.no_ensemble,
                           out=args.out, experiment=args.experiment, register=not args.no_register,
                           workers=args.workers, scheduler=args.scheduler,
                           max_cells_in_memory=args.max_cells_in_memory, sample_cells=args.sample_cells,
                           refit_epochs=args.refit_epochs, resume=args.resume)
    val = result.chain.metrics.get("val_macro_f1", float("nan"))
    if result.fold_scores is not None:
        val_text = f"mean over held-out {result.chain.config['fit']['batch_key']} macro F1 {val:.4f}"
    else:
        val_text = f"validation macro F1 {val:.4f}"
    test = f", test macro F1 {result.test_metrics['test_macro_f1']:.4f}" if result.test_metrics else ""
    print(f"chose {result.chosen} ({val_text}{test}) in {time.perf_counter() - started:.0f} s; "
          f"wrote {', '.join(str(p) for p in result.files.values())}")


def annotate(args: argparse.Namespace) -> None:
    from cellcontrast.annotation.api import annotate_file
    from cellcontrast.annotation.stream import fix_mmap_threshold

    fix_mmap_threshold()
    if args.workers < 1:
        raise InputError(f"--workers must be at least 1, not {args.workers}")
    options = dict(layer=args.layer, batch_size=args.batch_size, min_confidence=args.min_confidence,
                   min_overlap=args.min_overlap, case_insensitive=args.case_insensitive,
                   probabilities=args.probabilities, flag_unseen=args.flag_unseen, gene_key=args.gene_key,
                   majority_voting=args.majority_voting, min_agreement=args.min_agreement, label_key=args.label_key,
                   coverage=args.coverage, conformal_score=args.conformal_score)
    if args.out_dir is not None:
        _annotate_many(args, options)
        return
    if len(args.query) > 1 or any(ch in args.query[0] for ch in "*?["):
        raise InputError("several queries (or a glob) need --out-dir, not --out")
    inspect = None
    if args.plots:
        from cellcontrast.experiments.annotation_plots import write_plots

        def inspect(obs, probabilities):  # drawn before the outputs are written: a failure writes nothing
            for path in write_plots(args.plots, obs, probabilities, label_key=args.label_key):
                print(f"wrote {path}")
    annotate_file(args.model, args.query[0], args.out, csv=args.csv, threads=args.threads, inspect=inspect,
                  workers=args.workers, scheduler=args.scheduler, **options)


def _annotate_many(args: argparse.Namespace, options: dict) -> None:
    from cellcontrast.annotation.batch import annotate_files

    if args.csv or args.plots:
        raise InputError("--csv and --plots take one query with --out; with --out-dir each query gets its "
                         ".h5ad and the summary lists them")
    annotate_files(args.model, args.query, args.out_dir, workers=args.workers, scheduler=args.scheduler,
                   threads=args.threads, **options)


COMMANDS = {"simulate": simulate, "split": split, "holdout": holdout, "train": train, "tune": tune,
            "tune-setting": tune_setting, "grid": grid, "report": report, "benchmark": benchmark,
            "export": export, "annotate": annotate, "fit": fit}
