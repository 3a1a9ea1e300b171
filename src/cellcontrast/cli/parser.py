"""The `cellcontrast` argument parser: one small function per command, and refusals of bad
options as one line (exit 2), like every other refusal."""

from __future__ import annotations

import argparse
import sys

from cellcontrast.core.names import BASES, COMPONENTS
from cellcontrast.core.version import __version__


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _atlas_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--label-key", default="cell_type", help="obs column with the cell type (default: cell_type)")
    p.add_argument("--layer", default=None, help="read raw counts from this layer, or 'raw' for .raw (default: X)")
    p.add_argument("--filter", action="append", default=[], metavar="COLUMN=VALUE",
                   help="keep cells whose obs COLUMN equals VALUE; repeat to combine (AND)")


def _simulate(sub) -> None:
    p = sub.add_parser("simulate", help="write the simulated atlas (the embedded default)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--cells", type=int, default=90_000)
    p.add_argument("--types", type=int, default=97)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--individuals", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)


def _or_auto(cast, kind: str):
    """An argparse type: ``auto``, or ``cast(text)`` (refused in one line naming ``kind``)."""
    def parse(text: str):
        if text == "auto":
            return text
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is neither {kind} nor auto") from None
    return parse


_confidence = _or_auto(float, "a number")
_val_folds = _or_auto(int, "a whole number")


def _split(sub) -> None:
    p = sub.add_parser("split", help="downsample an atlas to a setting and split it 80/10/10")
    p.add_argument("--atlas", required=True, help="input .h5ad with raw counts")
    p.add_argument("--setting", required=True, help="a setting of params.yaml: default, scarce, natural or heldout")
    p.add_argument("--seed", type=int, default=0, help="seed of the draw; for heldout without --holdout, the fold")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--batch-key", default=None, help="heldout: the obs column of batches (donor, individual, ...)")
    p.add_argument("--holdout", default=None, help="heldout: the batch to hold out as the test part")
    p.add_argument("--unseen-types", type=int, default=0, metavar="N",
                   help="remove N types (drawn with the seed) from train and validation, keeping their test cells")
    p.add_argument("--tuning", action="store_true",
                   help="the tuning split: drawn only from cells in no test part of params.yaml's seeds")
    p.add_argument("--params", default="params.yaml", help="params file with the settings (default: params.yaml)")
    _atlas_options(p)


def _holdout(sub) -> None:
    p = sub.add_parser("holdout", help="write the atlas cells a split left out, as a labelled query")
    p.add_argument("--atlas", required=True)
    p.add_argument("--split-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-cells", type=int, default=None)


def _train(sub) -> None:
    p = sub.add_parser("train", help="train one base model, optionally with a contrastive component (one MLflow run)")
    p.add_argument("--split-dir", required=True, help="folder with train/val/test.h5ad and split.json")
    p.add_argument("--base", required=True, choices=list(BASES))
    p.add_argument("--component", default="none", choices=list(COMPONENTS))
    p.add_argument("--params", default=None, help="JSON file of hyperparameters overriding the defaults")
    p.add_argument("--out-dir", default=None, help="where to save the trained chain (default: models/<run>)")
    p.add_argument("--seed", type=int, default=None, help="model seed (default: the split's seed)")
    p.add_argument("--experiment", default="cellcontrast", help="MLflow experiment name")


def _fit(sub) -> None:
    p = sub.add_parser("fit", help="train an annotator on a labelled reference: chains, choice on validation, "
                                   "ONNX file and model card")
    p.add_argument("--reference", required=True, help="labelled reference .h5ad with raw counts")
    p.add_argument("--out", required=True, help="annotator .onnx to write (the model card goes beside it)")
    p.add_argument("--chains", default=None,
                   help="chains to train and choose among: lr, svm, lr+mlp, scdae+mls, ... or all (default: lr,svm,scdae; "
                        "lr,svm for a reference above --max-cells-in-memory, whose deep chains would see only the "
                        "sample)")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="hold out this share of each type as a test part, reported only (default 0: none)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="each type's share for validation (default 0.1)")
    p.add_argument("--batch-key", default=None,
                   help="obs column of batches (donor, study): every choice is scored on batches the candidate did "
                        "not train on (leave-one-batch-out), then the chosen chain is refitted on every cell")
    p.add_argument("--val-folds", type=_val_folds, default="auto",
                   help="without --batch-key: choose on this many stratified cross-validation folds instead of one "
                        "validation part (every cell validated once), then refit on every cell; 0: one part; "
                        "auto (default): 5 folds up to 10,000 reference cells, one part above")
    p.add_argument("--checkpoints-on", choices=["held_out", "training_batches"], default="held_out",
                   help="with folds (--batch-key, --val-folds), where each fold picks its epochs and inner "
                        "choices: held_out (default), the batch it is then scored on, or training_batches, a part "
                        "of its own training batches (an honest fold score for chains with many checkpoints, "
                        "such as the contrastive components)")
    p.add_argument("--no-ensemble", action="store_true",
                   help="do not offer the ensemble of the two best chains (weighted on validation) as a candidate")
    p.add_argument("--query", default=None,
                   help="a query .h5ad to be annotated: the reference is restricted to the genes it measures "
                        "(its var_names); genes the reference never detects are always left out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--params", default=None, help="JSON file of hyperparameters keyed by model name")
    p.add_argument("--experiment", default="cellcontrast-fit", help="MLflow experiment of the parent run")
    p.add_argument("--no-register", action="store_true", help="do not register the annotator in MLflow")
    p.add_argument("--workers", type=int, default=1,
                   help="train the validation folds (--batch-key, --val-folds), or with one validation part the "
                        "bases, at once on a local Dask cluster of this many processes")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="train the validation folds (or the bases) on a running Dask scheduler (tcp://HOST:8786)")
    p.add_argument("--max-cells-in-memory", type=int, default=50_000, metavar="CELLS",
                   help="a reference with more labelled cells is never read whole: every choice on a stratified "
                        "sample (--sample-cells), the chosen linear chain refitted on every cell in chunks "
                        "(default 50000)")
    p.add_argument("--sample-cells", type=int, default=50_000, metavar="CELLS",
                   help="above --max-cells-in-memory, the sample the choices are made on (default 50000)")
    p.add_argument("--refit-epochs", type=int, default=4, metavar="N",
                   help="above --max-cells-in-memory, epochs of the refit on every cell (default 4; 0: the "
                        "sample fit's weights)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed fit of a large reference from its checkpoint beside --out")
    _atlas_options(p)


def _tune(sub) -> None:
    p = sub.add_parser("tune", help="tune a chain's hyperparameters with Optuna on the validation split")
    p.add_argument("--split-dir", required=True)
    p.add_argument("--base", required=True, choices=list(BASES))
    p.add_argument("--component", default="none", choices=list(COMPONENTS))
    p.add_argument("--n-trials", type=int, default=10)
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: sqlite:///optuna.db)")
    p.add_argument("--study-name", default=None)
    p.add_argument("--out", default=None, help="best parameters as JSON")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--experiment", default="cellcontrast-tuning")


def _pipeline_steps(sub) -> None:
    p = sub.add_parser("tune-setting", help="tune every base and component of one setting (on its tuning split)")
    p.add_argument("--setting", required=True)
    p.add_argument("--params", default="params.yaml")
    _scheduler_option(p)
    p = sub.add_parser("grid", help="train every setting x seed x base x component with the tuned parameters")
    p.add_argument("--params", default="params.yaml")
    _scheduler_option(p)
    p = sub.add_parser("report", help="write Table 1 and Figure 2 from the grid's results")
    p.add_argument("--params", default="params.yaml")


def _scheduler_option(p) -> None:
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="a running Dask scheduler (tcp://HOST:8786) to send the trainings to (default: params.yaml's "
                        "grid.scheduler, else a local cluster of grid.workers processes)")


def _benchmark(sub) -> None:
    p = sub.add_parser("benchmark", help="splits, tuning, grid and report on any atlas, in one command")
    p.add_argument("--atlas", required=True)
    p.add_argument("--settings", default="default,scarce")
    p.add_argument("--seeds", type=int, default=5, help="seeds of random splits (heldout: one fold per batch)")
    p.add_argument("--batch-key", default=None, help="heldout: the obs column of batches (donor, individual, ...)")
    p.add_argument("--tune-trials", type=int, default=0)
    p.add_argument("--unseen-types", type=int, default=0, metavar="N",
                   help="per seed, N types left out of training and kept in the test: how well each chain flags them")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--params", default="params.yaml")
    _scheduler_option(p)
    _atlas_options(p)


def _export(sub) -> None:
    p = sub.add_parser("export", help="export a trained chain to one ONNX file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run-id", default=None, help="MLflow run id of a `cellcontrast train` run")
    src.add_argument("--model-dir", default=None, help="folder of a saved chain (or the --out-dir of one train)")
    src.add_argument("--best", action="store_true", help="the chain with the best validation macro F1 in MLflow")
    p.add_argument("--out", required=True, help="output .onnx")
    p.add_argument("--experiment", default="cellcontrast")
    p.add_argument("--setting", default=None, help="with --best: only runs of this setting")
    p.add_argument("--seed", default=None, help="with --best: only runs of this split seed")
    p.add_argument("--no-register", action="store_true", help="do not log/register the model in MLflow")


def _annotate(sub) -> None:
    p = sub.add_parser("annotate", help="annotate cells with an exported ONNX model (no torch needed)")
    p.add_argument("model", help="annotator .onnx from `cellcontrast export`")
    p.add_argument("query", nargs="+", help="query .h5ad with raw counts; several, or a quoted glob "
                                            "('shards/*.h5ad'), with --out-dir")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", default=None, help="annotated .h5ad to write (one query)")
    out.add_argument("--out-dir", default=None, metavar="DIR",
                     help="one annotated <name>.h5ad per query in DIR, and DIR/summary.csv")
    p.add_argument("--workers", type=int, default=1,
                   help="processes of a local Dask cluster: with --out-dir, queries annotated at once; with --out, "
                        "the query's rows shared among them")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="send the queries (or the query's rows) to a running Dask scheduler (tcp://HOST:8786)")
    p.add_argument("--csv", default=None, help="also write predictions as CSV")
    p.add_argument("--layer", default=None, help="read counts from this layer, or 'raw' for .raw")
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--min-confidence", type=_confidence, default=0.0,
                   help="below this, call the cell 'Unassigned'; auto: the threshold that flags 5%% of the "
                        "chain's validation cells")
    p.add_argument("--min-overlap", type=float, default=0.5, help="least fraction of model genes found in the query")
    p.add_argument("--case-insensitive", action="store_true", help="match gene names ignoring case")
    p.add_argument("--gene-key", default=None, metavar="COLUMN",
                   help="match the model's genes against this var column (e.g. feature_name) instead of var_names")
    p.add_argument("--majority-voting", action="store_true",
                   help="over-cluster the query (PCA, kNN, Leiden) and give each cluster its majority label")
    p.add_argument("--min-agreement", type=float, default=0.0,
                   help="with --majority-voting: clusters whose majority label has a smaller share are "
                        "'Heterogeneous' (default 0)")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write PNG plots into DIR: UMAP by label and confidence, counts per label; with "
                        "--label-key, the contingency against the given labels and accuracy per label")
    p.add_argument("--probabilities", action="store_true", help="store per-class probabilities in obsm")
    p.add_argument("--flag-unseen", nargs="?", const="energy", default=None, choices=["energy", "expression"],
                   metavar="SCORE",
                   help="also call Unassigned the cells of types the reference may lack, by a novelty score: "
                        "energy (the default; above 95%% of the chain's validation cells, or, from `fit` with "
                        "--batch-key or cross-validation, a p-value at most 0.05 under its fold models, column "
                        "cellcontrast_energy_p) or expression (a gene "
                        "far above the predicted class's profile, above 99%%; sharper within the reference's "
                        "donors, weaker across new donors; annotators from `cellcontrast fit`)")
    p.add_argument("--coverage", type=float, default=None, metavar="C",
                   help="write each cell's conformal prediction set for target coverage C (e.g. 0.9): the labels "
                        "that are plausible, calibrated on cells the annotator never trained on (columns "
                        "cellcontrast_prediction_set, cellcontrast_set_size; annotators from `cellcontrast fit`)")
    p.add_argument("--conformal-score", default="lac", choices=["lac", "aps", "class"],
                   help="lac (default): every label at least as probable as the calibrated level, the smallest "
                        "sets (an empty set: no label plausible); aps: the most probable labels up to a calibrated "
                        "mass (never empty, larger); class: lac with a threshold per type")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all cores)")
    p.add_argument("--label-key", default=None, help="obs column with true labels, to print accuracy")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="cellcontrast",
                           description="Cell-type annotation of scRNA-seq with supervised contrastive learning.")
    parser.add_argument("--version", action="version", version=f"cellcontrast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_simulate, _split, _holdout, _fit, _train, _tune, _pipeline_steps, _benchmark, _export, _annotate):
        add(sub)
    return parser
