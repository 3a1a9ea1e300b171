"""Tests for the supervised contrastive losses (paper eq. 1 and eq. 2)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellcontrast.nn.losses import mls_loss, supcon_loss

torch.set_num_threads(1)


# ---------------------------------------------------------------- slow, obvious reference
def ref_supcon(features: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    """Eq. 1 with explicit loops over anchors, positives and the denominator, in float64."""
    z = features.detach().double().tolist()
    y = labels.tolist()
    n = len(y)

    def dot(i: int, j: int) -> float:
        return sum(a * b for a, b in zip(z[i], z[j], strict=True))

    per_anchor = []
    for i in range(n):
        positives = [p for p in range(n) if p != i and y[p] == y[i]]
        if not positives:
            continue
        others = [a for a in range(n) if a != i]
        denom = sum(math.exp(dot(i, a) / tau) for a in others)
        terms = [-math.log(math.exp(dot(i, p) / tau) / denom) for p in positives]
        per_anchor.append(sum(terms) / len(terms))
    if not per_anchor:
        return 0.0
    return sum(per_anchor) / len(per_anchor)


def ref_mls(features: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    """Eq. 2: explicit loop over the class latent spaces."""
    return sum(ref_supcon(features[:, k, :], labels, tau) for k in range(features.shape[1]))


def unit(shape: tuple[int, ...], seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def labels_for(b: int, n_classes: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, n_classes, (b,), generator=g)


# ---------------------------------------------------------------- agreement with reference
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("b", [2, 7, 32])
@pytest.mark.parametrize("n_classes", [2, 5, 40])  # 40: most anchors have no positive
def test_supcon_matches_reference(seed, b, n_classes):
    tau = [0.07, 0.3, 1.0][seed]
    z = unit((b, 6), seed)
    y = labels_for(b, n_classes, seed)
    got = supcon_loss(z, y, tau)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_supcon(z, y, tau), rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("b", [2, 7, 32])
def test_mls_matches_reference(seed, b):
    tau = [0.05, 0.2, 0.9][seed]
    c = 4
    z = unit((b, c, 2), seed)
    y = labels_for(b, 3, seed)
    got = mls_loss(z, y, tau)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_mls(z, y, tau), rel=1e-5, abs=1e-8)


def test_float32_matches_reference():
    z = unit((32, 3, 2), 5, dtype=torch.float32)
    y = labels_for(32, 4, 5)
    assert mls_loss(z, y, 0.1).item() == pytest.approx(ref_mls(z, y, 0.1), rel=1e-5)
    z2 = unit((32, 8), 6, dtype=torch.float32)
    assert supcon_loss(z2, y, 0.1).item() == pytest.approx(ref_supcon(z2, y, 0.1), rel=1e-5)


def test_some_anchors_without_positive_get_zero_weight():
    # anchors 3 and 4 (labels 7 and 8) have no positive: the loss is the mean over 0, 1, 2
    z = unit((5, 4), 3)
    y = torch.tensor([1, 1, 1, 7, 8])
    got = supcon_loss(z, y, 0.2).item()
    assert got == pytest.approx(ref_supcon(z, y, 0.2), rel=1e-6)
    # moving the lonely anchors changes the denominators but they still add no term
    assert math.isfinite(got) and got > 0


@pytest.mark.parametrize("loss", ["supcon", "mls"])
def test_no_positive_gives_graph_carrying_zero(loss):
    y = torch.arange(6)  # all labels distinct
    if loss == "supcon":
        z = unit((6, 4), 0).requires_grad_()
        out = supcon_loss(z, y, 0.1)
    else:
        z = unit((6, 3, 2), 0).requires_grad_()
        out = mls_loss(z, y, 0.1)
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert z.grad is not None and torch.all(z.grad == 0)


def test_batch_of_one():
    z = unit((1, 4), 0).requires_grad_()
    out = supcon_loss(z, torch.tensor([3]), 0.01)
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(z.grad).all()
    z2 = unit((1, 5, 2), 0).requires_grad_()
    out2 = mls_loss(z2, torch.tensor([0]), 0.01)
    out2.backward()
    assert out2.item() == 0.0 and torch.isfinite(z2.grad).all()


# ---------------------------------------------------------------- gradients
def test_gradients_match_finite_differences():
    z = unit((7, 3), 11).requires_grad_()
    y = torch.tensor([0, 0, 1, 1, 1, 2, 3])
    assert torch.autograd.gradcheck(lambda t: supcon_loss(t, y, 0.3), (z,))
    z2 = unit((6, 3, 2), 12).requires_grad_()
    y2 = torch.tensor([0, 1, 0, 1, 2, 2])
    assert torch.autograd.gradcheck(lambda t: mls_loss(t, y2, 0.2), (z2,))


def test_gradients_finite_extreme_cases():
    cases = [
        torch.zeros(8, dtype=torch.long),  # all labels identical
        torch.arange(8),  # all distinct
        torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]),
    ]
    base = unit((8, 4, 2), 4, dtype=torch.float32)
    dup = base.clone()
    dup[1:4] = dup[0]  # duplicated identical rows
    anti = base.clone()
    anti[1] = -anti[0]  # antipodal pair with tau = 0.01
    for feats in (base, dup, anti):
        for y in cases:
            for tau in (0.01, 0.1, 1.0):
                z = feats.clone().requires_grad_()
                out = mls_loss(z, y, tau)
                out.backward()
                assert torch.isfinite(out) and torch.isfinite(z.grad).all()
                z1 = feats[:, 0, :].clone().requires_grad_()
                out1 = supcon_loss(z1, y, tau)
                out1.backward()
                assert torch.isfinite(out1) and torch.isfinite(z1.grad).all()


def test_tiny_temperature_matches_reference():
    # logits up to 1 / 0.01 = 100: a naive exp in float32 would overflow
    z = unit((16, 2, 2), 8, dtype=torch.float32)
    y = labels_for(16, 3, 8)
    got = mls_loss(z, y, 0.01).item()
    assert math.isfinite(got)
    assert got == pytest.approx(ref_mls(z, y, 0.01), rel=1e-4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    labels=st.lists(st.integers(0, 3), min_size=1, max_size=40),
    tau=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
    mls=st.booleans(),
)
def test_property_finite_for_any_batch(labels, tau, seed, mls):
    y = torch.tensor(labels)
    b = len(labels)
    shape = (b, 3, 2) if mls else (b, 5)
    z = unit(shape, seed, dtype=torch.float32)
    if b > 2 and seed % 2:
        z[1] = z[0]  # duplicated rows
    z.requires_grad_()
    out = mls_loss(z, y, tau) if mls else supcon_loss(z, y, tau)
    out.backward()
    assert torch.isfinite(out)
    # each term is -log(p) >= 0, up to float32 rounding of logits as large as 1/tau (per space)
    assert out.item() >= -(1e-6 / tau) * (3 if mls else 1)
    assert torch.isfinite(z.grad).all()
    # and it is eq. 1 / eq. 2 as written: the slow loop over anchors and positives agrees
    z64 = z.detach().double()
    fast = (mls_loss(z64, y, tau) if mls else supcon_loss(z64, y, tau)).item()
    slow = ref_mls(z64, y, tau) if mls else ref_supcon(z64, y, tau)
    assert fast == pytest.approx(slow, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------- sanity
def test_clustered_embedding_has_lower_loss():
    n_classes, per_class = 4, 5
    y = torch.arange(n_classes).repeat_interleave(per_class)
    clustered = torch.eye(n_classes, dtype=torch.float64)[y]  # same class identical, orthogonal
    clustered = torch.cat([clustered, torch.zeros(len(y), 2, dtype=torch.float64)], dim=1)
    random = unit((len(y), n_classes + 2), 9)
    for tau in (0.05, 0.1, 0.5):
        assert supcon_loss(clustered, y, tau) < supcon_loss(random, y, tau)


def test_mls_is_sum_of_per_space_supcon():
    z = unit((32, 6, 2), 13, dtype=torch.float32)
    y = labels_for(32, 6, 13)
    total = mls_loss(z, y, 0.1)
    per_space = sum(supcon_loss(z[:, k, :], y, 0.1) for k in range(6))
    torch.testing.assert_close(total, per_space, rtol=1e-5, atol=1e-6)
    # gradients agree as well
    za = z.clone().requires_grad_()
    zb = z.clone().requires_grad_()
    mls_loss(za, y, 0.1).backward()
    sum(supcon_loss(zb[:, k, :], y, 0.1) for k in range(6)).backward()
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-4, atol=1e-6)



def plain_autograd_mls(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 2 written with dense masks and torch.logsumexp, differentiated by autograd."""
    z = features.transpose(0, 1)  # [C, B, 2]
    b = z.shape[1]
    logits = z @ z.transpose(1, 2) / tau
    eye = torch.eye(b, dtype=torch.bool)
    lse = torch.logsumexp(logits.masked_fill(eye, float("-inf")), dim=-1)  # [C, B]
    pos = (labels[:, None] == labels[None, :]) & ~eye
    n_pos = pos.sum(dim=-1)
    has_pos = n_pos > 0
    mean_pos = (logits * pos).sum(dim=-1)[:, has_pos] / n_pos[has_pos]
    return -(mean_pos - lse[:, has_pos]).mean(dim=-1).sum()


@pytest.mark.parametrize("tau", [0.2, 0.005])  # bound stabiliser; row-max fallback
@pytest.mark.parametrize("grad_enabled", [True, False])
def test_mls_chunked_over_spaces_matches_plain_autograd(monkeypatch, tau, grad_enabled):
    import cellcontrast.nn.losses as losses

    b, c = 24, 11
    # 3 spaces a chunk: 4 chunks, the last one short
    monkeypatch.setattr(losses, "_CHUNK_ELEMENTS", 3 * b * b + 5)
    y = labels_for(b, 4, 21)
    y[-1] = 99  # one anchor without a positive
    z = unit((b, c, 2), 21)
    z_ref = z.clone().requires_grad_()
    expected = plain_autograd_mls(z_ref, y, tau)
    expected.backward()
    z_got = z.clone().requires_grad_()
    with torch.set_grad_enabled(grad_enabled):
        got = mls_loss(z_got, y, tau)
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-10, atol=1e-10)
    if grad_enabled:
        (got * 2.5).backward()  # backward scales the gradient formed in forward
        torch.testing.assert_close(z_got.grad, 2.5 * z_ref.grad, rtol=1e-9, atol=1e-12)
    else:
        assert not got.requires_grad

def test_rejects_bad_inputs():
    z = unit((4, 3), 0)
    with pytest.raises(ValueError):
        supcon_loss(z, torch.tensor([0, 1, 0, 1]), 0.0)
    with pytest.raises(ValueError):
        supcon_loss(z, torch.tensor([0, 1]), 0.1)
    with pytest.raises(ValueError):
        mls_loss(z, torch.tensor([0, 1, 0, 1]), 0.1)
