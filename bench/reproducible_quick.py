"""Does the pipeline give the same results twice? `make quick`'s steps from two clean checkouts
(two revisions, or the same one twice), then every output compared.

    python bench/reproducible_quick.py --work-dir /tmp/repro [--rev-a 61dc31f] [--rev-b HEAD]

Each checkout is a `git worktree` run with this repository's `.venv` and its own `src`
(PYTHONPATH). Compared: `quick/results.csv` row by row on every column but `run_id` (MLflow's
random id) and `train_seconds` (wall time), and the bytes of `report/table1.csv`,
`report/figure2.csv`, `report/metrics.json` and the annotated query's CSV. Prints one JSON
line; exit 1 when something differs.
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

ROOT = Path(__file__).resolve().parent.parent
VOLATILE = ("run_id", "train_seconds")
SAME_BYTES = ("quick/report/table1.csv", "quick/report/figure2.csv", "quick/report/metrics.json",
              "quick/query_annotated.csv")


def run_quick(rev: str, where: Path) -> float:
    if where.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)], check=False)
        shutil.rmtree(where, ignore_errors=True)
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    venv = ROOT / ".venv" / "bin"
    (where / ".venv").mkdir(exist_ok=True)
    (where / ".venv" / ".installed").touch()  # make's install stamp: the shared venv is installed
    env = {**os.environ, "PYTHONPATH": str(where / "src"), "PATH": f"{venv}:{os.environ['PATH']}",
           "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.perf_counter()
    with open(where / "quick.log", "w") as log:
        subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", "quick", f"BIN={venv}"],
                       cwd=where, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def compare(a: Path, b: Path) -> dict:
    import pandas as pd

    keys = ["setting", "seed", "base", "component"]
    ra = pd.read_csv(a / "quick/results.csv").sort_values(keys, ignore_index=True)
    rb = pd.read_csv(b / "quick/results.csv").sort_values(keys, ignore_index=True)
    columns = [c for c in ra.columns if c not in VOLATILE]
    same_shape = list(ra.columns) == list(rb.columns) and len(ra) == len(rb)
    differ = ((ra[columns] != rb[columns]) & ~(ra[columns].isna() & rb[columns].isna())).any(axis=1) \
        if same_shape else pd.Series([True])
    files = {name: (a / name).read_bytes() == (b / name).read_bytes() for name in SAME_BYTES}
    return {"rows": len(ra), "rows_differing": int(differ.sum()), "columns_compared": len(columns),
            "files_identical": files}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", required=True)
    p.add_argument("--rev-a", default="HEAD")
    p.add_argument("--rev-b", default="HEAD")
    args = p.parse_args(argv)
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seconds = {side: round(run_quick(rev, work / side), 1) for side, rev in (("a", args.rev_a), ("b", args.rev_b))}
    row = {"rev_a": args.rev_a, "rev_b": args.rev_b, "seconds": seconds, **compare(work / "a", work / "b")}
    print(json.dumps(row))
    return 0 if row["rows_differing"] == 0 and all(row["files_identical"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
