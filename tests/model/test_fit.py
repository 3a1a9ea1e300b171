"""`cc.fit` and `cc.Chain`: train on an AnnData in memory, validation for every choice."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellcontrast as cc
from cellcontrast.model.fit import stratified_validation

FAST = {"lr": {"n_hvg": 100, "l2_path": [1e-2, 1e-3]}}


@pytest.fixture(scope="module")
def reference(small_atlas):
    return small_atlas[:2000].copy()


@pytest.fixture(scope="module")
def chain(reference):
    return cc.fit(reference, "cell_type", params=FAST)


def test_fit_returns_a_calibrated_chain_with_validation_metrics(chain, reference):
    counts = reference.obs["cell_type"].value_counts()
    assert chain.classes == sorted(counts.index, key=lambda t: (-counts[t], t))  # most frequent first
    assert chain.genes == reference.var_names.tolist()
    assert chain.config["base"] == "lr" and chain.config["component"] == "none"
    assert 0.5 < chain.metrics["val_macro_f1"] <= 1.0 and "temperature" in chain.metrics
    assert chain.config["fit"]["n_train"] + chain.config["fit"]["n_val"] == reference.n_obs
    assert not any(k.startswith("test_") for k in chain.metrics)  # nothing held out was read


def test_same_seed_same_chain_and_another_seed_another_split(reference, chain):
    again = cc.fit(reference, "cell_type", params=FAST)
    np.testing.assert_array_equal(chain.predict_proba(reference[:50]), again.predict_proba(reference[:50]))
    other = cc.fit(reference, "cell_type", params=FAST, seed=1)
    assert other.config["fit"]["seed"] == 1


def test_every_type_has_training_and_validation_cells():
    labels = pd.Series(["a"] * 50 + ["b"] * 5 + ["c"] * 2 + ["d"])
    train, val, kept = stratified_validation(labels, 0.1, seed=0)
    assert kept == ["a", "b", "c"]  # d has one cell: it cannot be split
    assert set(train).isdisjoint(val) and len(train) + len(val) == 57
    for name in kept:
        members = set(np.flatnonzero(labels == name))
        assert members & set(train) and members & set(val)


def test_fit_reads_layers_and_any_storage(reference):
    adata = reference[:800].copy()
    adata.layers["counts"] = sp.csc_matrix(adata.X)
    adata.X = np.log1p(adata.X.toarray())  # normalised X, counts in a layer
    with pytest.raises(cc.InputError, match="not counts"):
        cc.fit(adata, "cell_type", params=FAST)
    chain = cc.fit(adata, "cell_type", layer="counts", params=FAST)
    assert chain.metrics["val_macro_f1"] > 0.3


def test_fit_with_a_component(reference):
    chain = cc.fit(reference[:1200].copy(), "cell_type", component="mlp",
                   params={**FAST, "mlp": {"max_epochs": 2}})
    assert chain.config["component"] == "mlp" and chain.module.has_component


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"labels_key": "tissue"}, "no label column"),
    ({"base": "knn"}, "unknown base"),
    ({"component": "mlx"}, "unknown component"),
    ({"params": {"lr": {"epochs": -1}}}, "bad parameters"),
    ({"params": {"rf": {}}}, "bad parameters"),
    ({"val_fraction": 1.5}, "val_fraction"),
])
def test_bad_input_is_an_input_error(reference, kwargs, message):
    with pytest.raises(cc.InputError, match=message):
        cc.fit(reference[:300].copy(), **kwargs)


def test_one_type_is_refused(reference):
    adata = reference[:100].copy()
    adata.obs["cell_type"] = "same"
    with pytest.raises(cc.InputError, match="at least 2 cell types"):
        cc.fit(adata, "cell_type", params=FAST)
    with pytest.raises(cc.InputError, match="AnnData"):
        cc.fit(adata.X, "cell_type")


def test_save_load_export_round_trip(chain, reference, tmp_path):
    folder = chain.save(tmp_path / "chain")
    loaded = cc.Chain.load(folder)
    assert loaded.classes == chain.classes and repr(loaded) == repr(chain)
    np.testing.assert_array_equal(loaded.predict_proba(reference[:30]), chain.predict_proba(reference[:30]))
    onnx_path = loaded.export(tmp_path / "a.onnx")
    annotator = cc.Annotator.load(onnx_path)
    assert annotator.classes == chain.classes and annotator.genes == chain.genes
    with pytest.raises(cc.InputError, match=r"\.onnx"):
        chain.export(tmp_path / "a.txt")
    assert cc.Chain.load(tmp_path).classes == chain.classes  # the one chain inside, as `train --out-dir`
    chain.save(tmp_path / "other")
    with pytest.raises(cc.InputError, match="holds 2 chains"):
        cc.Chain.load(tmp_path)
    with pytest.raises(cc.InputError, match="no chain.pt"):
        cc.Chain.load((tmp_path / "empty").mkdir() or tmp_path / "empty")


def test_predict_proba_matches_genes_by_name(chain, reference):
    query = reference[:40].copy()
    shuffled = query[:, np.random.default_rng(0).permutation(query.n_vars)].copy()
    np.testing.assert_allclose(chain.predict_proba(shuffled), chain.predict_proba(query), atol=1e-6)


def test_chains_on_one_reference_share_the_split_and_the_base(reference, monkeypatch):
    """`fit_chains` trains LR once for "lr" and "lr+mlp" when "auto" scaling kept z-scores (the
    base a component needs), and each chain equals the one `cc.fit` trains alone."""
    import importlib

    from cellcontrast.data.atlas import prepare_atlas

    fit_module = importlib.import_module("cellcontrast.model.fit")  # the package's `fit` is the function

    params = {"lr": {**FAST["lr"], "standardize": True}, "mlp": {"max_epochs": 2}}
    calls = []
    real = fit_module.fit_base
    monkeypatch.setattr(fit_module, "fit_base", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    atlas = prepare_atlas(reference, label_key="cell_type", source="the reference")
    fitted = fit_module.fit_chains(atlas, [("lr", "none"), ("lr", "mlp")], params=params)
    assert calls == ["lr"] and set(fitted.chains) == {"lr", "lr+mlp"}
    assert set(fitted.train).isdisjoint(fitted.val) and len(fitted.train) + len(fitted.val) == reference.n_obs
    alone = cc.fit(reference, "cell_type", base="lr", component="mlp", params=params)
    np.testing.assert_allclose(fitted.chains["lr+mlp"].predict_proba(reference[:50]),
                               alone.predict_proba(reference[:50]), atol=1e-6)
