"""A real PostgreSQL server for the tuning tests: PyPI's `pgserver` wheel ships the server
binaries (PostgreSQL 16), so `make` installs it on any fresh machine. The fixture initialises
a temporary data directory, serves it on 127.0.0.1 at a free port (no other address), and
stops it after the session; each test gets a database of its own."""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
from pathlib import Path

import pytest

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
