"""Issue 7, interrupted runs: SIGKILL a real `cellcontrast` process mid-way, then look.

- `annotate` killed mid-way leaves no output file, no temporary file, and the query as it was.
- the grid killed after its first cell finishes, then started again, finishes the remaining
  cells once each without redoing the finished one; the run the killed process left RUNNING
  is marked KILLED, never FINISHED, and the killed grid's worker does not train on.
(Killing a tuning study is tests/test_tuning.py `test_killed_worker_resumes_without_redoing_trials`.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL and /proc")


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group `pgid`."""
    alive = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields: state, ppid, pgrp, ...
            alive.append(int(entry.name))
    return alive


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group this test started."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------ annotate


@pytest.fixture(scope="module")
def big_query(small_atlas, tmp_path_factory):
    """200,000 cells resampled from the small atlas, gzip-compressed: a few seconds to annotate
    with --batch-size 64. The first 30 genes are renamed to the test model's genes."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    import tiny_onnx

    root = tmp_path_factory.mktemp("interrupt_annotate")
    model = tiny_onnx.build_model(root / "tiny.onnx")
    rows = np.random.default_rng(0).integers(0, small_atlas.n_obs, 200_000)
    genes = list(tiny_onnx.MODEL_GENES) + small_atlas.var_names[30:].tolist()
    obs = pd.DataFrame({"cell_type": small_atlas.obs["cell_type"].to_numpy()[rows]},
                       index=[f"q{i}" for i in range(rows.size)])
    query = root / "query.h5ad"
    ad.AnnData(X=small_atlas.X[rows], obs=obs, var=pd.DataFrame(index=genes)).write_h5ad(query, compression="gzip")
    return model, query


def test_annotate_killed_midway_leaves_no_output_and_the_query_untouched(big_query, tmp_path):
    model, query = big_query
    before = _sha256(query)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "annotated.h5ad"
    cmd = [sys.executable, "-m", "cellcontrast", "annotate", str(model), str(query), "--out", str(out),
           "--csv", str(out_dir / "annotated.csv"), "--batch-size", "64"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        line = proc.stdout.readline()  # printed once the model is loaded and genes aligned
        assert "found 30 of 30 model genes" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        time.sleep(0.5)  # well into the 200,000 cells
        assert proc.poll() is None, "annotate finished before it could be killed; make the query bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _kill_group(proc.pid)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in out_dir.iterdir()) == []  # no output, no CSV, no .annotated.h5ad.*.part
    assert _sha256(query) == before  # the input is untouched


# ------------------------------------------------------------------ the grid

GRID_PARAMS = """\
settings:
  default: {k: 8, cap: 60}
seeds: [0]
grid:
  settings: [default]
  bases: [lr]
  components: [none, mlp, mls]
  workers: 1
  threads: 1
  experiment: killgrid
  split_root: splits
  tuned_dir: tuned
  models_dir: models
  results: results.csv
model_params:
  lr: {epochs: 5}
  mlp: {max_epochs: 100, patience: null}
  mls: {max_epochs: 20, patience: null}
"""


def _grid_runs(db: Path, attempts: int = 1) -> list[tuple[str, str, str]]:
    """(run id, status, grid cell) of every run in the MLflow sqlite store.

    Opened read-write: a process killed inside a write leaves a hot journal, which SQLite
    must roll back before anyone can read, and a read-only connection cannot (it raised,
    and this returned nothing). ``attempts`` > 1: retry a busy store, then raise."""
    if not db.exists():
        return []
    for attempt in range(attempts):
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=5)) as con:
                return con.execute(
                    "select r.run_uuid, r.status, t.value from runs r join tags t "
                    "on t.run_uuid = r.run_uuid and t.key = 'grid_cell'").fetchall()
        except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
            if attempt == attempts - 1 and attempts > 1:
                raise
            time.sleep(0.2)
    return []


def test_grid_killed_after_first_cell_resumes_without_redoing_it(tiny_split, tmp_path):
    shutil.copytree(tiny_split, tmp_path / "splits" / "default" / "seed0")
    (tmp_path / "params.yaml").write_text(GRID_PARAMS)
    db = tmp_path / "mlflow.db"
    env = _env(MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    cmd = [sys.executable, "-m", "cellcontrast", "grid", "--params", "params.yaml"]

    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    finished_before: dict[str, str] = {}
    running_at_kill: list[str] = []
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            runs = _grid_runs(db)
            finished = {cell: rid for rid, status, cell in runs if status == "FINISHED"}
            running = [rid for rid, status, _ in runs if status == "RUNNING"]
            if finished and running:  # the first cell is done, the next one is training
                finished_before, running_at_kill = finished, running
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the grid ended before it could be killed: " + proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # the grid's main process only, as `kill -9 PID` does
        proc.wait(timeout=30)
        # Its worker notices and exits within a second, instead of training on unseen.
        deadline = time.time() + 15
        while _group_alive(proc.pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _group_alive(proc.pid), "the killed grid left worker processes running"
    finally:
        _kill_group(proc.pid)
        proc.stderr.close()
    assert list(finished_before) == ["default/seed0/lr/none"]
    assert len(running_at_kill) == 1
    left = {rid: status for rid, status, _ in _grid_runs(db, attempts=25)}
    assert left[running_at_kill[0]] == "RUNNING"  # what SIGKILL leaves: nobody closed it
    assert not (tmp_path / "results.csv").exists()

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "skipped (already finished)" in again.stderr

    runs = _grid_runs(db, attempts=25)
    by_cell: dict[str, list[str]] = {}
    for rid, status, cell in runs:
        if status == "FINISHED":
            by_cell.setdefault(cell, []).append(rid)
    cells = [f"default/seed0/lr/{c}" for c in ("none", "mlp", "mls")]
    assert sorted(by_cell) == sorted(cells)
    assert all(len(ids) == 1 for ids in by_cell.values()), by_cell  # each cell finished exactly once
    for cell, rid in finished_before.items():
        assert by_cell[cell] == [rid]  # the finished cell was not redone
    status = {rid: s for rid, s, _ in runs}
    assert status[running_at_kill[0]] == "KILLED"  # closed by the restart, not shown as finished
    assert not [rid for rid, s, _ in runs if s == "RUNNING"]
    assert len(runs) == len(cells) + 1  # the three finished runs and the killed one, nothing else
    table = pd.read_csv(tmp_path / "results.csv")
    assert sorted(table["run_id"]) == sorted(rid for ids in by_cell.values() for rid in ids)
