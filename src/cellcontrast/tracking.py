"""MLflow plumbing: where runs go, how parameters are flattened, how finished runs are found.

The store is MLflow's local default (``sqlite:///mlflow.db`` with artifacts under ``mlruns/``)
unless ``MLFLOW_TRACKING_URI`` says otherwise, so a tracking server is a one-variable change.
"""

from __future__ import annotations

import hashlib
import json
import os

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")

import mlflow  # noqa: E402

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def setup(experiment: str) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id.

    Under `mlflow run`, MLFLOW_RUN_ID names the project's own run; `start_run()` would reuse
    it for every training. We take it out of the environment and nest our runs under it.
    """
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(DEFAULT_TRACKING_URI)
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    if project_run:
        os.environ["CELLCONTRAST_PARENT_RUN_ID"] = project_run
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    return mlflow.set_experiment(experiment).experiment_id


def parent_tags() -> dict[str, str]:
    """Tags that nest a run under the `mlflow run` project run, when there is one."""
    parent = os.environ.get("CELLCONTRAST_PARENT_RUN_ID")
    return {"mlflow.parentRunId": parent} if parent else {}


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """{"mlp": {"temperature": 0.1}} -> {"mlp.temperature": "0.1"}; MLflow params are strings."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


def fingerprint(*parts) -> str:
    """A short, stable hash of JSON-able values (parameters, data hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished_run(experiment_id: str, tags: dict[str, str]):
    """The newest FINISHED run whose tags all match, or None."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs(
        [experiment_id], filter_string=f"{query} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0] if runs else None
