"""The `cellcontrast` command line.

Every subcommand imports its module lazily, so that `cellcontrast annotate` runs on the light
install (onnxruntime, anndata, numpy) without torch, and `--help` is instant.
A bad input raises `InputError`; it is printed as one line and the exit code is 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from cellcontrast.core.version import __version__
from cellcontrast.core.errors import InputError


def _add_atlas_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-key", default="cell_type", help="obs column with the cell type (default: cell_type)")
    p.add_argument("--layer", default=None, help="read raw counts from this layer, or 'raw' for .raw (default: X)")
    p.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="COLUMN=VALUE",
        help="keep cells whose obs COLUMN equals VALUE; repeat to combine (AND)",
    )


def _parse_filters(items: list[str]) -> dict[str, str]:
    filters = {}
    for item in items:
        if "=" not in item:
            raise InputError(f"--filter {item!r} must look like COLUMN=VALUE, for example individual=L3")
        key, value = item.split("=", 1)
        filters[key.strip()] = value.strip()
    return filters


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellcontrast",
        description="Cell-type annotation of scRNA-seq with supervised contrastive learning.",
    )
    parser.add_argument("--version", action="version", version=f"cellcontrast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="write the simulated atlas (the embedded default)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--cells", type=int, default=90_000)
    p.add_argument("--types", type=int, default=97)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--individuals", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("split", help="downsample an atlas to a setting and split it 80/10/10")
    p.add_argument("--atlas", required=True, help="input .h5ad with raw counts")
    p.add_argument("--setting", required=True, help="a setting of params.yaml: default, scarce or natural")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", default="params.yaml", help="params file with the settings (default: params.yaml)")
    _add_atlas_options(p)

    p = sub.add_parser("holdout", help="write the atlas cells a split left out, as a labelled query")
    p.add_argument("--atlas", required=True)
    p.add_argument("--split-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-cells", type=int, default=None)

    p = sub.add_parser("train", help="train one base model, optionally with a contrastive component (one MLflow run)")
    p.add_argument("--split-dir", required=True, help="folder with train/val/test.h5ad and split.json")
    p.add_argument("--base", required=True, choices=["lr", "actinn", "scdae"])
    p.add_argument("--component", default="none", choices=["none", "mlp", "mls"])
    p.add_argument("--params", default=None, help="JSON file of hyperparameters overriding the defaults")
    p.add_argument("--out-dir", default=None, help="where to save the trained chain (default: models/<run>)")
    p.add_argument("--seed", type=int, default=None, help="model seed (default: the split's seed)")
    p.add_argument("--experiment", default="cellcontrast", help="MLflow experiment name")

    p = sub.add_parser("tune", help="tune a chain's hyperparameters with Optuna on the validation split")
    p.add_argument("--split-dir", required=True)
    p.add_argument("--base", required=True, choices=["lr", "actinn", "scdae"])
    p.add_argument("--component", default="none", choices=["none", "mlp", "mls"])
    p.add_argument("--n-trials", type=int, default=10)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///optuna.db)")
    p.add_argument("--study-name", default=None)
    p.add_argument("--out", default=None, help="best parameters as JSON")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--experiment", default="cellcontrast-tuning")

    p = sub.add_parser("tune-setting", help="tune every base and component of one setting (seed 0's validation split)")
    p.add_argument("--setting", required=True)
    p.add_argument("--params", default="params.yaml")

    p = sub.add_parser("grid", help="train every setting x seed x base x component with the tuned parameters")
    p.add_argument("--params", default="params.yaml")

    p = sub.add_parser("report", help="write Table 1 and Figure 2 from the grid's results")
    p.add_argument("--params", default="params.yaml")

    p = sub.add_parser("benchmark", help="splits, tuning, grid and report on any atlas, in one command")
    p.add_argument("--atlas", required=True)
    p.add_argument("--settings", default="default,scarce")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--tune-trials", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", default="params.yaml")
    _add_atlas_options(p)

    p = sub.add_parser("export", help="export a trained chain to one ONNX file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", default=None, help="MLflow run id of a `cellcontrast train` run")
    src.add_argument("--model-dir", default=None, help="folder of a saved chain")
    src.add_argument("--best", action="store_true", help="the chain with the best validation macro F1 in MLflow")
    p.add_argument("--out", required=True, help="output .onnx")
    p.add_argument("--experiment", default="cellcontrast")
    p.add_argument("--setting", default=None, help="with --best: only runs of this setting")
    p.add_argument("--seed", default=None, help="with --best: only runs of this split seed")
    p.add_argument("--no-register", action="store_true", help="do not log/register the model in MLflow")

    p = sub.add_parser("annotate", help="annotate cells with an exported ONNX model (no torch needed)")
    p.add_argument("model", help="annotator .onnx from `cellcontrast export`")
    p.add_argument("query", help="query .h5ad with raw counts")
    p.add_argument("--out", required=True, help="annotated .h5ad to write")
    p.add_argument("--csv", default=None, help="also write predictions as CSV")
    p.add_argument("--layer", default=None, help="read counts from this layer, or 'raw' for .raw")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--min-confidence", type=float, default=0.0, help="below this, call the cell 'Unassigned'")
    p.add_argument("--min-overlap", type=float, default=0.5, help="least fraction of model genes found in the query")
    p.add_argument("--case-insensitive", action="store_true", help="match gene names ignoring case")
    p.add_argument("--probabilities", action="store_true", help="store per-class probabilities in obsm")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--label-key", default=None, help="obs column with true labels, to print accuracy")
    return parser


def _dispatch(args: argparse.Namespace) -> None:
    cmd = args.command
    if cmd == "simulate":
        from cellcontrast.data.simulate import simulate_atlas_to_file

        simulate_atlas_to_file(
            args.out, n_cells=args.cells, n_types=args.types, n_genes=args.genes,
            n_individuals=args.individuals, seed=args.seed,
        )
    elif cmd == "split":
        from cellcontrast.data.splits import split_atlas_to_dir

        info = split_atlas_to_dir(
            args.atlas, setting=args.setting, seed=args.seed, out_dir=args.out_dir,
            params_path=args.params, label_key=args.label_key, layer=args.layer,
            filters=_parse_filters(args.filter),
        )
        print(json.dumps({k: info[k] for k in ("setting", "k", "n_per_type", "seed", "n_cells")}))
    elif cmd == "holdout":
        from cellcontrast.data.splits import write_holdout_query

        write_holdout_query(args.atlas, args.split_dir, args.out, args.max_cells)
    elif cmd == "tune-setting":
        from cellcontrast.experiments.grid import tune_setting_from_params

        tune_setting_from_params(args.params, args.setting)
    elif cmd == "train":
        from cellcontrast.experiments.cell import train_from_cli

        train_from_cli(args)
    elif cmd == "tune":
        from cellcontrast.experiments.tuning import tune_from_cli

        tune_from_cli(args)
    elif cmd == "grid":
        from cellcontrast.experiments.cell import grid_from_cli

        grid_from_cli(args)
    elif cmd == "report":
        from cellcontrast.experiments.report import report_from_cli

        report_from_cli(args)
    elif cmd == "benchmark":
        from cellcontrast.experiments.cell import benchmark_from_cli

        args.filters = _parse_filters(args.filter)
        benchmark_from_cli(args)
    elif cmd == "export":
        from cellcontrast.export.onnx import export_from_cli

        export_from_cli(args)
    elif cmd == "annotate":
        from cellcontrast.annotate.stream import annotate_from_cli

        annotate_from_cli(args)
    else:  # pragma: no cover - argparse refuses unknown commands
        raise InputError(f"unknown command {cmd!r}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library warnings (anndata, mlflow) are noise for a command-line user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Their UserWarnings too: a refused input must read as one line (anndata warns about the
    # duplicate gene names we then refuse; torch about the pickle we then refuse).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(anndata|torch|h5py|mlflow|optuna|scanpy)\b")
    try:
        _dispatch(args)
    except InputError as err:
        print(f"cellcontrast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellcontrast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
