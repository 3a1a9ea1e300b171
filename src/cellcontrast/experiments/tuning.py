"""Hyperparameter tuning with Optuna, on the VALIDATION split only.

One study tunes one chain (base x component) of one split. The objective is the validation
macro F1 of the final chain (``preprocess -> encoder -> component -> head``); the test part
of the split is never even opened (``_load_train_val`` reads train.h5ad and val.h5ad alone).

What is searched (``DEFAULT_SEARCH_SPACE``; the paper tunes the contrastive components and
leaves the base models at their published recipes, so the base spaces are deliberately
small: two knobs each, around the published values):

- ``mlp``: temperature (log-uniform 0.02..1), hidden_dim {64, 128, 256}, out_dim
  {32, 64, 128}, lr (log-uniform 1e-4..1e-2);
- ``mls``: temperature, hidden_dim, lr (same ranges; hidden_dim also offers the recipe's own
  default when that is not in the list, e.g. -1, a linear h_k);
- component ``none``, i.e. the base model's own key sizes: ``lr`` (logistic regression):
  n_hvg {500, 1000, 2000} (its L-BFGS solver picks l2 on validation along ``l2_path``
  itself; with ``solver: adam``, add ``lr: {l2: [1.0e-5, 1.0e-1]}`` to the tune section);
  ``actinn``: lr (log-uniform
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

For a component study the base model is trained once per process (``base_params`` or the
defaults, the split's seed), frozen, embedded once, and reused by every trial, as the paper's
procedure freezes it anyway. Every trial trains with the same model seed (the split's, as
``cellcontrast train`` does), so trials differ by their parameters alone.

Optuna: ``TPESampler(seed=seed)`` (a resumed study's process uses seed + the number of
trials already stored, so that it does not replay the first trials' parameters, and a process
that sees another worker's trial running reseeds at random, so that two workers started
together do not suggest the same parameters: one worker alone is reproducible);
``MedianPruner(n_startup_trials=2, n_warmup_steps=PRUNER_WARMUP_STEPS)`` on the head stage's
validation macro F1 (``{component}_head``; for component none ``lr``, ``actinn`` or
``scdae_classifier``), reported per epoch as the best so far (the value the trial would end
with if stopped there), and checked every ``PRUNE_CHECK_EVERY`` epochs after the warm-up (a
check reads the whole study from the storage).

Resume and concurrency. The study lives in an RDB storage (``sqlite:///optuna.db`` by
default, any SQLAlchemy URL, e.g. PostgreSQL, for many machines) and is created with
``load_if_exists=True``. ``n_trials`` is a target for the whole study: a process counts the
COMPLETE and PRUNED trials already stored, runs only the missing ones, and a
``MaxTrialsCallback`` stops every worker once the study has reached the target (two workers
finishing at once may overshoot by one trial each).

Killed processes. The storage runs Optuna's heartbeat (``heartbeat_interval`` 60 s,
``grace_period`` 180 s; environment variables ``CELLCONTRAST_TUNE_HEARTBEAT`` and
``CELLCONTRAST_TUNE_GRACE`` override them): a live worker refreshes its trial's heartbeat, so
only trials whose worker stopped beating for longer than the grace period are marked FAIL
(when a process opens the study, before each trial and at the end), never the running trial
of another live worker. Marking every RUNNING trial failed on restart would not be safe with
several workers. The MLflow run of such a trial is closed as FAILED at the same time.

Tracking. Each process opens one MLflow parent run for the study (name = study name, tags
study_name/base/component/setting/worker); each trial is a nested run with its parameters,
per-epoch curves, val macro F1/top-1/top-3 and state. At the end the parent logs the study's
best value, trial and parameters.

Output: the best trial's parameters in ``cellcontrast train --params`` format, fully resolved
(every parameter of the base and, for a component study, of the component), written
atomically to ``out`` (default ``models/tuned/{study_name}.json``).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from cellcontrast.core.errors import InputError

BASES = ("lr", "actinn", "scdae")
COMPONENTS = ("none", "mlp", "mls")

DEFAULT_SEARCH_SPACE: dict[str, dict] = {
    "mlp": {"temperature": [0.02, 1.0], "hidden_dim": [64, 128, 256], "out_dim": [32, 64, 128],
            "lr": [1e-4, 1e-2]},
    "mls": {"temperature": [0.02, 1.0], "hidden_dim": [64, 128, 256], "lr": [1e-4, 1e-2]},
    "lr": {"n_hvg": [500, 1000, 2000]},
    "actinn": {"lr": [1e-5, 1e-3], "l2": [5e-4, 5e-2]},
    "scdae": {"dropout": {"low": 0.0, "high": 0.7}, "lr": [1e-4, 1e-2]},
}


def _default_choices(model: str, key: str, choices: list) -> list:
    """``choices`` plus the recipe's own default for ``key`` when that is a number not among
    them (MLS's default hidden_dim -1, a linear h_k, is then always a candidate)."""
    from cellcontrast.train.training import DEFAULT_PARAMS

    default = DEFAULT_PARAMS.get(model, {}).get(key)
    if isinstance(default, int) and not isinstance(default, bool) and default not in choices:
        return [default, *choices]
    return choices


# Keys of params.yaml's `tune:` section that configure tuning rather than the search space.
TUNE_CONFIG_KEYS = ("n_trials", "base_trials", "seed", "storage", "experiment")
DEFAULT_STORAGE = "sqlite:///optuna.db"
PRUNER_STARTUP_TRIALS = 2
PRUNER_WARMUP_STEPS = 5
PRUNE_CHECK_EVERY = 5  # epochs between two pruning checks (each reads the whole study)
# The epoch-wise validation score that the pruner watches, per base (component none).
_BASE_HEAD_STAGE = {"lr": "lr", "actinn": "actinn", "scdae": "scdae_classifier"}
_SPEC_KEYS = {"low", "high", "log", "choices"}


def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat_interval, grace_period) in seconds, from the environment or the defaults."""
    try:
        interval = int(os.environ.get("CELLCONTRAST_TUNE_HEARTBEAT", "60"))
        grace = int(os.environ.get("CELLCONTRAST_TUNE_GRACE", str(3 * interval)))
    except ValueError:
        raise InputError("CELLCONTRAST_TUNE_HEARTBEAT and CELLCONTRAST_TUNE_GRACE must be whole seconds") from None
    if interval < 1 or grace < 1:
        raise InputError("CELLCONTRAST_TUNE_HEARTBEAT and CELLCONTRAST_TUNE_GRACE must be at least 1 second")
    return interval, grace


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# ---------------------------------------------------------------- search space


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
    from cellcontrast.train.training import DEFAULT_PARAMS

    return key in DEFAULT_PARAMS and isinstance(value, dict) and not (set(value) <= _SPEC_KEYS and value)


def resolve_search_space(base: str, component: str, search_space: dict | None = None) -> dict[str, tuple]:
    """The parsed search space of the model a study tunes (the component, or the base for
    component "none"): defaults, then flat keys (components only), then its own section."""
    from cellcontrast.train.training import DEFAULT_PARAMS

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


# ---------------------------------------------------------------- data and storage


def _load_train_val(split_dir: Path):
    """Train and validation parts of a split (test.h5ad is never opened), as SplitData."""
    from cellcontrast.experiments.cell import load_split_data

    return load_split_data(split_dir, parts=("train", "val"))


def open_storage(url: str | None = None):
    """An Optuna RDBStorage with the heartbeat on; a bad URL is an InputError."""
    import optuna
    import sqlalchemy
    from sqlalchemy.engine import make_url

    from cellcontrast.experiments import tracking

    url = url or DEFAULT_STORAGE
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):
        raise InputError(f"bad Optuna storage URL {url!r}; expected an RDB URL such as "
                         f"sqlite:///optuna.db or postgresql://user@host/db") from None
    engine_kwargs: dict = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            folder = Path(parsed.database).expanduser().resolve().parent
            if not folder.is_dir():
                raise InputError(f"Optuna storage {url!r}: folder {folder} does not exist")
        # Several workers share one sqlite file: wait for its lock instead of failing at once.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    interval, grace = heartbeat_settings()
    last: Exception | None = None
    for attempt in range(6):
        try:
            with warnings.catch_warnings(), tracking.store_init_lock(url):
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=grace,
                    heartbeat_stale_trial_callback=_close_stale_trial_run)
        except (ImportError, sqlalchemy.exc.NoSuchModuleError) as err:
            raise InputError(f"Optuna storage {url!r}: no database driver for it ({_first_line(err)})") from None
        except (sqlalchemy.exc.ArgumentError, TypeError) as err:
            raise InputError(f"bad Optuna storage URL {url!r}: {_first_line(err)}") from None
        except sqlalchemy.exc.SQLAlchemyError as err:
            # A server database busy, or two machines creating its tables at once: retry.
            last = err
            time.sleep(0.5 * (attempt + 1))
    raise InputError(f"cannot open Optuna storage {url!r}: {_first_line(last)}")


def _first_line(err) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _close_stale_trial_run(study, trial) -> None:
    """Heartbeat callback: a trial of a dead worker was marked FAIL; close its MLflow run."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        import mlflow

        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "state", "FAIL")
            client.set_tag(run_id, "failed_because", "worker stopped (heartbeat stale)")
            client.set_terminated(run_id, "FAILED")
    except Exception as err:  # tracking must not stop the study
        print(f"warning: could not close MLflow run {run_id} of stale trial {trial.number}: "
              f"{_first_line(err)}", file=sys.stderr)


def _fail_stale(study) -> None:
    # Known gap: Optuna only fails RUNNING trials that have a stale heartbeat; a worker killed
    # between creating a trial and its first beat leaves that trial RUNNING for good.
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _setup_tracking(experiment: str) -> str:
    from cellcontrast.experiments import tracking

    for attempt in range(4):
        try:
            return tracking.setup(experiment)  # which holds the store's init lock
        except Exception:  # a tracking server busy or restarting: a few retries
            if attempt == 3:
                raise
            time.sleep(attempt + 1)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the objective


class _TrialLog:
    """The training ``log`` callback of one trial: keeps every epoch's values (logged to the
    trial's MLflow run at the end) and feeds the head stage's validation macro F1, best so
    far, to the pruner."""

    def __init__(self, trial, stage: str):
        self.trial, self.stage = trial, stage
        self.best = -math.inf
        self.history: list[tuple[str, int, dict]] = []

    def __call__(self, stage: str, epoch: int, values: dict) -> None:
        import optuna

        self.history.append((stage, int(epoch), dict(values)))
        if stage != self.stage or values.get("val_macro_f1") is None:
            return
        self.best = max(self.best, float(values["val_macro_f1"]))
        self.trial.report(self.best, int(epoch))
        # should_prune reads every trial of the study: every PRUNE_CHECK_EVERY epochs is enough.
        if epoch >= PRUNER_WARMUP_STEPS and (epoch - PRUNER_WARMUP_STEPS) % PRUNE_CHECK_EVERY == 0 \
                and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {stage} epoch {epoch} (val macro F1 {self.best:.4f})")

    def log_to(self, run_id: str) -> None:
        import mlflow
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{stage}.{key}", float(value), now, epoch)
                   for stage, epoch, values in self.history for key, value in values.items()
                   if value is not None and math.isfinite(float(value))]
        client = mlflow.MlflowClient()
        for start in range(0, len(metrics), 500):
            client.log_batch(run_id, metrics=metrics[start:start + 500])


@dataclass
class TuneResult:
    study_name: str
    best_value: float
    best_trial: int
    params: dict
    n_finished: int
    out: Path


_BASE_CACHE: dict = {}


class _Objective:
    """Trains and scores one chain per trial; for a component study the frozen base model is
    trained once (``prepare``) and shared by every trial."""

    def __init__(self, data, base: str, component: str, space: dict, base_params: dict,
                 component_params: dict, model_seed: int, tags: dict):
        self.data, self.base, self.component, self.space = data, base, component, space
        self.base_params, self.component_params = base_params, component_params
        self.seed, self.tags = model_seed, tags
        self.base_model = None

    def prepare(self) -> dict:
        """Component studies: fit the base once (no pruning: it is shared by every trial)."""
        from cellcontrast.train.training import build_chain, fit_base

        if self.component == "none" or self.base_model is not None:
            return {}
        d = self.data
        # The mlp and mls studies of one base share the same frozen base: train it once per
        # process (same data, params and seed give the same model).
        key = (d.X["train"].shape, d.X["train"].nnz, float(d.X["train"].sum()), self.base,
               json.dumps(self.base_params, sort_keys=True, default=str), self.seed)
        if key not in _BASE_CACHE:
            _BASE_CACHE.clear()  # one base at a time is enough, and bounds memory
            _BASE_CACHE[key] = fit_base(d.X["train"], d.y["train"], d.X["val"], d.y["val"], len(d.classes),
                                        self.base, self.base_params, self.seed, for_component=True)
        self.base_model = _BASE_CACHE[key]
        return {f"base_{k}": v for k, v in self._score(build_chain(self.base_model)).items()}

    def _score(self, chain) -> dict:
        from cellcontrast.nn.chain import predict_proba
        from cellcontrast.train.metrics import classification_metrics

        proba = predict_proba(chain, self.data.X["val"])
        return {f"val_{k}": v for k, v in classification_metrics(self.data.y["val"], proba,
                                                                 len(self.data.classes)).items()}

    def params_for(self, values: dict) -> dict:
        return _params_from_trial(self.base, self.component, values, self.base_params,
                                  self.component_params)

    def _fit(self, params: dict, log: _TrialLog):
        from cellcontrast.train.training import build_chain, fit_base, fit_component

        d, n_classes = self.data, len(self.data.classes)
        if self.component == "none":
            model = fit_base(d.X["train"], d.y["train"], d.X["val"], d.y["val"], n_classes, self.base,
                             params[self.base], self.seed, log)
            return build_chain(model)
        # Steps 2-4 on the shared, frozen base (the embedding pass is cheap next to training).
        h, head = fit_component(self.base_model, d.X["train"], d.y["train"], d.X["val"], d.y["val"],
                                n_classes, self.component, params[self.component], self.seed, log)
        return build_chain(self.base_model, h, head)

    def __call__(self, trial) -> float:
        import mlflow
        import optuna
        import torch

        from cellcontrast.experiments import tracking

        values = suggest(trial, self.space)
        params = self.params_for(values)
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("params", params)
        stage = _BASE_HEAD_STAGE[self.base] if self.component == "none" else f"{self.component}_head"
        log = _TrialLog(trial, stage)
        run = mlflow.start_run(run_name=f"{self.tags['study_name']}-trial{trial.number}", nested=True,
                               tags={**self.tags, "trial": str(trial.number), "worker": worker_id()})
        run_id = run.info.run_id
        trial.set_user_attr("mlflow_run_id", run_id)
        status, state = "FAILED", "FAIL"
        try:
            mlflow.log_params(tracking.flatten(params))
            mlflow.log_params({f"trial.{k}": v for k, v in values.items()})
            started = time.time()
            chain = self._fit(params, log)
            scores = self._score(chain)
            scores["trial_seconds"] = time.time() - started
            mlflow.log_metrics(scores)
            for key in ("val_top1", "val_top3"):
                trial.set_user_attr(key, scores[key])
            status, state = "FINISHED", "COMPLETE"
            return float(scores["val_macro_f1"])
        except optuna.TrialPruned:
            status, state = "KILLED", "PRUNED"
            raise
        finally:
            torch.set_grad_enabled(True)
            try:
                log.log_to(run_id)
                mlflow.set_tag("state", state)
            finally:
                mlflow.end_run(status)


# ---------------------------------------------------------------- the study


def _sampler_class():
    import optuna
    from optuna.trial import TrialState

    class _Sampler(optuna.samplers.TPESampler):
        """``TPESampler(seed=seed)`` that draws from a fresh random seed once it sees another
        worker's trial running: workers started together with the same seed would otherwise
        suggest identical parameters, trial for trial. One worker stays reproducible."""

        _reseeded = False

        def before_trial(self, study, trial) -> None:
            if not self._reseeded:
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if any(t.number != trial.number for t in running):
                    self.reseed_rng()
                    self._reseeded = True
            super().before_trial(study, trial)

    return _Sampler


def _finished(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def _summary_line(study_name: str, trial) -> str:
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    return (f"{study_name} trial {trial.number} {trial.state.name.lower()}: val macro F1 {value} "
            f"{json.dumps(trial.params, sort_keys=True)}")


def tune(split_dir, base: str, component: str, n_trials: int, storage: str | None = None,
         study_name: str | None = None, out=None, search_space: dict | None = None,
         base_params: dict | None = None, experiment: str = "cellcontrast-tuning", seed: int = 0,
         threads: int = 1, progress: bool = True, component_params: dict | None = None) -> dict:
    """Tune one chain on a split's validation part; returns the best parameters, keyed by
    model name (``cellcontrast train --params`` format), and writes them as JSON to ``out``.

    ``n_trials`` is the number of COMPLETE or PRUNED trials the study should hold in total
    (see the module docstring). ``base_params``/``component_params``: fixed values under the
    search space. ``threads``: torch threads (0 keeps torch's default).
    """
    return run_study(split_dir, base, component, n_trials, storage, study_name, out, search_space,
                     base_params, experiment, seed, threads, progress, component_params).params


def run_study(split_dir, base: str, component: str, n_trials: int, storage: str | None = None,
              study_name: str | None = None, out=None, search_space: dict | None = None,
              base_params: dict | None = None, experiment: str = "cellcontrast-tuning", seed: int = 0,
              threads: int = 1, progress: bool = True, component_params: dict | None = None) -> TuneResult:
    """`tune`, returning the study's name, best value and trial as well (a ``TuneResult``)."""
    from cellcontrast.train.training import resolve_params

    if base not in BASES:
        raise InputError(f"unknown base model {base!r}; expected one of {', '.join(BASES)}")
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise InputError(f"n_trials must be a whole number of at least 1, got {n_trials!r}")
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise InputError(f"no such split folder: {split_dir}")
    if not (split_dir / "split.json").exists():
        raise InputError(f"{split_dir} is not a split folder (no split.json); make one with `cellcontrast split`")
    try:
        info = json.loads((split_dir / "split.json").read_text())
        setting = str(info["setting"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{split_dir}/split.json is damaged; rebuild the split") from None
    base_params, component_params = dict(base_params or {}), dict(component_params or {})
    for name, values in ((base, base_params), (component, component_params)):
        if name != "none":
            try:
                resolve_params(name, values)
            except ValueError as err:
                raise InputError(f"bad fixed parameters: {err}") from None
    space = resolve_search_space(base, component, search_space)
    study_name = study_name or f"{setting}-{base}-{component}"
    out = Path(out) if out else Path("models/tuned") / f"{study_name}.json"
    storage_obj = open_storage(storage)  # before the data: a bad URL fails fast
    # A damaged split fails before a study or an MLflow run is created.
    data = _load_train_val(split_dir)

    import mlflow
    import optuna
    import sqlalchemy
    import torch
    from optuna.trial import TrialState
    from tqdm import tqdm

    from cellcontrast.experiments import tracking
    from cellcontrast.core.files import atomic_path

    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    study = optuna.create_study(
        storage=storage_obj, study_name=study_name, direction="maximize", load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                           n_warmup_steps=PRUNER_WARMUP_STEPS))
    # TPESampler(seed=seed) for a new study; a resumed one is seeded with seed + its number of
    # trials, as the same seed would replay the first trials' parameters. See _Sampler.
    study.sampler = _sampler_class()(seed=seed + len(study.get_trials(deepcopy=False)))
    try:  # what the study is about, for anyone browsing the storage
        for key, value in (("base", base), ("component", component), ("setting", setting),
                           ("split_dir", str(split_dir))):
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        pass  # another worker writing the same attributes at this moment
    _fail_stale(study)  # trials of workers that died longer than the grace period ago

    tags = {"study_name": study_name, "base": base, "component": component, "setting": setting}
    _setup_tracking(experiment)
    mlflow.start_run(run_name=study_name, nested=mlflow.active_run() is not None,
                     tags={**tags, "worker": worker_id(), "tuning": "1", **tracking.parent_tags()})
    status = "FAILED"
    try:
        mlflow.log_params({"n_trials": n_trials, "sampler_seed": seed, "storage": storage or DEFAULT_STORAGE,
                           "split.dir": str(split_dir), "model_seed": int(info.get("seed", 0)),
                           **{f"space.{k}": v for k, v in describe_space(space).items()}})
        done = len(_finished(study))
        remaining = n_trials - done
        if remaining > 0:
            objective = _Objective(data, base, component, space, base_params, component_params,
                                   int(info.get("seed", 0)), tags)
            base_scores = objective.prepare()
            if base_scores:
                mlflow.log_metrics(base_scores)
            bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=study_name, unit="trial",
                       file=sys.stderr, disable=not progress, dynamic_ncols=True)

            def report(study, trial) -> None:
                if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
                    bar.n = min(len(_finished(study)), n_trials)
                    bar.refresh()
                    tqdm.write(_summary_line(study_name, trial), file=sys.stderr)

            try:
                study.optimize(
                    objective, n_trials=remaining, gc_after_trial=False,
                    callbacks=[optuna.study.MaxTrialsCallback(
                        n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)), report],
                    catch=(RuntimeError, ValueError, FloatingPointError))
            finally:
                bar.close()
        _fail_stale(study)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise InputError(f"study {study_name!r} has no complete trial (every trial was pruned or failed); "
                             f"see the MLflow runs of experiment {experiment!r}")
        best = study.best_trial
        params = best.user_attrs.get("params") or _params_from_trial(base, component, best.params,
                                                                     base_params, component_params)
        with atomic_path(out) as tmp:
            tmp.write_text(json.dumps(params, indent=2) + "\n")
        n_finished = len(_finished(study))
        mlflow.log_metrics({"best_val_macro_f1": float(best.value), "best_trial": best.number,
                            "n_finished_trials": n_finished})
        mlflow.log_params({f"best.{k}": v for k, v in tracking.flatten(params).items()})
        mlflow.set_tags({"best_trial": str(best.number), "best_worker": str(best.user_attrs.get("worker", "")),
                         "out": str(out)})
        status = "FINISHED"
        return TuneResult(study_name, float(best.value), best.number, params, n_finished, out)
    finally:
        mlflow.end_run(status)


def _params_from_trial(base, component, values, base_params, component_params) -> dict:
    from cellcontrast.train.training import resolve_params

    if component == "none":
        return {base: resolve_params(base, {**base_params, **values})}
    return {base: resolve_params(base, base_params), component: resolve_params(component, {**component_params, **values})}


def tune_from_cli(args) -> None:
    """`cellcontrast tune`: the search space from params.yaml's `tune:` section (if the file is
    there), fixed recipe overrides from its `model_params:`; prints one JSON line."""
    from cellcontrast.core.params import load_params

    params: dict = {}
    if args.params:
        path = Path(args.params)
        if path.exists():
            params = load_params(path)
        elif args.params != "params.yaml":  # the default may be absent: then the built-in space
            raise InputError(f"no params file {path}")
    tcfg = params.get("tune") or {}
    if not isinstance(tcfg, dict):
        raise InputError(f"{args.params}: `tune` must be a mapping")
    model_params = params.get("model_params") or {}
    space = {k: v for k, v in tcfg.items() if k not in TUNE_CONFIG_KEYS}
    threads = int((params.get("grid") or {}).get("threads") or 0)
    try:
        seed = int(tcfg.get("seed", 0))
    except (TypeError, ValueError):
        raise InputError(f"{args.params}: tune.seed must be a whole number") from None
    result = run_study(
        args.split_dir, args.base, args.component, args.n_trials, storage=args.storage or tcfg.get("storage"),
        study_name=args.study_name, out=args.out, search_space=space,
        base_params=model_params.get(args.base), experiment=args.experiment, seed=seed, threads=threads,
        progress=True,
        component_params=model_params.get(args.component) if args.component != "none" else None)
    print(json.dumps({"study": result.study_name, "best_value": round(result.best_value, 6),
                      "best_trial": result.best_trial, "n_finished_trials": result.n_finished,
                      "out": str(result.out), "params": result.params}), flush=True)
