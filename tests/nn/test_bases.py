"""Base models: the encoder/head split, sizes, initialisation, train/eval behaviour."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

from cellcontrast.nn.bases import Actinn, LogisticRegression, ScDAE
from cellcontrast.nn.preprocessing import ActinnPreprocess, LRPreprocess, ScdaePreprocess

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    return sp.csr_matrix(rng.negative_binomial(2, 0.3, (40, 120)).astype(np.float32))


def dense(x):
    return torch.as_tensor(x.toarray(), dtype=torch.float32)


def test_logistic_regression_is_preprocessing_plus_one_linear(counts):
    model = LogisticRegression(LRPreprocess.fit(counts, n_hvg=50), n_classes=4).eval()
    x = dense(counts[:8])
    assert model.embed_dim == 50
    assert torch.equal(model.embed(x), model.preprocess(x))  # g is the preprocessing only
    assert model(x).shape == (8, 4)
    assert [type(m) for m in model.head.modules()][1:] == [nn.Linear]


def test_actinn_layers_and_xavier_init(counts):
    torch.manual_seed(0)
    model = Actinn(ActinnPreprocess.fit(counts), n_classes=5).eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    sizes = [(m.in_features, m.out_features) for m in linears]
    n_in = model.preprocess.out_dim
    assert sizes == [(n_in, 100), (100, 50), (50, 25), (25, 5)]
    assert len(list(model.encoder.modules())) > 1 and model.embed_dim == 25
    for m in linears:
        bound = np.sqrt(6 / (m.in_features + m.out_features))
        assert m.weight.abs().max() <= bound and torch.all(m.bias == 0)
    x = dense(counts[:3])
    assert model(x).shape == (3, 5)
    assert (model.embed(x) >= 0).all()  # ReLU output


def test_sizes_are_parameters(counts):
    actinn = Actinn(ActinnPreprocess.fit(counts), 3, hidden_dims=(16, 8))
    assert actinn.embed_dim == 8
    scdae = ScDAE(ScdaePreprocess.fit(counts, n_hvg=60), 3, encoder_dims=(64, 32, 12),
                  classifier_dims=(10,), dropout=0.1)
    assert scdae.embed_dim == 12
    assert scdae.head.hidden_dims == [10]
    x = dense(counts[:4])
    assert scdae.decoder(scdae.embed(x)).shape == (4, 60)


def test_scdae_structure_and_modes(counts):
    torch.manual_seed(0)
    model = ScDAE(ScdaePreprocess.fit(counts, n_hvg=60), n_classes=3)
    assert model.encoder.dims == [1000, 500, 125]
    assert model.head.hidden_dims == [125, 125]
    assert model.encoder.noise_sd == 0.4
    assert any(isinstance(m, nn.BatchNorm1d) for m in model.encoder.modules())
    x = dense(counts[:6])
    model.eval()
    assert torch.equal(model.embed(x), model.embed(x))  # no noise, no dropout in eval
    recon = model.decoder(model.embed(x))
    assert recon.shape == (6, 60) and recon.min() >= 0 and recon.max() <= 1  # sigmoid
    model.train()
    assert not torch.equal(model.embed(x), model.embed(x))  # Gaussian input noise in training
    assert model(x).shape == (6, 3)
