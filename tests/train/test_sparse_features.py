"""LR on the sparse form of its features (offset + S): the same features, logits, gradients
and fits as the dense matrix, without ever building it."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellcontrast.nn.bases import LogisticRegression
from cellcontrast.nn.preprocessing import LRPreprocess
from cellcontrast.train.loops import (
    EncoderHead,
    FeatureSource,
    SparseAffineSource,
    fit_linear_lbfgs,
    linear_features,
)
from conftest import marker_counts

N_CLASSES = 5


@pytest.fixture(scope="module")
def counts():
    x, y = marker_counts(n_classes=N_CLASSES, per_class=50, n_genes=150, seed=4)
    return x, y


@pytest.mark.parametrize("standardize", [True, False])
def test_sparse_form_is_the_dense_output_clip_included(counts, standardize):
    x, _ = counts
    # clip 1.5 bites on both sides for z-scores, and on large log1p values unscaled
    pre = LRPreprocess.fit(x, n_hvg=100, standardize=standardize, clip=1.5 if standardize else 3.0)
    matrix, offset = pre.sparse_features(x)
    assert sp.isspmatrix_csr(matrix) and matrix.dtype == np.float32 and matrix.shape == (x.shape[0], 100)
    assert matrix.nnz <= x[:, pre.selected_genes()].nnz  # only detected values are stored
    dense = pre(torch.as_tensor(x.toarray())).double().numpy()
    assert np.abs(dense).max() == pytest.approx(1.5 if standardize else 3.0)  # the clip was reached
    np.testing.assert_allclose(matrix.toarray() + offset[None, :], dense, atol=2e-6)


def _net(pre: LRPreprocess, seed: int = 0) -> EncoderHead:
    model = LogisticRegression(pre, N_CLASSES)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.head.linear.weight)
    torch.nn.init.normal_(model.head.linear.bias)
    return EncoderHead(model.encoder, model.head)


def test_sparse_logits_and_gradients_are_the_dense_ones(counts):
    x, y = counts
    pre = LRPreprocess.fit(x, n_hvg=100, standardize=True, clip=2.0)
    net = _net(pre)
    target = torch.as_tensor(y)
    found = []
    for source in (SparseAffineSource(x, pre), FeatureSource(x, pre)):
        net.zero_grad()
        logits = torch.cat(list(source.logit_blocks(net)))
        torch.nn.functional.cross_entropy(logits, target).backward()
        head = net.head.linear
        found.append((logits.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
    for sparse, dense in zip(found[0], found[1], strict=True):
        np.testing.assert_allclose(sparse.numpy(), dense.numpy(), atol=1e-4, rtol=1e-5)


def test_an_lbfgs_fit_on_the_sparse_form_matches_the_dense_fit(counts):
    x, y = counts
    train, val = slice(0, 200), slice(200, 250)
    pre = LRPreprocess.fit(x[train], n_hvg=100, standardize=True)
    p = {"l2_path": [1e-1, 1e-2], "max_iter": 50, "path_patience": 2}
    fits = []
    for source in (SparseAffineSource, FeatureSource):
        net = _net(pre)
        score = fit_linear_lbfgs(net, source(x[train], pre), y[train], source(x[val], pre), y[val], N_CLASSES, p, 0)
        fits.append((score, net.head.linear.weight.detach().clone(), net.l2))
    assert fits[0][0][:2] == fits[1][0][:2] and fits[0][2] == fits[1][2]  # same val F1, accuracy and l2
    np.testing.assert_allclose(fits[0][1].numpy(), fits[1][1].numpy(), atol=2e-3)


def test_sparse_features_are_used_below_the_density_threshold(counts):
    x, _ = counts
    pre = LRPreprocess.fit(x, n_hvg="all", standardize=True)
    assert isinstance(linear_features(x, pre), FeatureSource)  # negative-binomial counts: mostly nonzero
    sparse = x.multiply(sp.random(*x.shape, density=0.04, format="csr", random_state=0) > 0).tocsr()
    sparse.eliminate_zeros()
    assert isinstance(linear_features(sparse, pre), SparseAffineSource)
