"""Conformal prediction sets: coverage on exchangeable data, sets never empty unless the score
allows it (size 0 says so), the same sets from `annotate` (onnxruntime, no torch) as from the
probabilities in Python, and the bad inputs refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pytest

import cellcontrast as cc
from cellcontrast.annotation.conformal import (
    conformal_quantile,
    conformity_scores,
    cross_fitted_membership,
    prediction_sets,
    set_membership,
)
from cellcontrast.cli.entry import main
from cellcontrast.data.simulate import simulate_atlas

FAST = {"lr": {"n_hvg": 80, "l2_path": [1e-2, 1e-3]}}


def test_the_quantile_is_the_finite_sample_one():
    scores = np.arange(1, 10) / 10  # 9 scores
    assert conformal_quantile(scores, 0.8) == pytest.approx(0.8)  # ceil(10 * 0.8) = 8th
    assert conformal_quantile(scores, 0.95) == float("inf")  # ceil(9.5) = 10 > 9: every label


def test_coverage_holds_on_exchangeable_probabilities():
    """Probabilities from a known model: labels drawn from them, calibrated on half, tested on the rest."""
    rng = np.random.default_rng(0)
    classes = [f"t{k}" for k in range(6)]
    proba = rng.dirichlet(np.full(6, 0.6), size=8000)
    y = np.array([rng.choice(6, p=p) for p in proba])
    calibration = conformity_scores(proba[:4000], y[:4000], classes, source="test")
    for score in ("lac", "aps", "class"):
        for target in (0.8, 0.9, 0.95):
            member = set_membership(proba[4000:], calibration, target, score, classes)
            covered = member[np.arange(4000), y[4000:]].mean()
            assert covered >= target - 0.02, (score, target, covered)
            assert covered <= target + 0.06  # and not trivially (every label)
    aps = set_membership(proba[4000:], calibration, 0.9, "aps", classes)
    assert aps.sum(axis=1).min() >= 1  # never empty


def test_cross_fitted_sets_are_calibrated_on_the_other_groups_only():
    rng = np.random.default_rng(2)
    classes = [f"t{k}" for k in range(5)]
    proba = rng.dirichlet(np.full(5, 0.6), size=3000)
    y = np.array([rng.choice(5, p=p) for p in proba])
    groups = np.repeat([0, 1, 2], 1000)
    member = cross_fitted_membership(proba, y, groups, classes, 0.9)
    assert abs(member[np.arange(3000), y].mean() - 0.9) < 0.03
    others = conformity_scores(proba[groups != 1], y[groups != 1], classes, source="t")
    assert np.array_equal(member[groups == 1], set_membership(proba[groups == 1], others, 0.9, "lac", classes))
    y_changed = y.copy()
    y_changed[groups == 1] = 0  # the group's own labels never enter its calibration
    assert np.array_equal(cross_fitted_membership(proba, y_changed, groups, classes, 0.9)[groups == 1],
                          member[groups == 1])


def test_sets_list_labels_in_probability_order_and_empty_sets_have_size_zero():
    classes = ["a", "b", "c"]
    calibration = {"aps": [0.5, 0.6, 0.7, 0.8, 0.9], "class": {"a": [0.1] * 9, "b": [0.1] * 9, "c": [0.1] * 9}}
    proba = np.array([[0.2, 0.7, 0.1], [0.34, 0.33, 0.33]])
    labels, sizes = prediction_sets(proba, calibration, 0.8, "aps", classes)
    assert labels[0] == "b|a" and sizes[0] == 2  # masses 0.7, 0.9 within q = 0.9 (the 5th score); 1.0 not
    assert labels[1] == "a|b" and sizes[1] == 2  # 0.34, 0.67 <= 0.9; 1.0 is not
    labels, sizes = prediction_sets(proba, calibration, 0.8, "class", classes)
    assert labels.tolist() == ["", ""] and sizes.tolist() == [0, 0]  # no label reaches 0.9: none plausible


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    atlas = simulate_atlas(n_cells=2400, n_types=6, n_genes=150, n_individuals=3, seed=11)
    folder = tmp_path_factory.mktemp("conformal")
    rng = np.random.default_rng(1)
    query_rows = np.sort(rng.choice(atlas.n_obs, 600, replace=False))
    is_query = np.zeros(atlas.n_obs, dtype=bool)
    is_query[query_rows] = True
    model = folder / "a.onnx"
    cc.fit_annotator(atlas[~is_query].copy(), "cell_type", chains="lr", params=FAST, val_fraction=0.3,
                     out=model, experiment=None)
    query = folder / "q.h5ad"
    atlas[is_query].copy().write_h5ad(query)
    return model, query


def test_annotate_writes_sets_that_cover_the_target_on_exchangeable_cells(fitted, tmp_path):
    model, query = fitted
    out = tmp_path / "o.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(out), "--coverage", "0.9",
                 "--conformal-score", "aps", "--probabilities"]) == 0
    annotated = ad.read_h5ad(out)
    sets = annotated.obs["cellcontrast_prediction_set"].astype(str).str.split("|")
    truth = annotated.obs["cell_type"].astype(str)
    covered = np.mean([t in s for t, s in zip(truth, sets, strict=True)])
    assert covered >= 0.9 - 0.05  # 600 cells: the binomial sd is 1.2 points
    assert (annotated.obs["cellcontrast_set_size"] >= 1).all()
    assert annotated.uns["cellcontrast"]["coverage"] == 0.9
    assert "validation part" in annotated.uns["cellcontrast"]["conformity_source"]


def test_the_card_shows_coverage_by_type_and_plots_show_set_sizes(fitted, tmp_path):
    model, query = fitted
    card = model.with_suffix("").with_name("a.card.md").read_text()
    assert "| set coverage | mean set size (predicted as it) |" in card
    assert "each\nrandom half calibrated on the other" in card
    pytest.importorskip("umap")
    out, plots = tmp_path / "o.h5ad", tmp_path / "plots"
    assert main(["annotate", str(model), str(query), "--out", str(out), "--coverage", "0.9", "--plots",
                 str(plots)]) == 0
    assert (plots / "set_sizes.png").stat().st_size > 5_000


def test_the_sets_come_from_onnxruntime_alone_and_equal_pythons(fitted, tmp_path):
    model, query = fitted
    out = tmp_path / "o.h5ad"
    code = f"""
import sys, json
from cellcontrast.annotation.api import annotate_file
annotate_file({str(model)!r}, {str(query)!r}, {str(out)!r}, coverage=0.9, conformal_score="class",
              probabilities=True, log=lambda *_: None)
print(json.dumps([m for m in ("torch", "sklearn") if m in sys.modules]))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    annotated = ad.read_h5ad(out)
    annotator = cc.Annotator.load(model)
    labels, sizes = prediction_sets(annotated.obsm["cellcontrast_probabilities"], annotator.metadata["conformity"],
                                    0.9, "class", annotator.classes)
    assert annotated.obs["cellcontrast_prediction_set"].astype(str).tolist() == labels.tolist()
    assert annotated.obs["cellcontrast_set_size"].tolist() == sizes.tolist()


@pytest.mark.parametrize("argv_tail, message", [
    (["--coverage", "0"], "--coverage 0.0 must lie strictly between 0 and 1"),
    (["--coverage", "1.5"], "--coverage 1.5 must lie strictly between 0 and 1"),
])
def test_bad_coverage_is_refused_in_one_line(fitted, tmp_path, capsys, argv_tail, message):
    model, query = fitted
    out = tmp_path / "o.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(out), *argv_tail]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_an_annotator_without_conformity_scores_is_refused(fitted, tmp_path, capsys):
    _, query = fitted
    chain = cc.fit(ad.read_h5ad(query), "cell_type", params=FAST)
    chain.config.pop("conformity")  # as annotators exported before they were recorded
    model = chain.export(tmp_path / "plain.onnx")
    out = tmp_path / "o.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(out), "--coverage", "0.9"]) == 2
    assert "has no conformity scores" in capsys.readouterr().err and not out.exists()
