"""The `cellcontrast` command line."""

from cellcontrast.cli.entry import main

__all__ = ["main"]
