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


def test_one_standard_error_rule_prefers_the_simplest_chain_within_the_best_ones_error():
    runs = pd.DataFrame({"seed": [0, 0, 0, 1, 1, 1], "method": ["lr", "actinn", "scdae+mlp"] * 2,
                         "val_macro_f1": [0.90, 0.93, 0.94, 0.80, 0.86, 0.95],
                         "val_macro_f1_se": [0.03, 0.03, 0.05, 0.03, 0.03, 0.05]})
    prefer = ["lr", "actinn", "scdae+mlp"]
    assert choose_per_seed(runs, prefer=prefer)["method"].tolist() == ["scdae+mlp", "scdae+mlp"]
    # seed 0: lr is within 0.05 of the best; seed 1: lr (0.80) and actinn (0.86) are not within 0.05 of 0.95
    assert choose_per_seed(runs, prefer=prefer, one_se=True)["method"].tolist() == ["lr", "scdae+mlp"]
    no_se = runs.drop(columns="val_macro_f1_se")
    assert choose_per_seed(no_se, prefer=prefer, one_se=True)["method"].tolist() == ["scdae+mlp", "scdae+mlp"]


def test_one_standard_error_rule_reads_no_test_column():
    rng = np.random.default_rng(3)
    runs = _runs(rng).assign(val_macro_f1_se=0.05)
    chosen = choose_per_seed(runs, prefer=["lr", "actinn", "scdae+mlp"], one_se=True)
    shaken = runs.assign(test_macro_f1=rng.uniform(0, 1, len(runs)))
    assert choose_per_seed(shaken, prefer=["lr", "actinn", "scdae+mlp"], one_se=True)["method"].tolist() \
        == chosen["method"].tolist()


def test_macro_f1_standard_error_matches_a_plain_bootstrap():
    from sklearn.metrics import f1_score

    from cellcontrast.train.metrics import macro_f1_standard_error

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 80)
    pred = np.where(rng.random(80) < 0.8, y, rng.integers(0, 5, 80))
    draws = [f1_score(y[i], pred[i], labels=range(5), average="macro", zero_division=0)
             for i in (rng.integers(0, 80, 80) for _ in range(1000))]
    assert macro_f1_standard_error(y, pred, 5, n_boot=1000) == pytest.approx(np.std(draws), rel=0.15)
    assert macro_f1_standard_error(y, y, 5) == 0.0  # perfect predictions never move
    assert macro_f1_standard_error(y, pred, 5, seed=1) == macro_f1_standard_error(y, pred, 5, seed=1)
