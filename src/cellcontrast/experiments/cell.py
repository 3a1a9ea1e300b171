"""One grid cell of the paper's experiment: train a base model and its augmented chains on one
split, evaluate on validation and test, and log each training as one MLflow run.

A base model is trained once per (split, base) and reused by its components, as the paper's
step 1 allows ("we can skip step 1 if we have access to a pretrained model"): the augmented
runs are tagged with the run id of the base run they build on.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch

from cellcontrast.core.fingerprint import TRAINING_CODE, code_digest, fingerprint
from cellcontrast.core.names import LINEAR_BASES
from cellcontrast.data.split_data import SplitData, load_split_data
from cellcontrast.experiments import plots, tracking
from cellcontrast.nn.chain import save_chain
from cellcontrast.train.base_model import fit_base, needs_component_base
from cellcontrast.train.chain import build_chain
from cellcontrast.train.component import fit_component
from cellcontrast.train.evaluation import evaluate
from cellcontrast.train.metrics import confusion, per_class_f1
from cellcontrast.train.open_set import attach_unexplained_expression, open_set_metrics
from cellcontrast.train.recipes import check_params, resolve_params

# Metrics of a finished run that a skipped grid cell reports again.
_KEPT_PREFIXES = ("val_", "test_")
_KEPT_KEYS = ("temperature", "train_seconds")


class MlflowEpochLog:
    """The training log callback: per-epoch values as MLflow metrics, named stage.key."""

    def __call__(self, stage: str, epoch: int, values: dict) -> None:
        finite = {f"{stage}.{k}": float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
        if finite:
            mlflow.log_metrics(finite, step=int(epoch))


@dataclass
class _Cell:
    """What the runs of one (split, base) share: the data, the base model once trained."""

    split_dir: Path
    data: SplitData
    base: str
    params: dict
    seed: int
    experiment_id: str
    out_root: Path
    tags: dict
    log: MlflowEpochLog = field(default_factory=MlflowEpochLog)
    base_model: object = None
    base_run_id: str | None = None

    @property
    def setting(self) -> str:
        return str(self.data.info["setting"])

    def name(self, component: str) -> str:
        return f"{self.setting}/seed{self.data.info['seed']}/{self.base}/{component}"

    def row(self, component: str, run_id: str, skipped: bool, metrics: dict) -> dict:
        where = {"holdout": self.data.info["holdout"]} if "holdout" in self.data.info else {}
        return {"setting": self.setting, "seed": self.data.info["seed"], **where, "base": self.base,
                "component": component, "run_id": run_id, "skipped": skipped, **metrics}


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
    params = params or {}
    check_params(params)
    data = data or load_split_data(split_dir)
    info = data.info
    cell = _Cell(Path(split_dir), data, base, params, int(info["seed"] if seed is None else seed),
                 tracking.setup(experiment), Path(out_root or f"models/{info['setting']}/seed{info['seed']}"),
                 tags or {})
    rows = []
    for component in components:
        resolved = {base: resolve_params(base, params.get(base))}
        if component != "none":
            resolved[component] = resolve_params(component, params.get(component))
        run_tags = {"grid_cell": cell.name(component),
                    "fingerprint": fingerprint(resolved, data.fingerprint, cell.seed, code_digest(*TRAINING_CODE))}
        row = _finished_row(cell, component, run_tags) if skip_finished else None
        if row is None:
            row = _train_run(cell, component, resolved, run_tags)
            if not quiet:
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}),
                      flush=True)
        rows.append(row)
    return rows


def _finished_row(cell: _Cell, component: str, run_tags: dict) -> dict | None:
    """The row of a run that already finished with these tags, or None."""
    tracking.close_dead_runs(cell.experiment_id, run_tags)  # left RUNNING by a killed grid
    done = tracking.finished_run(cell.experiment_id, run_tags)
    if done is None:
        return None
    if component == "none":
        cell.base_run_id = done.info.run_id
    kept = {k: v for k, v in done.data.metrics.items() if k.startswith(_KEPT_PREFIXES) or k in _KEPT_KEYS}
    return cell.row(component, done.info.run_id, True, kept)


def _train_run(cell: _Cell, component: str, resolved: dict, run_tags: dict) -> dict:
    """Train one chain of the cell as one MLflow run; save and log it; returns its row."""
    data, info, started = cell.data, cell.data.info, time.time()
    tags = {**run_tags, **tracking.parent_tags(), **tracking.owner_tags()}
    with mlflow.start_run(run_name=cell.name(component).replace("/", "-"), tags=tags) as run:
        mlflow.set_tags({"base": cell.base, "component": component, "setting": cell.setting,
                         "seed": str(info["seed"]), "model_seed": str(cell.seed), **cell.tags})
        mlflow.log_params(tracking.flatten(resolved))
        mlflow.log_params({f"split.{k}": info[k] for k in ("setting", "k", "n_per_type", "seed", "batch_key",
                                                             "holdout") if k in info})
        if info.get("unseen_types"):
            mlflow.log_param("split.unseen_types", ", ".join(info["unseen_types"])[:500])
        mlflow.log_params({"split.source_sha256": info["source"]["sha256"],
                           "split.n_train": info["n_cells"]["train"], "split.dir": str(cell.split_dir),
                           "model_seed": cell.seed})
        chain = _fit(cell, component, run.info.run_id)
        if "unseen" in data.X:  # its threshold from validation, then scored on the unseen cells below
            attach_unexplained_expression(chain, data.X["train"], data.y["train"])
        metrics, proba = evaluate(chain, {p: data.X[p] for p in ("val", "test")}, data.y, len(data.classes))
        if "unseen" in data.X:  # test cells of types removed from training: can the chain tell?
            found = open_set_metrics(chain, data.X["train"], data.y["train"], data.X["val"], data.X["test"],
                                     data.X["unseen"], seed=cell.seed)
            metrics.update({f"test_{k}": v for k, v in found.items()})
        metrics["train_seconds"] = time.time() - started
        mlflow.log_metrics(metrics)
        model_dir = cell.out_root / f"{cell.base}-{component}"
        config = {"genes": data.genes, "class_names": data.classes, "base": cell.base,
                  "component": component, "params": resolved, "run_id": run.info.run_id,
                  "metrics": metrics, "split": {k: info[k] for k in ("setting", "k", "seed")}}
        save_chain(chain, config, model_dir)
        mlflow.log_artifacts(str(model_dir), artifact_path="chain")
        with tempfile.TemporaryDirectory() as tmp:
            _log_artifacts(chain, data, proba["test"], cell.name(component), Path(tmp))
    torch.set_grad_enabled(True)
    return cell.row(component, run.info.run_id, False, metrics)


def _fit(cell: _Cell, component: str, run_id: str):
    """The chain of one run: the cell's base (trained here when needed) and the component."""
    data, base_params = cell.data, cell.params.get(cell.base)
    if cell.base_model is None or (component != "none" and needs_component_base(cell.base_model, base_params)):
        # Under a component LR's head goes unused (the component fits its own): fit only its
        # preprocessing (its L2 path made LR + MLP take 51 s against LR + MLS's 30 s, Default seed 0).
        cell.base_model = fit_base(data.X["train"], data.y["train"], data.X["val"], data.y["val"],
                                   len(data.classes), cell.base, base_params, cell.seed, cell.log,
                                   for_component=component != "none", fit_head=component == "none")
        if component == "none":
            cell.base_run_id = run_id
    if cell.base in LINEAR_BASES:  # what "auto" chose on validation
        mlflow.log_param(f"{cell.base}.standardized", cell.base_model.preprocess.standardize)
        mlflow.log_param(f"{cell.base}.chosen_l2", getattr(cell.base_model, "train_params", {}).get("chosen_l2"))
    if component == "none":
        return build_chain(cell.base_model)
    if cell.base_run_id:
        mlflow.set_tag("base_run_id", cell.base_run_id)
    h, head = fit_component(cell.base_model, data.X["train"], data.y["train"], data.X["val"], data.y["val"],
                            len(data.classes), component, cell.params.get(component), cell.seed, cell.log)
    return build_chain(cell.base_model, h, head)


def _log_artifacts(chain, data: SplitData, test_proba: np.ndarray, title: str, workdir: Path) -> None:
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
