"""Optuna search spaces: the defaults, how params.yaml's ``tune:`` section overrides them,
and how a trial draws its values.

What is searched (``DEFAULT_SEARCH_SPACE``; the paper tunes the contrastive components and
leaves the base models at their published recipes, so the base spaces are deliberately
small: two knobs each, around the published values):

- ``mlp``: temperature (log-uniform 0.02..1), hidden_dim {64, 128, 256}, out_dim
  {32, 64, 128}, lr (log-uniform 1e-4..1e-2);
- ``mls``: temperature, hidden_dim, lr (same ranges; hidden_dim also offers the recipe's own
  default when that is not in the list, e.g. -1, a linear h_k);
- component ``none``, i.e. the base model's own key sizes: ``lr`` (logistic regression):
  n_hvg {500, 1000, 2000} (its L-BFGS solver picks l2 on validation along ``l2_path``
  itself; with ``solver: adam``, add ``lr: {l2: [1.0e-5, 1.0e-1]}`` to the tune section).
  LR's own default, ``n_hvg: auto`` (2,000 HVGs or every gene, on validation: what
  `cellcontrast fit` uses), is not among them: without this study (LR on auto's choice,
  every gene of the 2,000-gene atlas) `make run`'s Data Scarce LR fell from 0.887 to 0.863
  top-1; a space whose values are all fixed
  skips the study; ``svm`` (the margin base, not in the paper's grid): LR's space; ``actinn``: lr (log-uniform
  1e-5..1e-3, around ACTINN's 1e-4) and l2 (log-uniform 5e-4..5e-2, around its 0.005);
  ``scdae``: dropout (uniform 0..0.7; the original drops 70%) and the classifier lr
  (log-uniform 1e-4..1e-2).

``search_space`` (params.yaml's ``tune:`` section) overrides it. Flat keys
(``temperature: [0.02, 1.0]``, ``max_epochs: 60``) apply to the component being tuned (and are
ignored where the component has no such parameter, e.g. out_dim for mls); a section named
after a model (``actinn: {lr: [1.0e-5, 1.0e-3]}``) applies to that model, base or component,
and wins over flat keys. A value is read as: a list of two numbers of which one is a float: a
range (log-uniform when low > 0, else uniform); any other list: a categorical choice; a dict
``{low, high[, log]}`` or ``{choices: [...]}``: explicit; anything else: a fixed value.
"""

from __future__ import annotations

import json
import math
import sys

from cellcontrast.core.errors import InputError
from cellcontrast.train.recipes import DEFAULT_PARAMS

DEFAULT_SEARCH_SPACE: dict[str, dict] = {
    "mlp": {"temperature": [0.02, 1.0], "hidden_dim": [64, 128, 256], "out_dim": [32, 64, 128],
            "lr": [1e-4, 1e-2]},
    "mls": {"temperature": [0.02, 1.0], "hidden_dim": [64, 128, 256], "lr": [1e-4, 1e-2]},
    "lr": {"n_hvg": [500, 1000, 2000]},
    "svm": {"n_hvg": [500, 1000, 2000]},
    "actinn": {"lr": [1e-5, 1e-3], "l2": [5e-4, 5e-2]},
    "scdae": {"dropout": {"low": 0.0, "high": 0.7}, "lr": [1e-4, 1e-2]},
}


# Keys of params.yaml's `tune:` section that configure tuning rather than the search space.
TUNE_CONFIG_KEYS = ("n_trials", "base_trials", "seed", "storage", "experiment")


_SPEC_KEYS = {"low", "high", "log", "choices"}


def search_space_of(tune_section: dict | None) -> dict:
    """The search-space entries of params.yaml's ``tune:`` section (its config keys left out)."""
    return {k: v for k, v in (tune_section or {}).items() if k not in TUNE_CONFIG_KEYS}


def _default_choices(model: str, key: str, choices: list) -> list:
    """``choices`` plus the recipe's own default for ``key`` when that is a number not among
    them (MLS's default hidden_dim -1, a linear h_k, is then always a candidate)."""
    default = DEFAULT_PARAMS.get(model, {}).get(key)
    if isinstance(default, int) and not isinstance(default, bool) and default not in choices:
        return [default, *choices]
    return choices


def _number(value):
    """int/float as is, a numeric string (YAML reads 1e-4 as a string) as float, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _parse_spec(model: str, key: str, value) -> tuple:
    """One search-space entry as ("float", low, high, log) | ("categorical", choices) | ("fixed", v)."""
    where = f"search space {model}.{key}"
    if isinstance(value, dict) and set(value) <= _SPEC_KEYS and value:
        if "choices" in value:
            if not isinstance(value["choices"], list | tuple) or not value["choices"]:
                raise InputError(f"{where}: choices must be a non-empty list, got {value['choices']!r}")
            return ("categorical", _choices(where, value["choices"]))
        if "low" not in value or "high" not in value:
            raise InputError(f"{where}: a range needs both low and high, got {value}")
        low, high = _number(value["low"]), _number(value["high"])
        log = bool(value.get("log", low is not None and low > 0))
        return _range(where, low, high, log, value)
    if isinstance(value, list | tuple):
        if not value:
            raise InputError(f"{where}: an empty list; give a range [low, high] or choices")
        numbers = [_number(v) for v in value]
        if len(value) == 2 and None not in numbers and any(isinstance(n, float) for n in numbers):
            low, high = float(numbers[0]), float(numbers[1])
            return _range(where, low, high, low > 0, value)
        return ("categorical", _choices(where, value))
    return ("fixed", value)


def _range(where: str, low, high, log: bool, raw) -> tuple:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise InputError(f"{where}: a range needs numbers low < high, got {raw}")
    if log and low <= 0:
        raise InputError(f"{where}: a log-scale range needs low > 0, got {raw}")
    return ("float", float(low), float(high), bool(log))


def _choices(where: str, values) -> list:
    choices = []
    for v in values:
        if v is not None and not isinstance(v, bool | int | float | str):
            raise InputError(f"{where}: choices must be numbers, strings or null, got {v!r}")
        n = _number(v) if isinstance(v, str) else None
        choices.append(n if n is not None else v)
    return choices


def _is_model_section(key: str, value) -> bool:
    return key in DEFAULT_PARAMS and isinstance(value, dict) and not (set(value) <= _SPEC_KEYS and value)


def resolve_search_space(base: str, component: str, search_space: dict | None = None) -> dict[str, tuple]:
    """The parsed search space of the model a study tunes (the component, or the base for
    component "none"): defaults, then flat keys (components only), then its own section."""
    model = base if component == "none" else component
    user = dict(search_space or {})
    if not isinstance(search_space or {}, dict):
        raise InputError("the search space must be a mapping of parameter names to ranges or choices")
    merged = dict(DEFAULT_SEARCH_SPACE[model])
    if model == "mls":
        merged["hidden_dim"] = _default_choices("mls", "hidden_dim", merged["hidden_dim"])
    component_keys = set(DEFAULT_PARAMS["mlp"]) | set(DEFAULT_PARAMS["mls"])
    for key, value in user.items():
        if key in TUNE_CONFIG_KEYS:
            continue
        if _is_model_section(key, value):
            unknown = set(value) - set(DEFAULT_PARAMS[key]) - {"head"}
            if unknown:
                raise InputError(f"search space section {key!r} has unknown parameters {sorted(unknown)}; "
                                 f"{key} has {sorted(DEFAULT_PARAMS[key])}")
            continue
        if key not in component_keys:
            print(f"warning: search space key {key!r} is not a parameter of mlp or mls; ignored",
                  file=sys.stderr)
            continue
        if component != "none" and key in DEFAULT_PARAMS[component]:
            merged[key] = value
    section = user.get(model)
    if _is_model_section(model, section):
        merged.update(section)
    return {key: _parse_spec(model, key, value) for key, value in merged.items()}


def searches(space: dict[str, tuple]) -> bool:
    """Whether a parsed space has anything to search (all fixed: a study would repeat one fit)."""
    return any(spec[0] != "fixed" for spec in space.values())


def suggest(trial, space: dict[str, tuple]) -> dict:
    """Values for one trial: searched entries from the trial, fixed ones as they are."""
    values = {}
    for key, spec in space.items():
        if spec[0] == "fixed":
            values[key] = spec[1]
        elif spec[0] == "float":
            values[key] = trial.suggest_float(key, spec[1], spec[2], log=spec[3])
        else:
            values[key] = trial.suggest_categorical(key, spec[1])
    return values


def describe_space(space: dict[str, tuple]) -> dict[str, str]:
    out = {}
    for key, spec in space.items():
        if spec[0] == "float":
            out[key] = f"{'log' if spec[3] else 'uniform'}[{spec[1]:g}, {spec[2]:g}]"
        elif spec[0] == "categorical":
            out[key] = f"choice{json.dumps(spec[1])}"
        else:
            out[key] = f"fixed {json.dumps(spec[1])}"
    return out
