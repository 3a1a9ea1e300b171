"""MLflow plumbing: where runs go, how parameters are flattened, how finished runs are found.

The store is MLflow's local default (``sqlite:///mlflow.db`` with artifacts under ``mlruns/``)
unless ``MLFLOW_TRACKING_URI`` says otherwise, so a tracking server is a one-variable change.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

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
    # two `cellcontrast train` starting at once on a new store would both create its tables
    with store_init_lock(mlflow.get_tracking_uri()):
        return mlflow.set_experiment(experiment).experiment_id


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL, or None for any other URL."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy understands: not a sqlite file
        return None
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database).expanduser().resolve()


@contextlib.contextmanager
def store_init_lock(url: str):
    """Serialise opening a local sqlite store among this machine's processes.

    MLflow and Optuna create (and migrate) their tables when they first open a database; two
    processes doing it at once on a new sqlite file fail or corrupt it ("table experiments
    already exists", "duplicate column name", "table _alembic_tmp_... already exists"). A
    server database (PostgreSQL, MySQL) handles this itself: no lock then. The lock is taken on
    the database's folder (a directory can be flocked), so no lock file is left anywhere; before,
    one file per store piled up in the temporary folder. Not re-entrant: do not nest it for the
    same URL.
    """
    db = sqlite_file(url)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    # sqlite needs the folder anyway; made first so every process locks the same one.
    db.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(db.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(folder, fcntl.LOCK_UN)
    finally:
        os.close(folder)


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




def finished_run(experiment_id: str, tags: dict[str, str]):
    """The newest FINISHED run whose tags all match, or None."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs(
        [experiment_id], filter_string=f"{query} and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"], max_results=1, output_format="list",
    )
    return runs[0] if runs else None


def owner_tags() -> dict[str, str]:
    """The host and process of a run, so that a later grid can tell a run whose process died."""
    return {"cellcontrast.host": socket.gethostname(), "cellcontrast.pid": str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a zombie that nobody reaped is dead too
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def close_dead_runs(experiment_id: str, tags: dict[str, str]) -> list[str]:
    """Mark KILLED the RUNNING runs whose tags all match and whose process, on this host, is
    gone (a killed grid); returns their ids. Runs of other hosts or live processes are left."""
    query = " and ".join(f"tags.{k} = '{v}'" for k, v in tags.items())
    runs = mlflow.search_runs([experiment_id], filter_string=f"{query} and attributes.status = 'RUNNING'",
                              output_format="list")
    client = mlflow.MlflowClient()
    closed = []
    for run in runs:
        host, pid = run.data.tags.get("cellcontrast.host"), run.data.tags.get("cellcontrast.pid", "")
        if host != socket.gethostname() or not pid.isdigit() or _process_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "killed_because", "its process died before the run finished")
        client.set_terminated(run.info.run_id, "KILLED")
        closed.append(run.info.run_id)
    return closed
