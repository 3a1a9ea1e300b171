"""Tests for the MLflow plumbing."""

from __future__ import annotations

import os
import subprocess
import sys


def test_processes_starting_together_on_a_new_store_share_one_experiment(tmp_path):
    # Without the creation lock the losers failed on MLflow's table creation and migrations.
    code = "from cellcontrast.experiments import tracking; print(tracking.setup('together'))"
    store, scratch = tmp_path / "store", tmp_path / "scratch"
    scratch.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{store}/mlflow.db", "TMPDIR": str(scratch)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-400:] for _, err in outs]
    assert len({out.strip() for out, _ in outs}) == 1
    assert sorted(os.listdir(store)) == ["mlflow.db"]  # no lock file beside the store
    assert os.listdir(scratch) == []  # nor in the temporary folder
