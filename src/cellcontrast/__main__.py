"""`python -m cellcontrast`: the command line, for subprocesses that must use this interpreter.

Running `-m cellcontrast.cli.entry` instead warns (runpy finds the module already imported by
the `cellcontrast.cli` package) on every call.
"""

from cellcontrast.cli.entry import main

if __name__ == "__main__":
    raise SystemExit(main())
