"""Where the grid, tuning and annotation of many files run: dask.distributed.

Without a scheduler address, a `LocalCluster` of ``workers`` processes on 127.0.0.1, one task
at a time in each (a training task sets torch's ``threads``); with one (``--scheduler
tcp://HOST:8786``, or ``scheduler:`` under ``grid:`` in params.yaml) the tasks go to that
cluster. A task whose worker dies is retried by Dask (``RETRIES`` times); the grid recognises
runs already finished, tuning resumes its studies and annotation writes each output
atomically, so a retry does not redo or half-write finished work. Tasks are seeded, so
results do not depend on which worker ran them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Executor

from cellcontrast.core.errors import InputError

RETRIES = 2


def _exit_when_gone(pid: int) -> None:
    """In a local worker or nanny: exit within half a second of the process that started the
    cluster (killed, even by SIGKILL), instead of training on unseen while a restarted grid
    redoes the same runs."""
    def watch() -> None:
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:
                pass
            time.sleep(0.5)

    threading.Thread(target=watch, name="cellcontrast-parent-watch", daemon=True).start()


def _plugins(pid: int) -> list:
    from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

    class WorkerWatch(WorkerPlugin):
        def setup(self, worker):
            _exit_when_gone(pid)

    class NannyWatch(NannyPlugin):
        def setup(self, nanny):
            _exit_when_gone(pid)

    return [NannyWatch(), WorkerWatch()]


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse at once an address where nothing listens: Dask's Client would retry a refused
    connection for its whole timeout (30 s) before saying so."""
    from urllib.parse import urlsplit

    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
        return  # another transport (inproc, ucx, ws): left to Dask
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=timeout).close()
    except OSError as err:
        raise InputError(f"cannot reach the Dask scheduler at {address}: {err}") from err


@contextlib.contextmanager
def task_executor(workers: int, scheduler: str | None = None) -> Iterator[Executor]:
    """A `concurrent.futures` executor whose tasks run on Dask workers (see the module)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise InputError(f"more than one worker needs dask.distributed, which cannot be imported ({err}); "
                         "pip install distributed") from err
    cluster = None
    if scheduler:
        _check_reachable(scheduler)
        try:
            client = Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as err:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from err
    else:
        if int(workers) < 1:
            raise InputError(f"workers must be at least 1, not {workers}")
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR)
        client = Client(cluster)
        for plugin in _plugins(os.getpid()):
            client.register_plugin(plugin)
    try:
        yield client.get_executor(pure=False, retries=RETRIES)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
