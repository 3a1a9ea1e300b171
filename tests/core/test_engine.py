"""The execution engine: tasks on dask.distributed, a local cluster or a running one."""

import os
from concurrent.futures import as_completed
from pathlib import Path

import pytest

from cellcontrast.core.engine import task_executor
from cellcontrast.core.errors import InputError


def _square(x: int) -> int:
    return x * x


def _dies_once(marker: str) -> int:
    """Kill the worker process on the first attempt, as an out-of-memory kill would."""
    if not Path(marker).exists():
        Path(marker).write_text("died")
        os._exit(1)
    return os.getpid()


def test_a_local_cluster_runs_the_tasks_in_other_processes():
    with task_executor(2) as pool:
        futures = {pool.submit(_square, x): x for x in range(6)}
        assert {futures[f]: f.result() for f in as_completed(futures)} == {x: x * x for x in range(6)}
        assert pool.submit(os.getpid).result() != os.getpid()


def test_a_task_whose_worker_dies_is_retried(tmp_path):
    with task_executor(1) as pool:
        pid = pool.submit(_dies_once, str(tmp_path / "marker")).result(timeout=120)
    assert (tmp_path / "marker").read_text() == "died" and pid != os.getpid()


def test_tasks_go_to_a_running_scheduler_and_a_wrong_address_is_one_line():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        with task_executor(1, scheduler=cluster.scheduler_address) as pool:
            assert pool.submit(_square, 7).result() == 49
    with pytest.raises(InputError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        with task_executor(1, scheduler="tcp://127.0.0.1:9"):
            pass
