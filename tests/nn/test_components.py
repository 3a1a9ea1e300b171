"""Contrastive components: shapes, unit norms, batched MLS maps, gradients through the losses."""

import pytest
import torch
from torch import nn

from cellcontrast.nn.components import MLPComponent, MLSComponent

torch.set_num_threads(1)


def test_mlp_unit_norm_and_default_widths():
    torch.manual_seed(0)
    h = MLPComponent(25)
    assert (h.hidden_dim, h.out_dim) == (25, 25)  # R^d -> R^d, as in the paper
    out = h(torch.randn(10, 25) * 5)
    assert out.shape == (10, 25)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(10))
    assert [type(m) for m in h.net] == [nn.Linear, nn.ReLU, nn.Linear]
    wide = MLPComponent(2000)
    assert (wide.hidden_dim, wide.out_dim) == (256, 128)
    custom = MLPComponent(25, hidden_dim=7, out_dim=3)
    assert custom(torch.randn(2, 25)).shape == (2, 3)


def test_mls_shapes_and_unit_circles():
    torch.manual_seed(0)
    n_classes = 5
    h = MLSComponent(12, n_classes, hidden_dim=16)
    z = torch.randn(9, 12) * 3
    spaces = h.latent_spaces(z)
    assert spaces.shape == (9, n_classes, 2)
    torch.testing.assert_close(spaces.norm(dim=-1), torch.ones(9, n_classes))
    flat = h(z)
    assert flat.shape == (9, 2 * n_classes) and h.out_dim == 2 * n_classes
    torch.testing.assert_close(flat.reshape(9, n_classes, 2), spaces)  # block k is class k
    # All class maps come from one output layer (no per-class modules or loops).
    assert h.latent.out_features == 2 * n_classes
    assert sum(isinstance(m, nn.Linear) for m in h.modules()) == 2


def test_mls_class_spaces_are_distinct():
    torch.manual_seed(0)
    h = MLSComponent(8, 3)
    spaces = h.latent_spaces(torch.randn(4, 8))
    assert not torch.allclose(spaces[:, 0], spaces[:, 1])


@pytest.mark.parametrize("kind", ["mlp", "mls"])
def test_gradients_flow_through_the_losses(kind):
    from cellcontrast.nn.losses import mls_loss, supcon_loss

    torch.manual_seed(0)
    h = MLPComponent(6) if kind == "mlp" else MLSComponent(6, 3)
    loss_fn = supcon_loss if kind == "mlp" else mls_loss
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    loss = loss_fn(h.contrastive_features(torch.randn(6, 6)), labels, 0.1)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in h.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["mlp", "mls"])
def test_rebuild_from_config(kind):
    h = MLPComponent(6, 5, 4) if kind == "mlp" else MLSComponent(6, 3, 5)
    rebuilt = type(h)(**h.get_config())
    rebuilt.load_state_dict(h.state_dict())
    z = torch.randn(3, 6)
    assert torch.equal(h(z), rebuilt(z))


def test_mls_linear_and_per_class_branches():
    torch.manual_seed(0)
    linear = MLSComponent(12, 4, hidden_dim=-1)
    assert isinstance(linear.hidden, nn.Identity) and linear.latent.in_features == 12
    branched = MLSComponent(12, 4, hidden_dim=32, class_hidden_dim=16)
    assert branched.branch_w1.shape == (4, 32, 16) and branched.branch_w2.shape == (4, 16, 2)
    z = torch.randn(5, 12)
    for h in (linear, branched):
        spaces = h.latent_spaces(z)
        assert spaces.shape == (5, 4, 2)
        torch.testing.assert_close(spaces.norm(dim=-1), torch.ones(5, 4))
        rebuilt = MLSComponent(**h.get_config())
        rebuilt.load_state_dict(h.state_dict())
        assert torch.equal(h(z), rebuilt(z))
    # Branch k only depends on its own weights: perturbing class 0's weights moves space 0 only.
    before = branched.latent_spaces(z)
    with torch.no_grad():
        branched.branch_w2[0] += 1.0
    after = branched.latent_spaces(z)
    assert not torch.allclose(before[:, 0], after[:, 0])
    torch.testing.assert_close(before[:, 1:], after[:, 1:])
