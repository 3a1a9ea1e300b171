"""Shared fixtures: a small simulated atlas, written once per test session; a real PostgreSQL
server for the tuning tests."""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")


@pytest.fixture(autouse=True)
def _reset_mlflow_tracking_uri():
    """A test that calls mlflow.set_tracking_uri must not point later tests at its store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import mlflow

    mlflow.set_tracking_uri(None)  # also unsets the variable, which MLflow had set for subprocesses
    if before is not None:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def small_atlas():
    from cellcontrast.data.simulate import simulate_atlas

    return simulate_atlas(n_cells=3000, n_types=20, n_genes=200, n_individuals=2, seed=1)


@pytest.fixture(scope="session")
def small_atlas_path(small_atlas, tmp_path_factory):
    path = tmp_path_factory.mktemp("atlas") / "atlas.h5ad"
    small_atlas.write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def small_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "params.yaml"
    path.write_text(
        "settings:\n"
        "  default: {k: 8, cap: 60, equalize: true, fractions: [0.8, 0.1, 0.1]}\n"
        "  scarce: {k: 12, cap: 30, equalize: true, fractions: [0.8, 0.1, 0.1]}\n"
        "  natural: {k: 12, cap: 200, equalize: false, fractions: [0.8, 0.1, 0.1]}\n"
    )
    return path


@pytest.fixture(scope="session")
def tiny_split(small_atlas_path, tmp_path_factory):
    """A small Default-like split (8 types x 60 cells, 200 genes) on disk."""
    from cellcontrast.data.splits import split_atlas_to_dir

    out = tmp_path_factory.mktemp("split") / "default" / "seed0"
    split_atlas_to_dir(small_atlas_path, "default", 0, out,
                       settings={"settings": {"default": {"k": 8, "cap": 60}}})
    return out


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """An isolated MLflow store (sqlite + artifacts) in tmp_path, and the cwd there."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


FAST_PARAMS = {
    "lr": {"epochs": 5},
    "actinn": {"epochs": 4},
    "scdae": {"ae_epochs": 1, "classifier_epochs": 3, "finetune_epochs": 1},
    "mlp": {"max_epochs": 4},
    "mls": {"max_epochs": 4},
}


def marker_counts(n_classes=6, per_class=60, n_genes=200, seed=0):
    """Negative-binomial counts with class-specific marker genes (rows shuffled)."""
    rng = np.random.default_rng(seed)
    means = np.tile(rng.gamma(1.0, 1.0, n_genes), (n_classes, 1))
    for c in range(n_classes):
        markers = rng.choice(n_genes, 30, replace=False)
        means[c, markers] *= rng.uniform(4, 8, 30)
    y = np.repeat(np.arange(n_classes), per_class)
    mu = means[y] * rng.lognormal(0, 0.3, y.size)[:, None]
    counts = rng.negative_binomial(2, 2 / (2 + mu)).astype(np.float32)
    order = rng.permutation(y.size)
    return sp.csr_matrix(counts[order]), y[order]


# A real PostgreSQL server for the tuning tests: PyPI's `pgserver` wheel ships the server
# binaries (PostgreSQL 16), so `make` installs it on any fresh machine. The fixture initialises
# a temporary data directory, serves it on 127.0.0.1 at a free port (no other address), and
# stops it after the session; each test gets a database of its own.

_databases = itertools.count()


@pytest.fixture(scope="session")
def postgres_url():
    """The server's URL, ``postgresql+psycopg2://postgres@127.0.0.1:PORT``."""
    try:
        import pgserver
        import psycopg2  # noqa: F401
        from pgserver._commands import pg_ctl
    except ImportError as err:
        pytest.skip(f"no PostgreSQL server binary: pgserver or psycopg2 cannot be imported ({err})")
    root = Path(tempfile.mkdtemp(prefix="cellcontrast-pg-"))
    pgdata, sockets = root / "pgdata", root / "sockets"
    pgdata.mkdir()
    sockets.mkdir()
    os.chmod(root, 0o755)
    os.chmod(sockets, 0o777)  # as root, the server runs as pgserver's own user
    server = pgserver.get_server(pgdata, cleanup_mode="stop")  # initdb (and that user, as root)
    user = server.system_user
    server.cleanup()  # it listens on a socket only; start it again on 127.0.0.1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    pg_ctl(["-w", "-o", "-h 127.0.0.1", "-o", f"-p {port}", "-o", f"-k {sockets}", "-l", str(pgdata / "server.log"),
            "start"], pgdata=pgdata, user=user, timeout=60)
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user, timeout=60)


def new_database(server_url: str) -> str:
    """A fresh database on the server; its URL."""
    import sqlalchemy

    name = f"cellcontrast_test_{os.getpid()}_{next(_databases)}"
    engine = sqlalchemy.create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return f"{server_url}/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def optuna_storage(request, tmp_path):
    """An Optuna storage URL: a sqlite file, or a database on the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/optuna.db"
    return new_database(request.getfixturevalue("postgres_url"))


# A real MLflow tracking server, as teams share runs: `mlflow server` on 127.0.0.1 at a free
# port, a sqlite backend and an artifact root in a temporary folder (artifacts travel over
# HTTP, `mlflow-artifacts:/`), one worker; stopped after the session.

@pytest.fixture(scope="session")
def mlflow_server():
    """The server's URL, ``http://127.0.0.1:PORT``."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    root = Path(tempfile.mkdtemp(prefix="cellcontrast-mlflow-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts")]
    log = root / "server.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
                                  start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


@pytest.fixture(autouse=True, scope="session")
def _one_validation_part():
    """`fit_annotator` cross-validates references up to CV_MAX_CELLS cells by default, which is
    every test reference: five fits instead of one. Tests of other behaviour take the one-part
    path (session-wide, so module fixtures that fit see it too); tests/model/test_grouped.py
    covers the default (it sets the constant back)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("cellcontrast.experiments.fit_annotator.CV_MAX_CELLS", 0)
        yield
