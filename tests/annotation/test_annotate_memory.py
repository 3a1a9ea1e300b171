"""`cc.annotate`: an AnnData in memory or backed gets the columns `annotate_file` writes."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import cellcontrast as cc

pytest.importorskip("onnxruntime")
import tiny_onnx  # noqa: E402


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_onnx.build_model(tmp_path_factory.mktemp("memory") / "tiny.onnx")


@pytest.fixture(scope="module")
def counts():
    return tiny_onnx.make_counts(120, len(tiny_onnx.MODEL_GENES), seed=4)


def _adata(counts, kind="csr") -> ad.AnnData:
    X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[kind](counts)
    obs = pd.DataFrame({"donor": ["d1"] * len(counts)}, index=[f"c{i}" for i in range(len(counts))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=tiny_onnx.MODEL_GENES))


@pytest.mark.parametrize("kind", ["csr", "csc", "dense"])
def test_in_memory_equals_the_file_path(kind, model, counts, tmp_path):
    path = tiny_onnx.write_query(tmp_path / "q.h5ad", counts, tiny_onnx.MODEL_GENES)
    cc.annotate_file(model, path, tmp_path / "out.h5ad", min_confidence=0.5, log=lambda *_: None)
    expected = ad.read_h5ad(tmp_path / "out.h5ad").obs
    adata = _adata(counts, kind)
    assert cc.annotate(adata, model, batch_size=17) is None
    for column in [c for c in expected.columns if c.startswith("cellcontrast_")]:
        if expected[column].dtype.kind == "f":
            np.testing.assert_allclose(adata.obs[column].to_numpy(), expected[column].to_numpy(), atol=1e-6)
        else:
            assert adata.obs[column].astype(str).tolist() == expected[column].astype(str).tolist(), column
    assert adata.obs["donor"].tolist() == ["d1"] * len(counts)
    assert list(adata.uns["cellcontrast"]["classes"]) == tiny_onnx.CLASSES


def test_reference_probabilities_and_key_added(model, counts):
    adata = _adata(counts)
    cc.annotate(adata, cc.Annotator.load(model), key_added="cc", probabilities=True, min_confidence=0.0)
    np.testing.assert_allclose(adata.obsm["cc_probabilities"], tiny_onnx.reference_proba(counts), atol=1e-5)
    assert "cc_label" in adata.obs and "cc" in adata.uns and "cellcontrast_label" not in adata.obs


def test_copy_leaves_the_input_alone(model, counts):
    adata = _adata(counts)
    out = cc.annotate(adata, model, copy=True)
    assert "cellcontrast_label" in out.obs and "cellcontrast_label" not in adata.obs


def test_backed_anndata(model, counts, tmp_path):
    path = tiny_onnx.write_query(tmp_path / "q.h5ad", counts, tiny_onnx.MODEL_GENES)
    backed = ad.read_h5ad(path, backed="r")
    cc.annotate(backed, model, batch_size=25)
    in_memory = _adata(counts)
    cc.annotate(in_memory, model)
    np.testing.assert_allclose(backed.obs["cellcontrast_confidence"].to_numpy(),
                               in_memory.obs["cellcontrast_confidence"].to_numpy(), atol=1e-6)
    copied = cc.annotate(backed, model, copy=True)
    assert not copied.isbacked


def test_layers_and_raw(model, counts):
    adata = _adata(counts)
    adata.layers["counts"] = adata.X.copy()
    adata.raw = adata.copy()
    adata.X = sp.csr_matrix(np.log1p(counts))
    with pytest.raises(cc.InputError, match="not counts"):
        cc.annotate(adata, model)
    for layer in ("counts", "raw"):
        cc.annotate(adata, model, layer=layer)
        assert adata.obs["cellcontrast_label"].notna().all()


@pytest.mark.parametrize(("change", "kwargs", "message"), [
    (lambda a: a, {"layer": "spliced"}, "no layer"),
    (lambda a: a, {"layer": "raw"}, "no .raw"),
    (lambda a: a, {"min_confidence": 2.0}, "min-confidence"),
    (lambda a: a, {"key_added": ""}, "key_added"),
    (lambda a: a[:, :5].copy(), {}, "model genes"),
    (lambda a: a[:0].copy(), {}, "empty"),
])
def test_refusals_leave_obs_unchanged(change, kwargs, message, model, counts):
    adata = change(_adata(counts))
    before = adata.obs.copy()
    with pytest.raises(cc.InputError, match=message):
        cc.annotate(adata, model, **kwargs)
    pd.testing.assert_frame_equal(adata.obs, before)


def test_not_an_anndata(model, counts):
    with pytest.raises(cc.InputError, match="AnnData"):
        cc.annotate(counts, model)


def test_auto_confidence_is_the_threshold_chosen_on_validation(counts, tmp_path):
    """`min_confidence="auto"` reads the chain's validation threshold from the model's metadata."""
    top = tiny_onnx.reference_proba(counts).max(axis=1)
    chosen = float(np.quantile(top, 0.3))
    model = tiny_onnx.build_model(tmp_path / "auto.onnx", metrics={"val_macro_f1": 0.9, "val_confidence_q05": chosen})
    adata = _adata(counts)
    cc.annotate(adata, model, min_confidence="auto")
    unassigned = (adata.obs["cellcontrast_label"] == "Unassigned").to_numpy()
    assert np.array_equal(unassigned, top < chosen) and 0 < unassigned.sum() < len(top)
    with pytest.raises(cc.InputError, match="auto needs a model exported with its validation threshold"):
        cc.annotate(_adata(counts), tiny_onnx.build_model(tmp_path / "old.onnx"), min_confidence="auto")
    with pytest.raises(cc.InputError, match="or be auto"):
        cc.annotate(_adata(counts), model, min_confidence="high")


def test_evaluation_records_the_validation_threshold():
    import torch

    from cellcontrast.train.evaluation import evaluate

    class Fixed(torch.nn.Module):  # a stand-in chain whose probabilities are known
        temperature = torch.ones(1)
        n_classes = 2

        def logits(self, x):
            return x

        def forward(self, x):
            return torch.softmax(x / self.temperature, dim=-1)

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 2)).astype(np.float32)
    y = (X[:, 1] > X[:, 0]).astype(np.int64)
    chain = Fixed()
    metrics, proba = evaluate(chain, {"val": X}, {"val": y}, 2)
    assert metrics["val_confidence_q05"] == pytest.approx(np.quantile(proba["val"].max(axis=1), 0.05))
    assert (proba["val"].max(axis=1) < metrics["val_confidence_q05"]).mean() == pytest.approx(0.05, abs=0.01)
    t = float(chain.temperature)  # fitted on validation by evaluate
    energy = -t * np.log(np.exp(X.astype(np.float64) / t).sum(axis=1))
    assert metrics["val_energy_q95"] == pytest.approx(np.quantile(energy, 0.95))
