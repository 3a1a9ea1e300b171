"""Load test of distributed tuning: two `cellcontrast tune` processes share one Optuna study.

    .venv/bin/python bench/bench_tune_workers.py [--trials 50] [--workers 2] [--out-dir /tmp/tune_load]

It simulates a small atlas (3,000 cells, 20 types, 200 genes), makes one Default split, then
starts the workers at once on one sqlite storage and one study (LR + MLP-CL, short
trainings). It prints each worker's wall time and peak RSS, then checks that nothing was lost:

* the study holds the target number of finished (COMPLETE or PRUNED) trials, at most one
  more per extra worker (a worker may start a trial before it sees the target reached);
* no trial is left RUNNING or FAILED, trial numbers run 0..n-1 without gaps;
* every finished trial has its nested MLflow run, FINISHED, and no MLflow run is left RUNNING.

Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PARAMS_YAML = """\
grid: {threads: 1}
model_params:
  lr: {epochs: 5}
tune:
  seed: 0
  hidden_dim: [16, 32, 64]
  out_dim: [8, 16]
  max_epochs: 30
  patience: null
"""


def make_split(out_dir: Path) -> Path:
    from cellcontrast.data.simulate import simulate_atlas
    from cellcontrast.data.splits import split_atlas_to_dir

    atlas = out_dir / "atlas.h5ad"
    simulate_atlas(n_cells=3000, n_types=20, n_genes=200, n_individuals=2, seed=1).write_h5ad(atlas)
    split = out_dir / "split"
    split_atlas_to_dir(atlas, "default", 0, split, settings={"settings": {"default": {"k": 10, "cap": 100}}})
    return split


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-dir", default="/tmp/cellcontrast_tune_load")
    args = p.parse_args(argv)

    out = Path(args.out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    split = make_split(out)
    params = out / "params.yaml"
    params.write_text(PARAMS_YAML)
    storage = f"sqlite:///{out}/optuna.db"
    tracking = f"sqlite:///{out}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cellcontrast", "tune", "--split-dir", str(split), "--base", "lr",
           "--component", "mlp", "--n-trials", str(args.trials), "--storage", storage,
           "--study-name", "load", "--params", str(params), "--out", str(out / "best.json")]

    t0 = time.perf_counter()
    logs = [open(out / f"worker{i}.log", "w") for i in range(args.workers)]  # noqa: SIM115
    procs = [subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    rows = []
    pending = {proc.pid: i for i, proc in enumerate(procs)}
    while pending:
        pid, status, usage = os.wait4(-1, 0)
        if pid in pending:
            rows.append((pending.pop(pid), os.waitstatus_to_exitcode(status), time.perf_counter() - t0,
                         usage.ru_maxrss / 1024))
    for log in logs:
        log.close()
    wall = time.perf_counter() - t0

    import mlflow
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="load", storage=storage)
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(t.state == s for t in trials) for s in TrialState}
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    client = mlflow.MlflowClient(tracking_uri=tracking)
    run_status = {}
    for t in finished:
        run_id = t.user_attrs.get("mlflow_run_id")
        run_status[t.number] = client.get_run(run_id).info.status if run_id else "MISSING"
    experiments = client.search_experiments()
    running_runs = client.search_runs([e.experiment_id for e in experiments], "attributes.status = 'RUNNING'")

    print(f"{args.workers} workers, one study, target {args.trials} trials, {os.cpu_count()} cpus")
    print(f"{'worker':>6} {'exit':>4} {'wall s':>8} {'peak RSS MiB':>13}")
    for i, rc, seconds, rss in sorted(rows):
        print(f"{i:>6} {rc:>4} {seconds:>8.1f} {rss:>13.0f}")
    by_worker: dict[str, int] = {}
    for t in finished:
        worker = str(t.user_attrs.get("worker", "?")).rsplit(":", 1)[-1]
        by_worker[worker] = by_worker.get(worker, 0) + 1
    print(f"wall {wall:.1f} s; trials by state {json.dumps({k: v for k, v in states.items() if v})}; "
          f"finished trials per worker pid {json.dumps(by_worker)}")

    checks = {
        "every worker exited 0": all(rc == 0 for _, rc, _, _ in rows),
        f"{args.trials}..{args.trials + args.workers - 1} finished trials":
            args.trials <= len(finished) <= args.trials + args.workers - 1,
        "no RUNNING or FAIL trial": states["RUNNING"] == 0 and states["FAIL"] == 0,
        "trial numbers without gaps": sorted(t.number for t in trials) == list(range(len(trials))),
        "every finished trial has a FINISHED MLflow run": all(s == "FINISHED" for s in run_status.values()),
        "no MLflow run left RUNNING": len(running_runs) == 0,
        "both workers ran trials": len(by_worker) == args.workers,
    }
    for name, ok in checks.items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
