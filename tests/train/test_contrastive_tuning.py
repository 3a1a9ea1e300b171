"""The encoder fine-tuned under CE + a contrastive term (`train.contrastive_tuning`): the term
acts, its cross-batch positives never pair an anchor with its own batch, the same seed gives
the same weights, and the exported graph is the base's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellcontrast.data.atlas import prepare_atlas
from cellcontrast.data.simulate import simulate_atlas
from cellcontrast.train.base_model import fit_base
from cellcontrast.train.contrastive_tuning import ContrastiveTuned

SCDAE = {"n_hvg": 60, "encoder_dims": [32, 16, 8], "classifier_dims": [8, 8], "ae_epochs": 1,
         "classifier_epochs": 3, "finetune_epochs": 0, "min_steps": 0}


@pytest.fixture(scope="module")
def cells():
    atlas = prepare_atlas(simulate_atlas(n_cells=600, n_types=4, n_genes=100, n_individuals=2, seed=5))
    y = atlas.obs["cell_type"].astype("category").cat.codes.to_numpy().astype(np.int64)
    groups = atlas.obs["individual"].astype(str).to_numpy()
    return atlas.X[:500], y[:500], atlas.X[500:], y[500:], groups[:500]


def _encoder_weights(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.encoder.parameters()])


def test_the_contrastive_term_changes_the_encoder_and_the_same_seed_the_same_weights(cells):
    x, y, xv, yv, groups = cells
    plain = fit_base(x, y, xv, yv, 4, "scdae", SCDAE, seed=0)
    tuned = fit_base(x, y, xv, yv, 4, "scdae", {**SCDAE, "contrastive_weight": 1.0, "positives": "cross_batch"},
                     seed=0, train_groups=groups)
    again = fit_base(x, y, xv, yv, 4, "scdae", {**SCDAE, "contrastive_weight": 1.0, "positives": "cross_batch"},
                     seed=0, train_groups=groups)
    assert not torch.allclose(_encoder_weights(plain), _encoder_weights(tuned))
    assert torch.equal(_encoder_weights(tuned), _encoder_weights(again))
    # the projection is discarded: the fitted model holds the plain base's parameters, no more
    assert [n for n, _ in tuned.named_parameters()] == [n for n, _ in plain.named_parameters()]


def test_actinn_takes_the_term_too(cells):
    x, y, xv, yv, _ = cells
    recipe = {"hidden_dims": [16, 8], "epochs": 2, "min_steps": 0}
    plain = fit_base(x, y, xv, yv, 4, "actinn", recipe, seed=0)
    tuned = fit_base(x, y, xv, yv, 4, "actinn", {**recipe, "contrastive_weight": 0.5}, seed=0)
    assert not torch.allclose(_encoder_weights(plain), _encoder_weights(tuned))


def test_cross_batch_positives_never_come_from_the_anchors_batch():
    torch.manual_seed(0)
    encoder, head = torch.nn.Linear(5, 4), torch.nn.Linear(4, 2)
    y = np.array([0, 0, 1, 1, 0, 1])
    one_batch_a_type = np.array(["a", "a", "b", "b", "a", "b"])  # every type in one batch only
    net = ContrastiveTuned(encoder, head, 4, y, weight=1.0, temperature=0.5, groups=one_batch_a_type)
    net.train()
    x, index = torch.randn(6, 5), torch.arange(6)
    net(x)
    assert float(net.contrastive_loss(x, index)) == 0.0  # no positive from another batch
    by_label = ContrastiveTuned(encoder, head, 4, y, weight=1.0, temperature=0.5)
    by_label.train()
    by_label(x)
    assert float(by_label.contrastive_loss(x, index)) > 0.0


@pytest.mark.parametrize("bad", [{"contrastive_weight": -1.0}, {"positives": "donors"}])
def test_bad_contrastive_settings_are_refused(bad):
    from cellcontrast.train.recipes import resolve_params

    with pytest.raises(ValueError):
        resolve_params("scdae", bad)


def test_a_list_of_weights_is_chosen_on_validation_and_recorded(cells, monkeypatch):
    from cellcontrast.model.fit import base_choices
    from cellcontrast.model.grouped import refit_params
    from cellcontrast.train import base_model

    x, y, xv, yv, groups = cells
    seen = []
    real = base_model.rank_scores

    def spy(scores):
        seen.append(real(scores))
        return seen[-1]

    monkeypatch.setattr(base_model, "rank_scores", spy)
    model = fit_base(x, y, xv, yv, 4, "scdae", {**SCDAE, "contrastive_weight": [0.0, 1.0]}, seed=0,
                     train_groups=groups)
    assert len(seen) == 2  # one fit per weight, each scored on validation
    chosen = model.train_params["contrastive_weight"]
    assert chosen == (1.0 if seen[1] > seen[0] else 0.0)  # the better on validation, the first on a tie
    assert base_choices(model) == {"contrastive_weight": chosen}
    # a grouped refit takes the folds' most frequent weight, with nothing left to choose
    fixed = refit_params("scdae", {"scdae": {"contrastive_weight": [0.0, 1.0]}},
                         [{"contrastive_weight": 1.0}, {"contrastive_weight": 1.0}, {"contrastive_weight": 0.0}])
    assert fixed["scdae"]["contrastive_weight"] == 1.0
