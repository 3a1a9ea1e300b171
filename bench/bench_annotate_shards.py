"""`cellcontrast annotate 'shards/*.h5ad' --out-dir` with 1 and with 2 workers: wall time,
cells/s and each worker's peak RSS, on a compute-bound chain (scDAE + MLP-CL, 2,000 genes).

    python bench/bench_annotate_shards.py --atlas data/atlas.h5ad --work-dir /tmp/shards \
        [--shards 8 --cells 250000 --workers 1,2]

1. Trains the chain on 20,000 atlas cells with small budgets (its accuracy is not the point;
   its cost per cell is: a 2,000 -> 1,000 -> 500 -> 125 encoder, then the MLP and the head)
   and exports it, unless ``--model`` names one.
2. Builds one shard of ``--cells`` cells resampled from the atlas (gzip CSR, as
   bench_annotate.py does) and copies it to ``--shards`` files: same content, own files.
3. For each worker count, runs the command a user runs with ``--threads 1`` (one onnxruntime
   thread per worker; one worker runs in the command's own process, no Dask) and prints one
   JSON line: wall time, CPU time (cores busy = CPU / wall), cells/s, speed-up over the first
   run, the peak RSS of each worker. A single worker still inflates the gzip chunks on a thread
   beside the model, so unpinned it already keeps more than one core busy; ``--pin`` (default)
   first runs it confined to one core (``taskset -c 0``), the baseline of one worker, one core.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_annotate import measure  # noqa: E402

TRAIN = """
import anndata, cellcontrast as cc, numpy as np
a = anndata.read_h5ad({atlas!r})
rows = np.sort(np.random.default_rng(0).choice(a.n_obs, 20000, replace=False))
chain = cc.fit(a[rows].copy(), "cell_type", base="scdae", component="mlp",
               params={{"scdae": {{"ae_epochs": 1, "classifier_epochs": 2, "finetune_epochs": 0}},
                       "mlp": {{"max_epochs": 2}}}})
chain.export({out!r})
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--atlas", required=True)
    p.add_argument("--work-dir", required=True)
    p.add_argument("--model", default=None, help="an exported .onnx (default: train the scDAE + MLP chain)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--cells", type=int, default=250_000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="skip the one-core run of one worker")
    args = p.parse_args(argv)
    work = Path(args.work_dir).resolve()
    (work / "shards").mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else work / "scdae_mlp.onnx"
    if not model.exists():
        subprocess.run([sys.executable, "-c", TRAIN.format(atlas=args.atlas, out=str(model))], check=True)
    first = work / "shards" / "shard0.h5ad"
    if not first.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_annotate.py")), "--atlas", args.atlas,
                        "--cells", str(args.cells), "--out", str(first)], check=True)
    for i in range(1, args.shards):
        if not (work / "shards" / f"shard{i}.h5ad").exists():
            shutil.copyfile(first, work / "shards" / f"shard{i}.h5ad")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    base = None
    runs = [(int(w), False) for w in args.workers.split(",")]
    if args.pin and shutil.which("taskset"):
        runs.insert(0, (1, True))
    for workers, pinned in runs:
        out = work / f"out_{workers}{'_pinned' if pinned else ''}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "cellcontrast", "annotate", str(model), str(work / "shards" / "*.h5ad"),
               "--out-dir", str(out), "--workers", str(workers), "--threads", "1"]
        name = f"{workers} worker(s)" + (", one core (taskset -c 0)" if pinned else "")
        row = measure(name, (["taskset", "-c", "0"] if pinned else []) + cmd, env=env)
        if row["rc"] == 0:
            import csv

            with open(out / "summary.csv") as f:
                summary = list(csv.DictReader(f))
            cells = sum(int(r["n_cells"]) for r in summary)
            peaks: dict[str, float] = {}
            for r in summary:
                peaks[r["worker_pid"]] = max(peaks.get(r["worker_pid"], 0.0), float(r["worker_peak_rss_mib"]))
            base = base or row["wall_s"]
            row.update(cells=cells, cells_per_s=round(cells / row["wall_s"]), speedup=round(base / row["wall_s"], 2),
                       cores_busy=round(row["cpu_s"] / row["wall_s"], 2),
                       worker_peak_rss_mib=sorted(peaks.values()))
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
