"""Time `cellcontrast fit` on a reference: wall time and peak RSS of the command a user runs.

    python bench/bench_fit.py --reference data/atlas.h5ad --out-dir /tmp/fit-atlas [--chains lr,lr+mlp,scdae]

The issue's bar: the 90k-cell simulated atlas with the default chains within 10 minutes on
2 cores. Prints one JSON line and the chosen chain with its validation macro F1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_annotate import measure  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--label-key", default="cell_type")
    p.add_argument("--chains", default=None)
    args = p.parse_args(argv)
    out = Path(args.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{out / 'mlflow.db'}", "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "cellcontrast", "fit", "--reference", args.reference, "--label-key",
           args.label_key, "--out", str(out / "annotator.onnx"), *(["--chains", args.chains] if args.chains else [])]
    print("$ " + " ".join(cmd[2:]), flush=True)
    row = measure("fit", cmd, env=env)
    card = out / "annotator.card.md"
    row["chosen"] = next((line for line in card.read_text().splitlines() if "Chosen chain" in line), "") \
        if card.exists() else ""
    print(json.dumps(row))
    return 0 if row["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
