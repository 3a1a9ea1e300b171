"""Where an exported chain comes from, and where it goes: a saved chain folder, an MLflow run's
``chain`` artifact, or the FINISHED run of an experiment with the best *validation* macro F1
(test metrics are never used to choose); the ONNX file is then logged with MLflow's ONNX
flavour and registered as a model version."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import mlflow
import onnx
from mlflow.tracking import MlflowClient

from cellcontrast.core.errors import InputError, first_line
from cellcontrast.experiments import tracking
from cellcontrast.experiments.selection import SELECTION_METRIC
from cellcontrast.export.onnx import export_chain_to_onnx, normalize_config
from cellcontrast.nn.chain import load_chain_folder

REGISTERED_MODEL_NAME = "cellcontrast-annotator"


def load_exportable(model_dir: str | os.PathLike):
    """A saved chain and its config, "classes" filled in for the ONNX metadata."""
    chain, config = load_chain_folder(model_dir)
    return chain, normalize_config(config)


def _download_chain(client, run_id: str, dst: str):

    try:
        artifacts = client.list_artifacts(run_id, "chain")
    except Exception as err:
        raise InputError(f"cannot list the artifacts of run {run_id}: {first_line(err)}") from err
    if not artifacts:
        raise InputError(
            f"run {run_id} has no 'chain' artifact; pass the id of a `cellcontrast train` run, or --model-dir"
        )
    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="chain", dst_path=dst)
    except Exception as err:
        raise InputError(f"cannot download the chain of run {run_id}: {first_line(err)}") from err
    return load_exportable(local)


def _get_run(client, run_id: str):
    try:
        return client.get_run(run_id)
    except Exception as err:
        raise InputError(
            f"unknown MLflow run id {run_id!r} (tracking URI {_tracking_uri()}); "
            "list runs with `mlflow runs list` or use --best"
        ) from err


def _tracking_uri() -> str:

    return mlflow.get_tracking_uri()


def find_best_run(client, experiment: str, tags: dict[str, str] | None = None):
    """The FINISHED run of `experiment` with a chain and the highest validation macro F1,
    among runs whose tags match `tags` (for example one setting and seed)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise InputError(
            f"no MLflow experiment named {experiment!r} at {_tracking_uri()}; train first or pass --experiment"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=" and ".join(
            ["attributes.status = 'FINISHED'"] + [f"tags.{k} = '{v}'" for k, v in (tags or {}).items()]
        ),
        order_by=[f"metrics.{SELECTION_METRIC} DESC"],
        max_results=5000,
    )
    scored = [
        r for r in runs
        if SELECTION_METRIC in r.data.metrics and math.isfinite(r.data.metrics[SELECTION_METRIC])
        and r.data.tags.get("cellcontrast.kind") != "export"
    ]
    # Sort again in Python: stable, NaN-free, independent of the backend's NULL ordering.
    scored.sort(key=lambda r: -r.data.metrics[SELECTION_METRIC])
    for run in scored:
        if client.list_artifacts(run.info.run_id, "chain"):
            return run
    raise InputError(
        f"experiment {experiment!r} has no FINISHED run with metric {SELECTION_METRIC} and a "
        "'chain' artifact; run `cellcontrast train` first"
    )


def register_annotator(out_path: Path, config: dict, source_run_id: str | None, experiment: str) -> str:
    """Log the ONNX file with MLflow's ONNX flavour in a new run and register a model version."""


    # Under `mlflow run` MLFLOW_RUN_ID names the project's run (in its own experiment):
    # starting a run in `experiment` with it set fails, so nest under it instead.
    tracking.setup(experiment)
    model = onnx.load_model(str(out_path))
    tags = {"cellcontrast.kind": "export", "source_run_id": source_run_id or "",
            "base": str(config.get("base", "")), "component": str(config.get("component", "")),
            **tracking.parent_tags()}
    # nested under the caller's run when there is one (`fit_annotator`'s parent run)
    with mlflow.start_run(run_name="export-onnx", tags=tags, nested=mlflow.active_run() is not None) as run:
        metrics = config.get("metrics") or {}
        mlflow.log_params({
            "source_run_id": source_run_id or "",
            "n_genes": len(config["genes"]),
            "n_classes": len(config["classes"]),
            f"source_{SELECTION_METRIC}": metrics.get(SELECTION_METRIC, ""),
        })
        info = mlflow.onnx.log_model(
            model,
            name="annotator",
            registered_model_name=REGISTERED_MODEL_NAME,
            save_as_external_data=False,
        )
        mlflow.log_artifact(str(out_path), artifact_path="onnx")
    version = getattr(info, "registered_model_version", None)
    return f"{REGISTERED_MODEL_NAME} v{version}" if version else f"run {run.info.run_id}"


def export_annotator(out: str | os.PathLike, *, model_dir: str | os.PathLike | None = None,
                     run_id: str | None = None, best: bool = False, experiment: str = "cellcontrast",
                     setting: str | None = None, seed: str | int | None = None,
                     register: bool = True) -> str:
    """Export one chain (a folder, an MLflow run, or the best run on validation) to ``out``
    and, with ``register``, log and register it; returns the line that says what was done."""
    out_path = Path(out)
    if out_path.suffix.lower() != ".onnx":
        raise InputError(f"--out {out_path} should end in .onnx")
    if sum(x is not None and x is not False for x in (model_dir, run_id, best or None)) != 1:
        raise InputError("name exactly one source: a model folder, a run id, or best")
    with tempfile.TemporaryDirectory(prefix="cellcontrast-export-") as tmp:
        if model_dir is not None:
            chain, config = load_exportable(model_dir)
            source_run_id, source = config.get("run_id") or None, str(model_dir)
        else:
            client = MlflowClient()
            if best:
                wanted = {k: str(v) for k, v in (("setting", setting), ("seed", seed)) if v is not None}
                run = find_best_run(client, experiment, wanted)
            else:
                run = _get_run(client, run_id)
            source_run_id, source = run.info.run_id, f"run {run.info.run_id}"
            chain, config = _download_chain(client, source_run_id, tmp)
            # The run's logged metrics are authoritative over the saved config.
            config = {**config, "run_id": source_run_id,
                      "metrics": {**(config.get("metrics") or {}), **run.data.metrics}}
        export_chain_to_onnx(chain, config, out_path)
    registered = register_annotator(out_path, config, source_run_id, experiment) if register else ""
    val = (config.get("metrics") or {}).get(SELECTION_METRIC)
    val_text = f"{SELECTION_METRIC}={val:.4f}" if isinstance(val, int | float) else f"{SELECTION_METRIC}=n/a"
    return f"exported {out_path} from {source} ({val_text})" + (f"; registered as {registered}" if registered else "")
