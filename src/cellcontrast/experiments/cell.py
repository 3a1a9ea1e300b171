"""One grid cell of the paper's experiment: train a base model and its augmented chains on one
split, evaluate on validation and test, and log each training as one MLflow run.

A base model is trained once per (split, base) and reused by its components, as the paper's
step 1 allows ("we can skip step 1 if we have access to a pretrained model"): the augmented
runs are tagged with the run id of the base run they build on.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellcontrast.core.errors import InputError
from cellcontrast.data.splits import read_split

BASES = ("lr", "actinn", "scdae")
COMPONENTS = ("none", "mlp", "mls")
METRICS = ("top1", "top3", "macro_f1")


@dataclass
class SplitData:
    info: dict
    classes: list[str]
    genes: list[str]
    X: dict[str, sp.csr_matrix]
    y: dict[str, np.ndarray]

    @property
    def fingerprint(self) -> str:
        from cellcontrast.experiments.tracking import fingerprint

        return fingerprint(self.info)


def load_split_data(split_dir: str | Path, parts=("train", "val", "test")) -> SplitData:
    """Counts and integer labels of the split's parts (train/val/test by default; tuning asks
    for train and val only, so test.h5ad is never opened), classes in split.json's order."""
    info, parts = read_split(split_dir, parts=parts)
    classes = list(info["classes"])
    genes = parts["train"].var_names.astype(str).tolist()
    X, y = {}, {}
    for name, adata in parts.items():
        if adata.var_names.astype(str).tolist() != genes:
            raise InputError(f"{split_dir}/{name}.h5ad has other genes than train.h5ad; rebuild the split")
        labels = pd.Categorical(adata.obs["cell_type"].astype(str), categories=classes)
        if (labels.codes < 0).any():
            raise InputError(f"{split_dir}/{name}.h5ad has labels outside split.json's classes; rebuild the split")
        X[name] = sp.csr_matrix(adata.X, dtype=np.float32)
        y[name] = labels.codes.astype(np.int64)
    return SplitData(info=info, classes=classes, genes=genes, X=X, y=y)


def read_params_file(path: str | None) -> dict:
    """Hyperparameters keyed by model name ({"lr": {...}, "mls": {...}}) from a JSON file."""
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such params file: {p}")
    try:
        params = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{p} is not valid JSON: {err}") from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise InputError(f'{p} must map model names to parameters, e.g. {{"mls": {{"temperature": 0.1}}}}')
    return params


def _check_params(params: dict) -> None:
    from cellcontrast.train.training import resolve_params

    for name, values in params.items():
        try:
            resolve_params(name, values)
        except ValueError as err:
            raise InputError(f"bad parameters: {err}") from None


class _MlflowEpochLog:
    """The training log callback: per-epoch values as MLflow metrics, named stage.key."""

    def __call__(self, stage: str, epoch: int, values: dict) -> None:
        import mlflow

        finite = {f"{stage}.{k}": float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        if finite:
            mlflow.log_metrics(finite, step=int(epoch))


def _calibrate(chain, data: SplitData) -> dict:
    """Fit the chain's temperature on validation (calibration.py); ECE before, on val and test."""
    import torch

    from cellcontrast.train.calibration import expected_calibration_error, fit_temperature
    from cellcontrast.nn.chain import predict_logits

    logits = {part: predict_logits(chain, data.X[part]) for part in ("val", "test")}
    temperature = fit_temperature(logits["val"], data.y["val"])
    chain.temperature.fill_(temperature)
    out = {"temperature": temperature}
    for part, z in logits.items():
        proba = torch.softmax(torch.as_tensor(z, dtype=torch.float64), dim=-1).numpy()
        out[f"{part}_ece_uncalibrated"] = expected_calibration_error(proba, data.y[part])
    return out


def _evaluate(chain, data: SplitData) -> tuple[dict, dict]:
    """Calibrate the chain on validation, then val and test metrics (ECE and coverage included)."""
    from cellcontrast.train.calibration import coverage_metrics, expected_calibration_error
    from cellcontrast.nn.chain import predict_proba
    from cellcontrast.train.metrics import classification_metrics

    metrics, proba = _calibrate(chain, data), {}
    for part in ("val", "test"):
        proba[part] = predict_proba(chain, data.X[part])
        for key, value in classification_metrics(data.y[part], proba[part], len(data.classes)).items():
            metrics[f"{part}_{key}"] = value
        metrics[f"{part}_ece"] = expected_calibration_error(proba[part], data.y[part])
    metrics.update({f"test_{k}": v for k, v in coverage_metrics(proba["test"], data.y["test"]).items()})
    return metrics, proba


def _log_artifacts(chain, data: SplitData, test_proba: np.ndarray, title: str, workdir: Path) -> None:
    import mlflow
    import torch

    from cellcontrast.experiments import plots
    from cellcontrast.train.metrics import confusion, per_class_f1

    y_true, y_pred = data.y["test"], test_proba.argmax(axis=1)
    table = per_class_f1(y_true, y_pred, data.classes)
    table.to_csv(workdir / "per_class_f1.csv", index=False)
    plots.save(plots.confusion_figure(confusion(y_true, y_pred, len(data.classes)), data.classes,
                                      f"{title}: test confusion"), workdir / "confusion_matrix.png")
    with torch.no_grad():
        emb = chain.embed(torch.as_tensor(data.X["test"].toarray())).numpy()
    plots.save(plots.embedding_figure(emb, y_true, data.classes, f"{title}: test embedding (PCA)"),
               workdir / "embedding.png")
    for name in ("per_class_f1.csv", "confusion_matrix.png", "embedding.png"):
        mlflow.log_artifact(str(workdir / name))


def train_cell(
    split_dir: str | Path,
    base: str,
    components: list[str] | tuple[str, ...] = ("none",),
    params: dict | None = None,
    seed: int | None = None,
    experiment: str = "cellcontrast",
    out_root: str | Path | None = None,
    tags: dict | None = None,
    skip_finished: bool = False,
    data: SplitData | None = None,
    quiet: bool = False,
) -> list[dict]:
    """Train `base` and its `components` on one split; one MLflow run (and saved chain) each.

    Returns one result row per component: identity, run id, validation and test metrics.
    With `skip_finished`, a component whose run already finished with the same parameters and
    data is not trained again; its logged metrics are returned.
    """
    import mlflow
    import torch

    from cellcontrast.experiments import tracking
    from cellcontrast.nn.chain import save_chain
    from cellcontrast.train.training import (
        build_chain,
        fit_base,
        fit_component,
        needs_component_base,
        resolve_params,
    )

    params = params or {}
    _check_params(params)
    data = data or load_split_data(split_dir)
    info = data.info
    seed = int(info["seed"] if seed is None else seed)
    setting = str(info["setting"])
    out_root = Path(out_root or f"models/{setting}/seed{info['seed']}")
    experiment_id = tracking.setup(experiment)
    log = _MlflowEpochLog()
    base_model, base_run_id, rows = None, None, []

    for component in components:
        resolved = {base: resolve_params(base, params.get(base))}
        if component != "none":
            resolved[component] = resolve_params(component, params.get(component))
        cell = f"{setting}/seed{info['seed']}/{base}/{component}"
        run_tags = {"grid_cell": cell, "fingerprint": tracking.fingerprint(resolved, data.fingerprint, seed)}
        if skip_finished:
            tracking.close_dead_runs(experiment_id, run_tags)  # left RUNNING by a killed grid
            done = tracking.finished_run(experiment_id, run_tags)
            if done is not None:
                row = {"setting": setting, "seed": info["seed"], "base": base, "component": component,
                       "run_id": done.info.run_id, "skipped": True,
                       **{k: v for k, v in done.data.metrics.items()
                          if k.startswith(("val_", "test_")) or k in ("temperature", "train_seconds")}}
                rows.append(row)
                if component == "none":
                    base_run_id = done.info.run_id
                continue
        started = time.time()
        with mlflow.start_run(run_name=cell.replace("/", "-"), tags={**run_tags, **tracking.parent_tags(), **tracking.owner_tags()}) as run:
            mlflow.set_tags({"base": base, "component": component, "setting": setting,
                             "seed": str(info["seed"]), "model_seed": str(seed), **(tags or {})})
            mlflow.log_params(tracking.flatten(resolved))
            mlflow.log_params({f"split.{k}": info[k] for k in ("setting", "k", "n_per_type", "seed")})
            mlflow.log_params({"split.source_sha256": info["source"]["sha256"],
                               "split.n_train": info["n_cells"]["train"], "split.dir": str(split_dir),
                               "model_seed": seed})
            if base_model is None or (component != "none" and needs_component_base(base_model, params.get(base))):
                base_model = fit_base(data.X["train"], data.y["train"], data.X["val"], data.y["val"],
                                      len(data.classes), base, params.get(base), seed, log,
                                      for_component=component != "none")
                if component == "none":
                    base_run_id = run.info.run_id
            if base == "lr":  # what "auto" chose on validation
                mlflow.log_param("lr.standardized", base_model.preprocess.standardize)
                mlflow.log_param("lr.chosen_l2", getattr(base_model, "train_params", {}).get("chosen_l2"))
            if component == "none":
                chain = build_chain(base_model)
            else:
                if base_run_id:
                    mlflow.set_tag("base_run_id", base_run_id)
                h, head = fit_component(base_model, data.X["train"], data.y["train"], data.X["val"],
                                        data.y["val"], len(data.classes), component,
                                        params.get(component), seed, log)
                chain = build_chain(base_model, h, head)
            metrics, proba = _evaluate(chain, data)
            metrics["train_seconds"] = time.time() - started
            mlflow.log_metrics(metrics)
            model_dir = out_root / f"{base}-{component}"
            config = {"genes": data.genes, "class_names": data.classes, "base": base,
                      "component": component, "params": resolved, "run_id": run.info.run_id,
                      "metrics": metrics, "split": {k: info[k] for k in ("setting", "k", "seed")}}
            save_chain(chain, config, model_dir)
            mlflow.log_artifacts(str(model_dir), artifact_path="chain")
            with tempfile.TemporaryDirectory() as tmp:
                _log_artifacts(chain, data, proba["test"], cell, Path(tmp))
        torch.set_grad_enabled(True)
        row = {"setting": setting, "seed": info["seed"], "base": base, "component": component,
               "run_id": run.info.run_id, "skipped": False, **metrics}
        rows.append(row)
        if not quiet:
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def train_from_cli(args) -> None:
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train_cell(args.split_dir, args.base, [args.component], read_params_file(args.params),
               seed=args.seed, experiment=args.experiment, out_root=args.out_dir)


def grid_from_cli(args) -> None:  # the grid lives in pipeline.py; imported here for the CLI
    from cellcontrast.experiments.grid import run_grid_from_params

    run_grid_from_params(args.params)


def benchmark_from_cli(args) -> None:
    from cellcontrast.experiments.grid import benchmark

    benchmark(args)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
