"""What Dask's nanny environment costs a grid task: one `cellcontrast train` of a base on a split,
timed with ``MALLOC_TRIM_THRESHOLD_=65536`` (the value a Dask nanny sets in its workers before
they start) and without it, and the variable as a worker of `task_executor` sees it.

glibc stops adapting its mmap threshold once that variable is set, so every allocation above
128 KiB (a 256 x 2,000 float batch is 2 MiB) is mapped, zero-filled and unmapped again at every
step. Run after `make run` (it needs the split and, when present, the tuned parameters):

    python bench/grid_worker_malloc.py --split-dir data/splits/default/seed0 --base scdae
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cellcontrast.core.engine import task_executor
from cellcontrast.core.params import load_params
from cellcontrast.experiments.grid import grid_config, merged_params, tuned_params


def _worker_environ() -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def _timed_train(split_dir: str, base: str, params_file: str, trim: str | None, out: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}
    env.update({"OMP_NUM_THREADS": "1", **({"MALLOC_TRIM_THRESHOLD_": trim} if trim else {})})
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("cellcontrast")), "train", "--split-dir", split_dir, "--base", base,
                    "--params", params_file, "--experiment", "bench-worker-malloc", "--out-dir", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split-dir", default="data/splits/default/seed0")
    parser.add_argument("--base", default="scdae")
    parser.add_argument("--params", default="params.yaml", help="the pipeline's params (model_params, tuned_dir)")
    args = parser.parse_args()
    cfg = grid_config(load_params(args.params))
    setting = json.loads((Path(args.split_dir) / "split.json").read_text())["setting"]
    params = merged_params(cfg["model_params"], tuned_params(cfg["tuned_dir"], setting, args.base))
    with task_executor(1) as pool:
        seen = pool.submit(_worker_environ).result()
    print(f"MALLOC_TRIM_THRESHOLD_ in a task_executor worker: {seen!r}")
    with tempfile.TemporaryDirectory() as tmp:
        params_file = Path(tmp) / "params.json"
        params_file.write_text(json.dumps(params))
        for label, trim in (("MALLOC_TRIM_THRESHOLD_=65536 (a Dask nanny's)", "65536"), ("unset", None)):
            seconds = _timed_train(args.split_dir, args.base, str(params_file), trim, Path(tmp) / "chain")
            print(f"{args.base} on {args.split_dir}, {label}: {seconds:.1f} s")


if __name__ == "__main__":
    main()
