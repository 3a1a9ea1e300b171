import numpy as np
import pandas as pd
import pytest

from cellcontrast.experiments.selection import choose_per_seed


def _runs(rng, seeds=5, chains=("lr", "actinn", "scdae+mlp")):
    return pd.DataFrame([{"seed": s, "method": m, "val_macro_f1": rng.uniform(0.5, 1.0),
                          "test_macro_f1": rng.uniform(0.5, 1.0)} for s in range(seeds) for m in chains])


def test_each_seed_is_chosen_on_its_own_validation_only():
    """A seed's test cells may sit in other seeds' validation sets: changing any other seed's
    validation figures (or any test figure) never changes a seed's choice."""
    rng = np.random.default_rng(0)
    runs = _runs(rng)
    chosen = choose_per_seed(runs).set_index("seed")["method"]
    for seed in range(5):
        own = runs[runs["seed"] == seed]
        assert chosen[seed] == own.loc[own["val_macro_f1"].idxmax(), "method"]
        shaken = runs.copy()
        others = shaken["seed"] != seed
        shaken.loc[others, "val_macro_f1"] = rng.uniform(0, 1, others.sum())
        shaken["test_macro_f1"] = rng.uniform(0, 1, len(shaken))
        assert choose_per_seed(shaken).set_index("seed")["method"][seed] == chosen[seed]


def test_the_mean_over_seeds_can_choose_otherwise():
    # seed 1's validation favours actinn strongly; per seed, seed 0 still gets its own best (lr)
    runs = pd.DataFrame({"seed": [0, 0, 1, 1], "method": ["lr", "actinn"] * 2,
                         "val_macro_f1": [0.90, 0.89, 0.50, 0.99]})
    assert runs.groupby("method")["val_macro_f1"].mean().idxmax() == "actinn"
    assert choose_per_seed(runs)["method"].tolist() == ["lr", "actinn"]


def test_a_test_metric_is_refused_and_unscored_runs_ignored():
    runs = pd.DataFrame({"seed": [0, 0], "method": ["lr", "mlp"], "val_macro_f1": [np.nan, 0.7],
                         "test_macro_f1": [0.9, 0.1]})
    assert choose_per_seed(runs)["method"].tolist() == ["mlp"]
    with pytest.raises(ValueError, match="validation"):
        choose_per_seed(runs, metric="test_macro_f1")


def test_ties_go_to_the_simplest_chain_named_first():
    runs = pd.DataFrame({"seed": [0, 0, 0, 1, 1], "method": ["actinn", "scdae+mlp", "lr", "actinn", "lr"],
                         "val_macro_f1": [1.0, 1.0, 1.0, 1.0, 0.99]})
    chosen = choose_per_seed(runs, prefer=["lr", "actinn", "scdae+mlp"])
    assert chosen["method"].tolist() == ["lr", "actinn"]  # seed 1: the better score wins over the order
    assert choose_per_seed(runs)["method"].tolist() == ["actinn", "actinn"]  # no order: the first row
