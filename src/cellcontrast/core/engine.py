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
import warnings
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


def pin_process_to_core(index: int) -> int | None:
    """Confine every thread of this process (and those it starts later) to one of the cores it
    may use, the ``index``-th modulo their number; the core, or None where that cannot be done.

    Two local annotation workers left to float over two cores ran each shard 24% slower than
    one worker on one core (25.2 s against 20.3 s a 250k-cell shard of the scDAE + MLP chain:
    each worker's reader, model and Dask threads migrating between the cores); two processes
    pinned to a core each ran as fast as one alone (20.0 s), 1.99x the throughput
    (bench/bench_annotate_shards.py).
    """
    try:
        cores = sorted(os.sched_getaffinity(0))
        core = cores[index % len(cores)]
        for task in os.listdir("/proc/self/task"):  # sched_setaffinity(0) would pin this thread only
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.sched_setaffinity(int(task), {core})
        return core
    except (AttributeError, OSError):  # not Linux
        return None


def _plugins(pid: int, pin: bool) -> list:
    from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

    class WorkerWatch(WorkerPlugin):
        def setup(self, worker):
            _exit_when_gone(pid)
            if pin and str(worker.name).isdigit():  # a LocalCluster names its workers 0, 1, ...
                pin_process_to_core(int(worker.name))

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


# The nanny's MALLOC_TRIM_THRESHOLD_ (65536) turns off glibc's adaptive mmap threshold, so
# every tensor above 128 KiB is mapped and unmapped again at each step: one scDAE fit took
# 119 s under it against 82 s without (default seed 0, bench/grid_worker_malloc.py).
UNSET_WORKER_ENVIRON = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
TASK_DATA_WARNING = "4GB"


@contextlib.contextmanager
def task_executor(workers: int, scheduler: str | None = None, *, pin: bool = False) -> Iterator[Executor]:
    """A `concurrent.futures` executor whose tasks run on Dask workers (see the module).

    ``pin``: a local cluster of no more workers than this process's cores puts each worker on
    a core of its own (`pin_process_to_core`); a running cluster (``scheduler``) is left as
    it is."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as err:
        raise InputError(f"more than one worker needs dask.distributed, which cannot be imported ({err}); "
                         "pip install distributed") from err
    import dask

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
        # No dashboard, so no use for the workers' statistical profiler, which walks every
        # thread's stack each 10 ms holding the GIL (its workers inherit this config).
        # The scheduler's HTTP server (health routes, no dashboard) binds 127.0.0.1 and moves
        # to a free port when 8787 is taken: nothing to warn a user about.
        with dask.config.set({"distributed.worker.profile.enabled": False, **UNSET_WORKER_ENVIRON}), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Port .* is already in use", category=UserWarning)
            cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, host="127.0.0.1",
                                   dashboard_address=None, memory_limit=0, silence_logs=logging.ERROR)
        client = Client(cluster)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for plugin in _plugins(os.getpid(), pin and int(workers) <= cores):
            client.register_plugin(plugin)
    try:
        # A task carries its data (a validation fold's reference, a sample): Dask's warning
        # about graphs over 10 MB would print on every `fit --workers` of a real reference.
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": TASK_DATA_WARNING}):
            yield client.get_executor(pure=False, retries=RETRIES)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
