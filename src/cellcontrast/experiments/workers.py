"""Worker processes for the grid and the tuning studies.

Each worker is a spawned process (torch and sqlite handles must not be shared with a forked
parent) that exits by itself when its parent is gone.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: a worker whose parent is gone (killed, even by SIGKILL) exits within
    half a second, instead of training on unseen (finishing runs while a restarted grid redoes
    them) and then waiting for ever on the dead parent's queue."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="cellcontrast-parent-watch", daemon=True).start()


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned processes that die with this one."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                               initializer=_die_with_parent, initargs=(os.getpid(),))
