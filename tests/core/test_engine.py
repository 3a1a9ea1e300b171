"""The execution engine: tasks on dask.distributed, a local cluster or a running one."""

import os
import time
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


def _malloc_environ() -> tuple:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")


def test_local_workers_start_without_the_nannys_malloc_trim_threshold():
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in its workers, which froze glibc's mmap
    threshold and made every training step map and unmap its tensors (one scDAE fit 119 s
    against 82 s); the nanny's other variables (one OpenMP thread) stay."""
    with task_executor(1) as pool:
        assert pool.submit(_malloc_environ).result() == (None, os.environ.get("OMP_NUM_THREADS", "1"))


def test_a_task_carrying_its_data_raises_no_large_graph_warning():
    """A fold's reference travels with its task; Dask would warn about it above 10 MB."""
    import warnings

    with task_executor(1) as pool, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pool.submit(len, b"x" * 20_000_000).result() == 20_000_000
    assert not [w for w in caught if "large graph" in str(w.message)]


def test_two_local_clusters_at_once_start_without_a_port_warning():
    """Two benchmarks side by side each start a cluster: the second's HTTP server takes another
    port on 127.0.0.1 and says nothing (a dashboard warning would mean nothing to a user)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with task_executor(1) as first, task_executor(1) as second:
            assert first.submit(_square, 3).result() == second.submit(_square, 3).result() == 9
    assert not [w for w in caught if "already in use" in str(w.message)]


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


def _affinity() -> tuple[int, list[list[int]]]:
    """This process's id and the cores each of its threads may run on (after a pause, so that
    tasks submitted together spread over the workers)."""
    time.sleep(0.3)
    return os.getpid(), [sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_pinned_local_workers_each_hold_a_core_of_their_own():
    with task_executor(2, pin=True) as pool:
        found = dict(f.result() for f in [pool.submit(_affinity) for _ in range(6)])
    assert len(found) == 2  # both workers answered
    cores = [threads[0] for threads in found.values()]
    assert all(len(c) == 1 for c in cores) and cores[0] != cores[1]
    assert all(t == cores[i] for i, threads in enumerate(found.values()) for t in threads)  # every thread
    with task_executor(1) as pool:  # not asked: the worker may run anywhere
        _, threads = pool.submit(_affinity).result()
    assert all(t == sorted(os.sched_getaffinity(0)) for t in threads)
