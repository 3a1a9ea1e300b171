"""Read params.yaml, the single home of every pipeline knob."""

from __future__ import annotations

from pathlib import Path

import yaml

from cellcontrast.core.errors import InputError


def load_params(path: str | Path = "params.yaml") -> dict:
    path = Path(path)
    if not path.exists():
        raise InputError(f"no params file {path}; run from the project folder or pass --params")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise InputError(f"{path} must hold a mapping of parameters")
    return params


def setting_params(params: dict, setting: str, batch_key: str | None = None) -> dict:
    """One setting of params.yaml with its defaults. A setting with a ``batch_key`` entry
    (null: given by ``--batch-key``) leaves one batch out (``heldout: True``); the others are
    random splits of the top-K types (paper section 4.1)."""
    settings = params.get("settings", {})
    if setting not in settings:
        raise InputError(f"unknown setting {setting!r}; params.yaml defines: {', '.join(settings) or '(none)'}")
    s = dict(settings[setting])
    if "batch_key" in s:
        s["batch_key"] = batch_key or s["batch_key"]
        if not s["batch_key"]:
            raise InputError(f"setting {setting!r} leaves one batch out: name the obs column with --batch-key")
        s.setdefault("min_cells", 10)
        s.setdefault("cap", None)
        s.setdefault("val_fraction", 0.1)
        s["heldout"] = True
        return s
    if batch_key:
        raise InputError(f"setting {setting!r} is a random split; --batch-key is for a setting that leaves "
                         "one batch out (one with batch_key in params.yaml, e.g. heldout)")
    s.setdefault("equalize", True)
    s.setdefault("fractions", [0.8, 0.1, 0.1])
    if "k" not in s or "cap" not in s:
        raise InputError(f"setting {setting!r} needs both k and cap in params.yaml")
    s["heldout"] = False
    return s
