"""Preprocessing modules: fitted on train only, finite on empty cells, match the recipes."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellcontrast.nn.preprocessing import (
    ActinnPreprocess,
    LRPreprocess,
    ScdaePreprocess,
    highly_variable_genes,
)
from conftest import marker_counts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    counts, _ = marker_counts(n_classes=6)
    return counts[:240], counts[240:]


def dense(x):
    return torch.as_tensor(x.toarray(), dtype=torch.float32)


def buffers(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


FITTERS = {
    "lr": lambda c: LRPreprocess.fit(c, n_hvg=50),
    "actinn": lambda c: ActinnPreprocess.fit(c),
    "scdae": lambda c: ScdaePreprocess.fit(c, n_hvg=50),
}


@pytest.mark.parametrize("name", sorted(FITTERS))
def test_fit_depends_on_train_only(name, data):
    train, other = data
    fitted = FITTERS[name](train)
    again = FITTERS[name](train)
    for k, v in buffers(fitted).items():
        assert torch.equal(v, again.state_dict()[k]), k
    # Fitting on different cells must change something: the test can fail.
    different = FITTERS[name](other)
    assert any(not torch.equal(v, different.state_dict()[k]) if v.shape == different.state_dict()[k].shape
               else True for k, v in buffers(fitted).items())
    # Running other cells through the module leaves its buffers alone.
    before = buffers(fitted)
    fitted.train()
    fitted(dense(other))
    for k, v in before.items():
        assert torch.equal(v, fitted.state_dict()[k]), k


@pytest.mark.parametrize("name", sorted(FITTERS))
def test_zero_count_cells_are_finite(name, data):
    train, _ = data
    module = FITTERS[name](train)
    x = dense(train[:5])
    x[1] = 0.0
    out = module(x)
    assert out.shape == (5, module.out_dim)
    assert torch.isfinite(out).all()
    if name != "lr":  # log of zero counts is zero for ACTINN and scDAE
        assert torch.equal(out[1], torch.zeros(module.out_dim))


def test_lr_matches_numpy_reference(data):
    train, _ = data
    module = LRPreprocess.fit(train, n_hvg=50, clip=10.0)
    x = train.toarray().astype(np.float64)
    logged = np.log1p(x / x.sum(1, keepdims=True) * 1e4)[:, module.selected_genes()]
    sd = logged.std(0)
    sd[sd < 1e-6] = 1.0
    expected = np.clip((logged - logged.mean(0)) / sd, -10, 10)
    np.testing.assert_allclose(module(dense(train)).numpy(), expected, atol=1e-4)
    assert module.out_dim == 50
    assert list(module.selected_genes()) == sorted(module.selected_genes())


def test_lr_without_standardisation_is_plain_log1p(data):
    train, _ = data
    module = LRPreprocess.fit(train, n_hvg=50, standardize=False)
    x = train.toarray().astype(np.float64)
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4)[:, module.selected_genes()]
    np.testing.assert_allclose(module(dense(train)).numpy(), expected, atol=1e-4)
    assert module.get_config()["standardize"] is False
    assert "no standardisation" in module.describe()
    assert list(module.selected_genes()) == list(LRPreprocess.fit(train, n_hvg=50).selected_genes())


def test_lr_constant_gene_gets_unit_sd_and_clip_applies():
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, (20, 30)).astype(np.float32)
    x[:, 2] = 0.0  # never expressed: sd 0 in train
    x[19, 1] = 1e4  # one extreme value, beyond the clip after standardising
    module = LRPreprocess.fit(sp.csr_matrix(x), n_hvg=100, clip=3.0)
    assert module.out_dim == 30
    assert module.std[2] == 1.0
    out = module(torch.as_tensor(x))
    assert torch.isfinite(out).all()
    assert out.abs().max() == pytest.approx(3.0)


def test_all_genes_kept_when_fewer_than_n_hvg(data):
    train, _ = data
    assert LRPreprocess.fit(train, n_hvg=2000).out_dim == train.shape[1]
    module = ScdaePreprocess.fit(train, n_hvg=2000)
    assert module.out_dim == train.shape[1]
    # Keeping every gene skips the gather: the features are still every gene, in order.
    x = train.toarray().astype(np.float64)
    expected = np.log1p(x / x.sum(1, keepdims=True) * 1e4) / module.scale.numpy()
    np.testing.assert_allclose(module(dense(train)).numpy(), expected, atol=1e-4)


@pytest.mark.parametrize("index", [[3, 1, 2], [0, 0, 5], [-1, 2, 3], [0, 1, 200]])
def test_loading_a_bad_gene_index_is_refused(index):
    module = LRPreprocess(n_genes=200, n_selected=3)
    state = {**module.state_dict(), "gene_index": torch.tensor(index)}
    with pytest.raises(ValueError, match="gene_index must be sorted, unique"):
        module.load_state_dict(state)


def test_hvg_agrees_with_scanpy_seurat(data):
    sc = pytest.importorskip("scanpy")
    import anndata

    train, _ = data
    adata = anndata.AnnData(train.copy())
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, flavor="seurat", n_top_genes=50)
    theirs = set(np.flatnonzero(adata.var["highly_variable"].to_numpy()))
    normalized = sp.csr_matrix(train.multiply(1e4 / train.sum(1)))
    ours = set(highly_variable_genes(normalized, 50))
    assert len(ours) == 50
    assert len(ours & theirs) >= 49  # identical up to float32 ties


def actinn_reference(x: np.ndarray) -> np.ndarray:
    """ACTINN's scale_sets on one (cells x genes) matrix, written from its description."""
    scaled = np.log2(x / x.sum(1, keepdims=True) * 1e4 + 1).T  # genes x cells
    genes = np.arange(scaled.shape[0])
    expr = scaled.sum(1)
    keep = (expr >= np.percentile(expr, 1)) & (expr <= np.percentile(expr, 99))
    scaled, genes = scaled[keep], genes[keep]
    cv = scaled.std(1) / scaled.mean(1)
    keep = (cv >= np.percentile(cv, 1)) & (cv <= np.percentile(cv, 99))
    return genes[keep]


def test_actinn_gene_selection_matches_reference(data):
    train, _ = data
    module = ActinnPreprocess.fit(train)
    x = train.toarray().astype(np.float64)
    np.testing.assert_array_equal(module.selected_genes(), actinn_reference(x))
    assert 0 < module.out_dim < train.shape[1]
    expected = np.log2(x / x.sum(1, keepdims=True) * 1e4 + 1)[:, module.selected_genes()]
    np.testing.assert_allclose(module(dense(train)).numpy(), expected, atol=1e-4)


def test_actinn_drops_never_expressed_genes(data):
    train, _ = data
    x = train.toarray()
    x[:, :5] = 0  # 5 of 200 genes silent: above 1% of genes, so they pass the expression cut
    module = ActinnPreprocess.fit(sp.csr_matrix(x))
    assert not set(range(5)) & set(module.selected_genes())


def test_scdae_train_features_in_unit_interval(data):
    train, _ = data
    module = ScdaePreprocess.fit(train, n_hvg=50)
    out = module(dense(train))
    assert out.min() >= 0 and out.max() <= 1 + 1e-6
    assert torch.allclose(out.max(0).values, torch.ones(50), atol=1e-5)


@pytest.mark.parametrize("name", sorted(FITTERS))
def test_rebuild_from_config_and_state(name, data):
    train, _ = data
    module = FITTERS[name](train)
    rebuilt = type(module)(**module.get_config())
    rebuilt.load_state_dict(module.state_dict())
    x = dense(train[:7])
    assert torch.equal(module(x), rebuilt(x))
    assert isinstance(module.describe(), str) and module.describe()


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("n_hvg", [50, "all"])
def test_lr_from_streamed_moments_equals_the_fit_on_the_same_cells(data, standardize, n_hvg):
    """`fit` on a reference read in chunks takes its genes, means and sds from summed chunks."""
    from cellcontrast.nn.preprocessing import GeneMoments

    counts = sp.csr_matrix(data[0])
    moments = GeneMoments(counts.shape[1])
    for start in range(0, counts.shape[0], 70):  # uneven chunks
        moments.add(counts[start:start + 70])
    whole = LRPreprocess.fit(counts, n_hvg=n_hvg, standardize=standardize)
    streamed = LRPreprocess.from_moments(moments, n_hvg, standardize=standardize)
    assert torch.equal(whole.gene_index, streamed.gene_index)
    assert torch.allclose(whole.mean, streamed.mean, atol=1e-6) and torch.allclose(whole.std, streamed.std, atol=1e-6)
    # cells taken out again: the fit on the rest
    moments.add(counts[:40], sign=-1)
    rest = LRPreprocess.fit(counts[40:], n_hvg=n_hvg, standardize=standardize)
    again = LRPreprocess.from_moments(moments, n_hvg, standardize=standardize)
    assert torch.equal(rest.gene_index, again.gene_index) and torch.allclose(rest.mean, again.mean, atol=1e-6)
