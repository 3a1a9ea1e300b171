"""Tests for the pipeline's orchestration helpers."""

from __future__ import annotations

import copy

import pytest

from cellcontrast.experiments.setting_tuning import tuning_study_name
from cellcontrast.train import recipes as training

SPLIT = {"setting": "default", "seed": 0, "classes": ["a", "b"],
         "source": {"path": "data/atlas.h5ad", "sha256": "0" * 64, "label_key": "cell_type"}}
SPACE = {"temperature": [0.05, 0.5]}


def name(split=SPLIT, space=SPACE, model_params=None, tuned=None, n_trials=4, seed=0,
         base="lr", component="mlp"):
    return tuning_study_name(base, component, split, space, model_params or {}, tuned or {},
                             n_trials, seed)


def test_study_name_is_stable_and_readable():
    assert name() == name()
    assert name().startswith("default-lr-mlp-")


def other_atlas():
    split = copy.deepcopy(SPLIT)
    split["source"]["sha256"] = "1" * 64
    return {"split": split}


def other_recipe(monkeypatch):
    recipe = copy.deepcopy(training.DEFAULT_PARAMS)
    recipe["lr"]["max_iter"] = recipe["lr"].get("max_iter", 100) + 1
    monkeypatch.setattr(training, "DEFAULT_PARAMS", recipe)
    return {}


def other_training_code(monkeypatch):
    from cellcontrast.experiments import setting_tuning
    monkeypatch.setattr(setting_tuning, "code_digest", lambda *paths: "other-code")
    return {}


@pytest.mark.parametrize("change", [
    lambda mp: other_atlas(),
    lambda mp: {"split": {**SPLIT, "seed": 1}},
    lambda mp: {"space": {"temperature": [0.05, 0.9]}},
    lambda mp: {"model_params": {"mlp": {"hidden": 64}}},
    lambda mp: {"tuned": {"lr": {"n_hvg": 500}}},
    lambda mp: {"n_trials": 8},
    lambda mp: {"seed": 1},
    other_recipe,
    other_training_code,
], ids=["atlas", "split-seed", "space", "fixed-params", "tuned-base", "trials", "sampler-seed", "recipe", "code"])
def test_study_name_changes_with_what_the_trials_measured(monkeypatch, change):
    before = name()
    # a resumed study with the old trials would return their stale best without a new trial
    assert name(**change(monkeypatch)) != before


def test_grid_tasks_start_with_the_longest(tmp_path):
    """Longest first, by base and training cells: a long task started last would leave one
    worker waiting on it while the other is idle."""
    import json

    from cellcontrast.experiments.grid import grid_tasks

    for setting, n_train in (("default", 10000), ("scarce", 2400)):
        for seed in (0, 1):
            split = tmp_path / setting / f"seed{seed}"
            split.mkdir(parents=True)
            (split / "split.json").write_text(json.dumps({"setting": setting, "n_cells": {"train": n_train}}))
    cfg = {"settings": ["default", "scarce"], "seeds": [0, 1], "bases": ["lr", "actinn", "scdae"],
           "components": ["none"], "split_root": str(tmp_path), "tuned_dir": str(tmp_path / "tuned"),
           "models_dir": str(tmp_path / "models"), "experiment": "x", "threads": 1, "model_params": {}}
    order = [(t["split_dir"].split("/")[-2], t["base"]) for t in grid_tasks(cfg)]
    assert order == [("default", "scdae")] * 2 + [("default", "lr")] * 2 + [("scarce", "scdae")] * 2 + \
        [("default", "actinn")] * 2 + [("scarce", "lr")] * 2 + [("scarce", "actinn")] * 2
