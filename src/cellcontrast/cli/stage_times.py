"""How long each command of a pipeline run took: `make run` sets ``CELLCONTRAST_STAGE_TIMES``
to a CSV, every `cellcontrast` command that finishes appends its row (command, the stage it
served, wall seconds), and ``python -m cellcontrast.cli.stage_times FILE`` prints the table,
stage by stage, at the end of the run. Without the variable nothing is written.

The next slow stage shows where it happens, not only as a longer total.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pandas as pd

from cellcontrast.core.files import atomic_path

ENV = "CELLCONTRAST_STAGE_TIMES"
# The options that name what a command served (a setting, a seed, a file), in the row's stage.
_NAMING = ("--setting", "--seed", "--out", "--out-dir")


def stage_of(command: str, argv: list[str]) -> str:
    """``split default seed 3``-like: the command and the values of its naming options."""
    parts = [command]
    for option in _NAMING:
        if option in argv and argv.index(option) + 1 < len(argv):
            value = argv[argv.index(option) + 1]
            parts.append(Path(value).name if option.startswith("--out") else value)
    if "--tuning" in argv and "tuning" not in parts:
        parts.append("tuning")
    return " ".join(parts)


def record(command: str, argv: list[str], seconds: float, path: str | None = None) -> None:
    """Append one finished command's row to ``path`` (default: the file ``CELLCONTRAST_STAGE_TIMES``
    names; nothing without it), rewriting the file atomically."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    row = pd.DataFrame([{"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
                         "stage": stage_of(command, argv), "seconds": round(seconds, 1)}])
    target = Path(path)
    table = pd.concat([pd.read_csv(target), row], ignore_index=True) if target.exists() else row
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        table.to_csv(tmp, index=False)


def summary(path: str | Path) -> str:
    """Each command's total, the number of its runs and its share, then every stage, in run order."""
    table = pd.read_csv(path)
    total = table["seconds"].sum()
    by_command = table.groupby("command", sort=False)["seconds"].agg(["count", "sum"])
    lines = [f"stage times ({path}): {total:.0f} s in {len(table)} commands", "",
             "| command | runs | seconds | share |", "|---|---|---|---|"]
    lines += [f"| {name} | {int(row['count'])} | {row['sum']:.0f} | {row['sum'] / max(total, 1e-9):.0%} |"
              for name, row in by_command.iterrows()]
    lines += ["", "| stage | seconds |", "|---|---|"]
    lines += [f"| {row.stage} | {row.seconds:.1f} |" for row in table.itertuples()]
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - the Makefile's call
    if len(sys.argv) != 2 or not Path(sys.argv[1]).exists():
        print("usage: python -m cellcontrast.cli.stage_times STAGE_TIMES.csv (an existing file)", file=sys.stderr)
        sys.exit(2)
    print(summary(sys.argv[1]))
