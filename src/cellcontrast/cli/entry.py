"""`cellcontrast COMMAND ...`: parse, run the command, and turn a refusal into one line.

A bad input raises `InputError`; it is printed as one line and the exit code is 2. A bad
option is refused the same way (see `parser.OneLineParser`).
"""

from __future__ import annotations

import os
import sys
import time
import warnings

from cellcontrast.cli.commands import COMMANDS
from cellcontrast.cli.parser import build_parser
from cellcontrast.core.errors import InputError


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Library warnings (anndata, mlflow) are noise for a command-line user.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # Their UserWarnings too: a refused input must read as one line (anndata warns about the
    # duplicate gene names we then refuse; torch about the pickle we then refuse).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(anndata|torch|h5py|mlflow|optuna|scanpy)\b")
    # MLflow's INFO lines (creating the store's tables, a new experiment) are not the user's
    # business; read when mlflow is first imported, which the commands do lazily.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    started = time.perf_counter()
    try:
        COMMANDS[args.command](args)
        if os.environ.get("CELLCONTRAST_STAGE_TIMES"):  # `make run`: each stage's wall time (cli/stage_times.py)
            from cellcontrast.cli.stage_times import record

            record(args.command, list(sys.argv[1:] if argv is None else argv), time.perf_counter() - started)
    except InputError as err:
        print(f"cellcontrast {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cellcontrast {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
