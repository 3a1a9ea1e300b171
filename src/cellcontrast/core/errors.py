"""The one exception users see: a clear, one-line message (the CLI prints it and exits 2)."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator


class InputError(ValueError):
    """Bad input from the user (file, option, data).

    A ``ValueError``, so that Python callers can catch it as one; the command line prints the
    message alone and exits with code 2.
    """


def first_line(err: BaseException | str, limit: int | None = None) -> str:
    """The first non-empty line of an error's message, whitespace folded; its type name when
    the message is empty. ``limit`` cuts it to that many characters."""
    text = str(err).strip()
    line = next((ln for ln in text.splitlines() if ln.strip()), "") if text else ""
    line = " ".join(line.split()) or (type(err).__name__ if isinstance(err, BaseException) else "")
    return line[:limit] if limit else line


@contextlib.contextmanager
def notes_held() -> Iterator[None]:
    """Hold what the block prints on stderr (notes, warnings) until it succeeds: a refusal
    raised inside it is then the only line the user sees."""
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        yield
    sys.stderr.write(held.getvalue())
