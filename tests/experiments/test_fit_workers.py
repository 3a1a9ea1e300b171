"""`fit --workers` / `--scheduler`: the validation folds (or, with one validation part, the
bases) trained at once on a Dask cluster give the annotator one process gives."""

from __future__ import annotations

import numpy as np
import pytest

import cellcontrast as cc
from cellcontrast.data.simulate import simulate_atlas

FAST = {"lr": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]}, "svm": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]}}


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tasks take the submitting process's torch threads; one keeps two workers on two cores
    from oversubscribing them (the equality holds at any count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference():
    return simulate_atlas(n_cells=700, n_types=5, n_genes=100, n_individuals=3, seed=3)


def test_folds_on_a_running_scheduler_give_the_annotator_of_one_process(reference):
    from distributed import LocalCluster

    kw = {"chains": "lr,svm", "params": FAST, "experiment": None, "batch_key": "individual", "ensemble": False}
    here = cc.fit_annotator(reference, "cell_type", **kw)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None) as cluster:
        spread = cc.fit_annotator(reference, "cell_type", scheduler=cluster.scheduler_address, **kw)
    assert spread.chosen == here.chosen
    np.testing.assert_allclose(spread.fold_scores["val_macro_f1"], here.fold_scores["val_macro_f1"], atol=1e-9)
    np.testing.assert_allclose(spread.chain.predict_proba(reference[:200]), here.chain.predict_proba(reference[:200]),
                               atol=1e-6)
    assert spread.chain.metrics["val_energy_q95"] == pytest.approx(here.chain.metrics["val_energy_q95"], abs=1e-6)


def test_bases_on_two_workers_give_the_chains_of_one_process(reference):
    kw = {"chains": "lr,svm,lr+mlp", "params": {**FAST, "mlp": {"max_epochs": 2}}, "experiment": None,
          "val_folds": 0, "ensemble": False}
    here = cc.fit_annotator(reference, "cell_type", **kw)
    spread = cc.fit_annotator(reference, "cell_type", workers=2, **kw)
    assert spread.scores["chain"].tolist() == here.scores["chain"].tolist() == ["lr", "svm", "lr+mlp"]
    np.testing.assert_allclose(spread.scores["val_macro_f1"], here.scores["val_macro_f1"], atol=1e-9)
    assert spread.chosen == here.chosen
    np.testing.assert_allclose(spread.chain.predict_proba(reference[:200]), here.chain.predict_proba(reference[:200]),
                               atol=1e-6)


def test_workers_below_one_are_refused_in_one_line(reference):
    with pytest.raises(cc.InputError, match="--workers 0 must be at least 1"):
        cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, experiment=None, workers=0)
