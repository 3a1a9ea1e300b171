import numpy as np
import pytest
import scipy.sparse as sp
import torch

from cellcontrast.train.views import thinned_views


def test_views_thin_reads_and_drop_genes_but_never_add():
    rng = np.random.default_rng(0)
    X = sp.csr_matrix(rng.poisson(3.0, (200, 50)).astype(np.float32))
    a, b = thinned_views(X, 2, keep=0.5, dropout=0.2, seed=1)
    for view in (a, b):
        assert view.shape == X.shape and (view.toarray() <= X.toarray()).all()
        assert np.array_equal(view.data, np.rint(view.data))
        depth = np.asarray(view.sum(axis=1)).ravel() / np.asarray(X.sum(axis=1)).ravel()
        assert 0.3 < depth.mean() < 0.7  # about (0.5 + 1) / 2 x 0.8 of the reads kept
    assert (a != b).nnz > 0
    again = thinned_views(X, 1, keep=0.5, dropout=0.2, seed=1)[0]
    assert (again != a).nnz == 0  # seeded


def test_views_reach_the_component_and_change_what_it_learns():
    from cellcontrast.train.base_model import fit_base
    from cellcontrast.train.component import fit_component

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    X = sp.csr_matrix(rng.poisson(1.0 + 4.0 * (np.arange(30)[None, :] % 3 == y[:, None]), (120, 30)).astype(np.float32))
    base = fit_base(X, y, X, y, 3, "lr", {"n_hvg": 30}, seed=0, for_component=True)
    plain = fit_component(base, X, y, X, y, 3, "mlp", {"max_epochs": 2}, seed=0)[0]
    viewed = fit_component(base, X, y, X, y, 3, "mlp", {"max_epochs": 2, "views": 1}, seed=0)[0]
    w = lambda h: torch.cat([q.flatten() for q in h.parameters()])  # noqa: E731
    assert not torch.allclose(w(plain), w(viewed))


@pytest.mark.parametrize("bad", [{"view_positives": "cells"}, {"view_keep": 0.0}, {"view_dropout": 1.0}])
def test_bad_view_parameters_are_refused(bad):
    from cellcontrast.core.errors import InputError
    from cellcontrast.train.recipes import check_params

    with pytest.raises(InputError, match="view"):
        check_params({"mlp": bad})
