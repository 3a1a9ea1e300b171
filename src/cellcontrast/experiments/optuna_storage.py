"""Optuna's storage for the tuning studies: any SQLAlchemy URL (sqlite by default, PostgreSQL
for many machines), with the heartbeat on so that trials of dead workers are failed."""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from cellcontrast.core.errors import InputError, first_line
from cellcontrast.experiments import tracking

DEFAULT_STORAGE = "sqlite:///optuna.db"


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat_interval, grace_period) in seconds, from the environment or the defaults."""
    try:
        interval = int(os.environ.get("CELLCONTRAST_TUNE_HEARTBEAT", "60"))
        grace = int(os.environ.get("CELLCONTRAST_TUNE_GRACE", str(3 * interval)))
    except ValueError:
        raise InputError("CELLCONTRAST_TUNE_HEARTBEAT and CELLCONTRAST_TUNE_GRACE must be whole seconds") from None
    if interval < 1 or grace < 1:
        raise InputError("CELLCONTRAST_TUNE_HEARTBEAT and CELLCONTRAST_TUNE_GRACE must be at least 1 second")
    return interval, grace


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def open_storage(url: str | None = None):
    """An Optuna RDBStorage with the heartbeat on; a bad URL is an InputError."""

    url = url or DEFAULT_STORAGE
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise InputError(f"bad Optuna storage URL {url!r}; expected an RDB URL such as "
                         f"sqlite:///optuna.db or postgresql://user@host/db") from None
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise InputError(f"Optuna storage {url!r}: folder {folder} does not exist")
        # Several workers share one sqlite file: wait for its lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    interval, grace = heartbeat_settings()
    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings(), tracking.store_init_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace,
                    heartbeat_stale_trial_callback=close_stale_trial_run)
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
            raise InputError(f"Optuna storage {url!r}: no database driver for it ({first_line(err)})") from None
        except (sqlalchemy.exc.ArgumentError, TypeError) as err:
            raise InputError(f"bad Optuna storage URL {url!r}: {first_line(err)}") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            # A server database busy, or two machines creating its tables at once: retry.
            last = err
            time.sleep(0.5 * (attempt + 1))
    raise InputError(f"cannot open Optuna storage {url!r}: {first_line(last)}")


def close_stale_trial_run(study, trial) -> None:
    """Heartbeat callback: a trial of a dead worker was marked FAIL; close its MLflow run."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "state", "FAIL")
            client.set_tag(run_id, "failed_because", "worker stopped (heartbeat stale)")
            client.set_terminated(run_id, "FAILED")
    except Exception as err:  # tracking must not stop the study
        print(f"warning: could not close MLflow run {run_id} of stale trial {trial.number}: "
              f"{first_line(err)}", file=sys.stderr)


def _never_beaten(study, grace: int) -> list:
    """RUNNING trials started longer than ``grace`` seconds ago that never recorded a heartbeat.

    Optuna's workers record a trial's first heartbeat as soon as it starts, so such a trial's
    worker died between creating it and that beat; `fail_stale_trials` skips trials without a
    heartbeat and would leave it RUNNING for good.
    """
    storage = getattr(study._storage, "_backend", study._storage)  # under Optuna's cache wrapper
    if not isinstance(storage, optuna.storages.RDBStorage):
        return []
    from optuna.storages._rdb import models  # the heartbeat table has no public reader

    now = datetime.datetime.now()  # the clock Optuna's workers stamp datetime_start with
    old = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
           if t.datetime_start is not None and (now - t.datetime_start).total_seconds() > grace]
    if not old:
        return []
    session = storage.scoped_session()
    try:
        return [t for t in old if models.TrialHeartbeatModel.where_trial_id(t._trial_id, session) is None]
    finally:
        session.close()


def fail_stale(study) -> None:
    """Mark FAIL the RUNNING trials of workers that died: a heartbeat older than the grace
    period (Optuna), or none at all for longer than it (`_never_beaten`); close their runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
        _, grace = heartbeat_settings()
        for trial in _never_beaten(study, grace):
            try:
                if study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL):
                    close_stale_trial_run(study, trial)
            except (RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
                pass  # another worker finished or failed it first
