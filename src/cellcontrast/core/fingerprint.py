"""Stable short hashes: of parameters and settings (run identity), of data files, and of the
source that trains a model (so that a run recorded by other code is not taken for this one's)."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
# What turns a split and parameters into a chain and its logged metrics: reading the data, the
# networks, their training, and the grid cell that calibrates, scores and logs.
TRAINING_CODE = ("data", "nn", "train", "experiments/cell.py")


def fingerprint(*parts) -> str:
    """A short, stable hash of JSON-able values (parameters, data hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@functools.cache
def code_digest(*relpaths: str) -> str:
    """A short hash of the package's source files under ``relpaths`` (files or subpackages,
    relative to the package). A grid resumed after any of them changed trains again instead of
    reusing runs that the old code trained: equal parameters and data no longer mean an equal
    model once the training code moved."""
    digest = hashlib.sha256()
    for rel in relpaths:
        target = PACKAGE_ROOT / rel
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target]
        for path in files:
            digest.update(path.relative_to(PACKAGE_ROOT).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
