"""Hyperparameter tuning with Optuna, on the VALIDATION split only.

One study tunes one chain (base x component) of one split. The objective is the validation
macro F1 of the final chain (``preprocess -> encoder -> component -> head``); the test part
of the split is never even opened (``_load_train_val`` reads train.h5ad and val.h5ad alone).

The search space: see ``search_space``.

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
of another live worker. A trial that never beat (its worker was killed between creating it
and the first beat) is failed once older than the grace period. Marking every RUNNING trial
failed on restart would not be safe with several workers. The MLflow run of such a trial is
closed as FAILED at the same time.

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
import torch
from mlflow.entities import Metric
from optuna.trial import TrialState
from tqdm import tqdm

from cellcontrast.core.errors import InputError
from cellcontrast.core.files import atomic_path
from cellcontrast.core.names import BASES, COMPONENTS, LINEAR_BASES
from cellcontrast.data.split_data import load_split_data
from cellcontrast.experiments import tracking
from cellcontrast.experiments.optuna_storage import (
    DEFAULT_STORAGE,
    fail_stale,
    open_storage,
    worker_id,
)
from cellcontrast.experiments.search_space import describe_space, resolve_search_space, suggest
from cellcontrast.nn.chain import predict_proba
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.chain import build_chain
from cellcontrast.train.component import fit_component
from cellcontrast.train.metrics import classification_metrics
from cellcontrast.train.recipes import resolve_params

PRUNER_STARTUP_TRIALS = 2
PRUNER_WARMUP_STEPS = 5
PRUNE_CHECK_EVERY = 5  # epochs between two pruning checks (each reads the whole study)
# The epoch-wise validation score that the pruner watches, per base (component none).
_BASE_HEAD_STAGE = {"lr": "lr", "actinn": "actinn", "scdae": "scdae_classifier"}


# ---------------------------------------------------------------- search space


# ---------------------------------------------------------------- data and storage


def _setup_tracking(experiment: str) -> str:

    for attempt in range(4):
        try:
            return tracking.setup(experiment)  # which holds the store's init lock
        except Exception:  # a tracking server busy or restarting: a few retries
            if attempt == 3:
                raise
            time.sleep(attempt + 1)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- the objective


class TrialLog:
    """The training ``log`` callback of one trial: keeps every epoch's values (logged to the
    trial's MLflow run at the end) and feeds the head stage's validation macro F1, best so
    far, to the pruner."""

    def __init__(self, trial, stage: str):
        self.trial, self.stage = trial, stage
        self.best = -math.inf
        self.history: list[tuple[str, int, dict]] = []

    def __call__(self, stage: str, epoch: int, values: dict) -> None:

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


# Trained bases by (data, base, resolved params, seed), newest last: a component study takes its
# frozen base from here when the base study of the same process trained it (its best trial),
# instead of training it again (one scDAE fit, ~80 s on Default). A few at most bounds memory.
_BASE_CACHE: dict = {}
_BASE_CACHE_SIZE = 4


def _base_key(data, base: str, params: dict | None, seed: int) -> tuple:
    x = data.X["train"]
    resolved = json.dumps(resolve_params(base, params), sort_keys=True, default=str)
    return x.shape, x.nnz, float(x.sum()), base, resolved, seed


def _remember_base(key: tuple, model) -> None:
    _BASE_CACHE.pop(key, None)
    _BASE_CACHE[key] = model
    while len(_BASE_CACHE) > _BASE_CACHE_SIZE:
        _BASE_CACHE.pop(next(iter(_BASE_CACHE)))


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

        if self.component == "none" or self.base_model is not None:
            return {}
        d = self.data
        # The mlp and mls studies of one base share the same frozen base: train it once per
        # process (same data, params and seed give the same model).
        key = _base_key(d, self.base, self.base_params, self.seed)
        if key not in _BASE_CACHE:
            _remember_base(key, fit_base(d.X["train"], d.y["train"], d.X["val"], d.y["val"], len(d.classes),
                                         self.base, self.base_params, self.seed, for_component=True))
        self.base_model = _BASE_CACHE[key]
        return {f"base_{k}": v for k, v in self._score(build_chain(self.base_model)).items()}

    def _score(self, chain) -> dict:

        proba = predict_proba(chain, self.data.X["val"])
        return {f"val_{k}": v for k, v in classification_metrics(self.data.y["val"], proba,
                                                                 len(self.data.classes)).items()}

    def params_for(self, values: dict) -> dict:
        return _params_from_trial(self.base, self.component, values, self.base_params,
                                  self.component_params)

    def _fit(self, params: dict, log: TrialLog):

        d, n_classes = self.data, len(self.data.classes)
        if self.component == "none":
            model = fit_base(d.X["train"], d.y["train"], d.X["val"], d.y["val"], n_classes, self.base,
                             params[self.base], self.seed, log)
            if self.base not in LINEAR_BASES:  # LR under a component is refitted on z-scored genes
                _remember_base(_base_key(d, self.base, params[self.base], self.seed), model)
            return build_chain(model)
        # Steps 2-4 on the shared, frozen base (the embedding pass is cheap next to training).
        h, head = fit_component(self.base_model, d.X["train"], d.y["train"], d.X["val"], d.y["val"],
                                n_classes, self.component, params[self.component], self.seed, log)
        return build_chain(self.base_model, h, head)

    def __call__(self, trial) -> float:


        values = suggest(trial, self.space)
        params = self.params_for(values)
        trial.set_user_attr("worker", worker_id())
        trial.set_user_attr("params", params)
        stage = _BASE_HEAD_STAGE[self.base] if self.component == "none" else f"{self.component}_head"
        log = TrialLog(trial, stage)
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


def _finished(study) -> list:

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
    split_dir = Path(split_dir)
    info = _check_study_inputs(split_dir, base, component, n_trials)
    setting = str(info["setting"])
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
    data = load_split_data(split_dir, parts=("train", "val"))
    if threads and threads > 0:
        torch.set_num_threads(int(threads))
    study = _open_study(storage_obj, study_name, seed, {"base": base, "component": component,
                                                        "setting": setting, "split_dir": str(split_dir)})
    tags = {"study_name": study_name, "base": base, "component": component, "setting": setting}
    _setup_tracking(experiment)
    mlflow.start_run(run_name=study_name, nested=mlflow.active_run() is not None,
                     tags={**tags, "worker": worker_id(), "tuning": "1", **tracking.parent_tags()})
    status = "FAILED"
    try:
        mlflow.log_params({"n_trials": n_trials, "sampler_seed": seed, "storage": storage or DEFAULT_STORAGE,
                           "split.dir": str(split_dir), "model_seed": int(info.get("seed", 0)),
                           **{f"space.{k}": v for k, v in describe_space(space).items()}})
        if len(_finished(study)) < n_trials:
            objective = _Objective(data, base, component, space, base_params, component_params,
                                   int(info.get("seed", 0)), tags)
            base_scores = objective.prepare()
            if base_scores:
                mlflow.log_metrics(base_scores)
            _run_trials(study, objective, n_trials, study_name, progress)
        fail_stale(study)
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            raise InputError(f"study {study_name!r} has no complete trial (every trial was pruned or failed); "
                             f"see the MLflow runs of experiment {experiment!r}")
        best = study.best_trial
        params = best.user_attrs.get("params") or _params_from_trial(base, component, best.params,
                                                                     base_params, component_params)
        result = TuneResult(study_name, float(best.value), best.number, params, len(_finished(study)), out)
        _record_best(result, best)
        status = "FINISHED"
        return result
    finally:
        mlflow.end_run(status)


def _check_study_inputs(split_dir: Path, base: str, component: str, n_trials) -> dict:
    """Refuse bad names, trial counts and split folders; returns the split's split.json."""
    if base not in BASES:
        raise InputError(f"unknown base model {base!r}; expected one of {', '.join(BASES)}")
    if component not in COMPONENTS:
        raise InputError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    if not isinstance(n_trials, int) or isinstance(n_trials, bool) or n_trials < 1:
        raise InputError(f"n_trials must be a whole number of at least 1, got {n_trials!r}")
    if not split_dir.is_dir():
        raise InputError(f"no such split folder: {split_dir}")
    if not (split_dir / "split.json").exists():
        raise InputError(f"{split_dir} is not a split folder (no split.json); make one with `cellcontrast split`")
    try:
        info = json.loads((split_dir / "split.json").read_text())
        str(info["setting"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f"{split_dir}/split.json is damaged; rebuild the split") from None
    return info


def _open_study(storage, study_name: str, seed: int, attrs: dict):
    """Create or resume the study, with its sampler seeded and stale trials failed."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own one line per trial instead
    study = optuna.create_study(
        storage=storage, study_name=study_name, direction="maximize", load_if_exists=True,
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS,
                                           n_warmup_steps=PRUNER_WARMUP_STEPS))
    # TPESampler(seed=seed) for a new study; a resumed one is seeded with seed + its number of
    # trials, as the same seed would replay the first trials' parameters. See _Sampler.
    study.sampler = _Sampler(seed=seed + len(study.get_trials(deepcopy=False)))
    try:  # what the study is about, for anyone browsing the storage
        for key, value in attrs.items():
            if study.user_attrs.get(key) != value:
                study.set_user_attr(key, value)
    except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError):
        pass  # another worker writing the same attributes at this moment
    fail_stale(study)  # trials of workers that died longer than the grace period ago
    return study


def _run_trials(study, objective, n_trials: int, study_name: str, progress: bool) -> None:
    """Run the trials the study still lacks, one progress line per finished trial."""
    done = len(_finished(study))
    bar = tqdm(total=n_trials, initial=min(done, n_trials), desc=study_name, unit="trial",
               file=sys.stderr, disable=not progress, dynamic_ncols=True)

    def report(study, trial) -> None:
        if trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL):
            bar.n = min(len(_finished(study)), n_trials)
            bar.refresh()
            tqdm.write(_summary_line(study_name, trial), file=sys.stderr)

    try:
        study.optimize(
            objective, n_trials=n_trials - done, gc_after_trial=False,
            callbacks=[optuna.study.MaxTrialsCallback(
                n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)), report],
            catch=(RuntimeError, ValueError, FloatingPointError))
    finally:
        bar.close()


def _record_best(result: TuneResult, best) -> None:
    """Write the best parameters to ``result.out`` and log them to the study's MLflow run."""
    with atomic_path(result.out) as tmp:
        tmp.write_text(json.dumps(result.params, indent=2) + "\n")
    mlflow.log_metrics({"best_val_macro_f1": result.best_value, "best_trial": best.number,
                        "n_finished_trials": result.n_finished})
    mlflow.log_params({f"best.{k}": v for k, v in tracking.flatten(result.params).items()})
    mlflow.set_tags({"best_trial": str(best.number), "best_worker": str(best.user_attrs.get("worker", "")),
                     "out": str(result.out)})


def _params_from_trial(base, component, values, base_params, component_params) -> dict:

    if component == "none":
        return {base: resolve_params(base, {**base_params, **values})}
    return {base: resolve_params(base, base_params), component: resolve_params(component, {**component_params, **values})}


