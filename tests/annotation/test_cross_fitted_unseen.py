"""`--flag-unseen` on an annotator fitted with grouped validation: a new cell's energy read under
each fold model against the energies of the cells that fold held out (a conformal p-value), the
fold models exported in the one ONNX graph, the p-values computed without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import torch

import cellcontrast as cc
from cellcontrast.annotation import conformal
from cellcontrast.annotation.conformal import energy_calibration, energy_p_values
from cellcontrast.core.errors import InputError
from cellcontrast.data.simulate import simulate_atlas

FAST = {"lr": {"n_hvg": 60, "l2_path": [1e-2, 1e-3]}}


def test_the_p_value_counts_held_out_cells_at_least_as_unfamiliar_under_their_own_fold():
    rng = np.random.default_rng(0)
    held = [rng.normal(0, 1, 40), rng.normal(5, 2, 25)]  # two folds on different scales
    calibration = energy_calibration(held)
    query = rng.normal(2, 3, size=(30, 2))
    expected = [(1 + sum(int((h >= q[k] - 5e-7).sum()) for k, h in enumerate(held))) / 66 for q in query]
    assert energy_p_values(query, calibration) == pytest.approx(expected)


def test_cells_like_the_held_out_ones_are_flagged_at_about_alpha():
    """Exchangeable cells: fold energies drawn as the held-out cells' were, fold by fold."""
    rng = np.random.default_rng(1)
    shifts = np.array([0.0, 3.0, -2.0])
    calibration = energy_calibration([rng.normal(s, 1, 2000) for s in shifts])
    # a query cell's energy under fold k is its held-out-like draw: one cell, the same draw, three scales
    z = rng.normal(0, 1, 20000)
    p = energy_p_values(z[:, None] + shifts[None, :], calibration)
    assert conformal.UNSEEN_ALPHA - 0.01 <= (p <= conformal.UNSEEN_ALPHA).mean() <= conformal.UNSEEN_ALPHA + 0.01


def test_the_calibration_is_capped_fold_by_fold_in_proportion(monkeypatch):
    monkeypatch.setattr(conformal, "MAX_CALIBRATION", 100)
    stored = energy_calibration([np.arange(300.0), np.arange(100.0)])
    assert [len(f) for f in stored["folds"]] == [75, 25]
    assert all(f == sorted(f) for f in stored["folds"])


def test_fold_energies_of_another_shape_are_refused_in_one_line():
    with pytest.raises(InputError, match="fold energies have shape"):
        energy_p_values(np.zeros((4, 3)), energy_calibration([np.zeros(5), np.ones(5)]))


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    reference = simulate_atlas(n_cells=900, n_types=6, n_genes=120, n_individuals=3, seed=3)
    out = tmp_path_factory.mktemp("cross") / "a.onnx"
    result = cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, batch_key="individual", out=out,
                              experiment=None)
    return reference, result, out


def _counts(reference, genes):
    return torch.as_tensor(reference[:, genes].X.toarray(), dtype=torch.float32)


def test_each_fold_model_scores_its_held_out_cells_as_the_calibration_stored(grouped):
    reference, result, _ = grouped
    module, stored = result.chain.module, result.chain.config["energy_calibration"]
    individuals = sorted(reference.obs["individual"].astype(str).unique())
    assert module.n_fold_members == len(stored["folds"]) == len(individuals) == 3
    with torch.no_grad():
        energies = module.fold_energies(_counts(reference, result.chain.genes)).numpy()
    for k, name in enumerate(individuals):  # leave-one-individual-out: fold k held individual k out
        held = (reference.obs["individual"].astype(str) == name).to_numpy()
        assert np.sort(energies[held, k]) == pytest.approx(stored["folds"][k], abs=1e-4)


def test_annotate_flags_the_cells_whose_p_value_is_at_most_alpha_without_torch(grouped, tmp_path):
    reference, result, model = grouped
    query = tmp_path / "q.h5ad"
    reference.write_h5ad(query)
    out = tmp_path / "o.h5ad"
    code = f"""
import sys, json
from cellcontrast.annotation.api import annotate_file
annotate_file({str(model)!r}, {str(query)!r}, {str(out)!r}, flag_unseen=True, log=lambda *_: None)
print(json.dumps([m for m in ("torch", "sklearn") if m in sys.modules]))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    obs = ad.read_h5ad(out).obs
    counts = _counts(reference, result.chain.genes)
    with torch.no_grad():
        folds = result.chain.module.fold_energies(counts).numpy()
        refit = result.chain.module.energy(counts).numpy()
    assert obs["cellcontrast_energy"].to_numpy() == pytest.approx(refit, abs=1e-3)  # the refit's, to rank by
    expected = energy_p_values(folds, result.chain.config["energy_calibration"])
    p = obs["cellcontrast_energy_p"].to_numpy()
    assert p == pytest.approx(expected, abs=2e-3)  # float32 graph against float32 torch
    assert (obs["cellcontrast_unfamiliar"].to_numpy() == (p <= np.float32(0.05))).all()
    assert (obs.loc[obs["cellcontrast_unfamiliar"], "cellcontrast_label"] == "Unassigned").all()
    assert "fold models" in ad.read_h5ad(out).uns["cellcontrast"]["unseen_rule"]
    assert "fold models against the" in model.with_name("a.card.md").read_text()


def test_an_annotator_without_folds_keeps_the_energy_threshold(tmp_path):
    reference = simulate_atlas(n_cells=400, n_types=4, n_genes=80, n_individuals=2, seed=4)
    model = tmp_path / "b.onnx"
    result = cc.fit_annotator(reference, "cell_type", chains="lr", params=FAST, val_folds=0, out=model,
                              experiment=None)
    assert "energy_calibration" not in result.chain.config and not cc.Annotator.load(model).cross_fitted
    query = reference.copy()
    cc.annotate(query, str(model), flag_unseen=True)
    assert "cellcontrast_energy_p" not in query.obs
    threshold = result.chain.metrics["val_energy_q95"]
    assert (query.obs["cellcontrast_unfamiliar"] == (query.obs["cellcontrast_energy"] > threshold)).all()


@pytest.mark.parametrize("stored", ["not json", '{"folds": [[]]}', '{"alpha": 0.05}'])
def test_an_annotator_with_unreadable_fold_energies_is_refused_in_one_line(grouped, tmp_path, capsys, stored):
    import onnx

    from cellcontrast.cli.entry import main

    reference, _, model = grouped
    proto = onnx.load_model(str(model))
    next(p for p in proto.metadata_props if p.key == "energy_calibration").value = stored
    broken = tmp_path / "broken.onnx"
    onnx.save_model(proto, str(broken))
    query, out = tmp_path / "q.h5ad", tmp_path / "o.h5ad"
    reference[:50].copy().write_h5ad(query)
    assert main(["annotate", str(broken), str(query), "--out", str(out), "--flag-unseen"]) == 2
    err = capsys.readouterr().err
    assert "unreadable 'energy_calibration'" in err and "Traceback" not in err and not out.exists()
