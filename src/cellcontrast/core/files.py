"""Atomic output: a file (or a set of files) appears whole under its final name, or not at all."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

# Signals that would end the process between two renames of a set of outputs; they are held
# (and delivered right after) while the renames run. SIGKILL cannot be held: its window is the
# few microseconds between two rename calls.
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def set_usual_mode(path: str | os.PathLike) -> None:
    """Give a file the usual mode, 0666 minus the umask, rather than mkstemp's 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _temporary_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder, so the rename is atomic (same filesystem); the suffix is kept, so that
    # writers that look at it (anndata, onnx) still work.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part" + path.suffix, dir=path.parent)
    os.close(fd)
    set_usual_mode(tmp)
    return Path(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    with atomic_paths(path) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Temporary paths beside each of `paths`, renamed onto them together if the block succeeds.

    The renames run back to back once every file is written, with SIGINT, SIGTERM and SIGHUP
    held meanwhile, and a failed rename takes back the ones before it: the set appears whole
    or not at all (only a SIGKILL landing between two rename calls could split it).
    """
    finals = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for final in finals:
            temps.append(_temporary_beside(final))
        yield tuple(temps)
        _rename_together(temps, finals)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Record SIGINT/SIGTERM/SIGHUP instead of acting on them, and re-send them at the end.

    Python handlers, not a signal mask: with other threads running (onnxruntime, tqdm), the
    kernel would hand a masked signal to one of them and end the process all the same. Only
    the main thread may set handlers; elsewhere nothing is held.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda sig, frame: caught.append(sig)) for sig in _HELD_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            os.kill(os.getpid(), sig)


def _rename_together(temps: list[Path], finals: list[Path]) -> None:
    done: list[Path] = []
    with _signals_held() if len(finals) > 1 else contextlib.nullcontext():
        try:
            for tmp, final in zip(temps, finals, strict=True):
                os.replace(tmp, final)
                done.append(final)
        except BaseException:
            for final in done:  # take the set back: none of it, rather than part of it
                final.unlink(missing_ok=True)
            raise
