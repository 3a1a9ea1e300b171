"""Majority voting: over-clustering on the model's probabilities, the vote, Heterogeneous
clusters, the memory refusal, and the columns both entry points write."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import cellcontrast as cc
from cellcontrast.annotation import majority
from cellcontrast.cli.entry import main
from tiny_onnx import build_model, make_counts, write_query

pytest.importorskip("igraph")


def test_each_cluster_gets_its_majority_and_weak_majorities_are_heterogeneous():
    labels = pd.Categorical(["A", "A", "B", "B", "B", "C", "A", "C"])
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    voted, agreement = majority.majority_vote(labels, clusters)
    assert list(voted) == ["A", "A", "A", "B", "B", "C", "C", "C"]
    np.testing.assert_allclose(agreement, [2 / 3] * 3 + [1, 1] + [2 / 3] * 3)
    strict, _ = majority.majority_vote(labels, clusters, min_agreement=0.9)
    assert list(strict) == [majority.HETEROGENEOUS] * 3 + ["B", "B"] + [majority.HETEROGENEOUS] * 3


def test_over_clustering_keeps_separated_groups_apart_and_is_seeded():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 10, size=(4, 6))
    group = np.repeat(np.arange(4), 150)
    points = (centres[group] + rng.normal(0, 0.5, size=(600, 6))).astype(np.float32)
    clusters = majority.over_cluster(points, resolution=1.0)
    for c in np.unique(clusters):  # no cluster mixes two groups
        assert len(np.unique(group[clusters == c])) == 1
    np.testing.assert_array_equal(clusters, majority.over_cluster(points, resolution=1.0))
    assert majority.default_resolution(1_000) < majority.default_resolution(150_000)


def test_a_query_too_large_for_memory_is_refused_before_any_work():
    with pytest.raises(cc.InputError, match="GiB are available"):
        majority.check_can_cluster(10_000_000, 50, available=4 << 30)
    majority.check_can_cluster(10_000, 50, available=4 << 30)


@pytest.fixture(scope="module")
def model_and_query(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mv")
    from tiny_onnx import MODEL_GENES

    counts = make_counts(300, len(MODEL_GENES), seed=3)
    return build_model(folder / "tiny.onnx"), write_query(folder / "q.h5ad", counts, MODEL_GENES), counts


def test_annotate_file_and_annotate_write_the_same_majority_columns(model_and_query, tmp_path):
    model, query, _ = model_and_query
    out = tmp_path / "out.h5ad"
    assert main(["annotate", str(model), str(query), "--out", str(out), "--majority-voting",
                 "--min-agreement", "0.6"]) == 0
    obs = ad.read_h5ad(out).obs
    for column in ("over_clustering", "majority_voting", "majority_agreement"):
        assert f"cellcontrast_{column}" in obs
    clusters = obs["cellcontrast_over_clustering"].astype(str)
    for _, members in obs.groupby(clusters, observed=True):  # one label a cluster
        assert members["cellcontrast_majority_voting"].nunique() == 1
    weak = obs["cellcontrast_majority_agreement"] < 0.6
    assert (obs.loc[weak, "cellcontrast_majority_voting"] == majority.HETEROGENEOUS).all()
    assert "cellcontrast_probabilities" not in ad.read_h5ad(out).obsm  # held for the clustering only

    adata = ad.read_h5ad(query)
    cc.annotate(adata, model, majority_voting=True, min_agreement=0.6, min_confidence=0.0)
    np.testing.assert_array_equal(adata.obs["cellcontrast_majority_voting"].astype(str),
                                  obs["cellcontrast_majority_voting"].astype(str))
    assert adata.uns["cellcontrast"]["n_clusters"] == clusters.nunique()


def test_bad_agreement_is_refused_in_one_line(model_and_query, tmp_path, capsys):
    model, query, _ = model_and_query
    assert main(["annotate", str(model), str(query), "--out", str(tmp_path / "o.h5ad"), "--majority-voting",
                 "--min-agreement", "1.5"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "o.h5ad").exists()
