"""Stable short hashes: of parameters and settings (run identity), and of data files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def fingerprint(*parts) -> str:
    """A short, stable hash of JSON-able values (parameters, data hashes)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
