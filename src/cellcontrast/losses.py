"""Supervised contrastive losses (paper eq. 1 and eq. 2).

Both losses are computed by one private function, :func:`_supcon_from_features`, which takes
unit-norm embeddings ``z[..., B, D]`` with any leading batch shape: the single-space loss
(MLP-CL, eq. 1) has no leading dimension, the multi-latent-space loss (MLS-CL, eq. 2) has one
of size ``C`` (one latent space per class), so all ``C`` spaces go through one batched matmul
to a ``[C, B, B]`` similarity tensor and no Python loop over classes.

Speed (``bench/bench_mls_loss.py``): the ``[C, B, B]`` tensor is the only large one; it is
allocated once and then worked on in place (a fresh 50 MB CPU buffer costs about as much as
the whole arithmetic, page faults), it is stabilised by a bound rather than a row maximum so
that it stays symmetric (see :class:`_MaskedLogSumExp`), and the numerator uses
``[B, B] @ [B, C * D]`` instead.

Numerics (DESIGN.md, "Numerics"):

* the denominator is a stabilised log-sum-exp: every logit has the bound ``max|z|^2 / tau``
  (or, for tiny temperatures, the row maximum over ``a != i``) subtracted before ``exp``, so
  no term exceeds 1; the self-pair is removed by zeroing its term (or its logit set to
  ``-inf``), never by multiplying a mask into a sum that could hold ``inf``;
* the numerator only involves positive pairs ``p != i``, whose logits are finite, so the sum of
  log-probabilities over positives is ``sum_p logit_ip - |P(i)| * lse_i`` and never touches
  the masked diagonal;
* anchors without a positive in the batch get weight zero; the loss is divided by the number of
  anchors that have one (or returns a graph-carrying zero when no anchor has one).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["mls_loss", "supcon_loss"]


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def _check_labels(labels: Tensor, batch: int) -> Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.shape[0] != batch:
        raise ValueError(f"labels must have shape [{batch}], got {tuple(labels.shape)}")
    return labels


# Below this value of 2 * max|z|^2 / tau every term exp((z_i . z_a - max|z|^2) / tau) is at least
# exp(-80) > float32's smallest normal (1.2e-38): the row sums cannot underflow.
_MAX_SPREAD = 80.0


class _MaskedLogSumExp(torch.autograd.Function):
    """``lse[..., i] = log sum_{a != i} exp(z_i . z_a / tau)`` for ``z[..., B, D]``, ``B >= 2``.

    The leading dimensions are flattened to one batch dimension ``N`` and all ``N`` spaces are
    computed together in exactly one ``[N, B, B]`` buffer, worked on in place.

    Stabiliser: with ``m = max_a |z_a|^2`` (1 for unit-norm features), every logit is at most
    ``m / tau`` (Cauchy-Schwarz), so subtracting that one constant bounds every term by 1,
    as the row maximum would, and keeps the buffer ``E`` symmetric. Symmetry lets backward
    use one matmul ``E @ [z, w z]`` for ``dz_i = w_i sum_a E_ia z_a + sum_a w_a E_ai z_a``
    (``w = grad / (tau s)``, ``s`` the row sums), and the forward needs no max pass: four
    passes over the buffer in all against nine for the row-max version. Where the terms could
    underflow (``2 m / tau > 80``, tiny temperatures) the row maximum over ``a != i`` is
    subtracted instead, and backward takes two matmuls. Either way every entry lies in
    ``[0, 1]``, each row sum is positive and its log finite; nothing is multiplied by a
    mask after an ``exp``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, inv_tau: float) -> Tensor:
        batch, dim = z.shape[-2], z.shape[-1]
        zc = z.reshape(-1, batch, dim).contiguous()
        max_sq = float(zc.square().sum(dim=-1).max())
        symmetric = 2.0 * max_sq * inv_tau <= _MAX_SPREAD
        if symmetric:
            # One matmul writes the shifted logits (z_i . z_a - m) / tau: an extra coordinate
            # (-m / tau on the left, 1 on the right) adds the shift without another pass.
            ones = torch.ones(*zc.shape[:-1], 1, dtype=z.dtype, device=z.device)
            left = torch.cat((zc * inv_tau, ones * (-max_sq * inv_tau)), dim=-1)
            right = torch.cat((zc, ones), dim=-1).transpose(1, 2)
            expd = torch.bmm(left, right)
            expd.exp_()
            expd.diagonal(dim1=-2, dim2=-1).zero_()
            row_sum = expd.sum(dim=-1, keepdim=True)
            lse = row_sum.log() + max_sq * inv_tau
        else:
            expd = torch.empty(zc.shape[0], batch, batch, dtype=z.dtype, device=z.device)
            expd.baddbmm_(zc, zc.transpose(1, 2), beta=0.0, alpha=inv_tau)
            expd.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
            row_max = expd.amax(dim=-1, keepdim=True)  # finite: each row has B - 1 >= 1 entries
            expd.sub_(row_max).exp_()
            row_sum = expd.sum(dim=-1, keepdim=True)
            lse = row_sum.log() + row_max
        ctx.save_for_backward(zc, expd, row_sum)
        ctx.inv_tau = inv_tau
        ctx.symmetric = symmetric
        ctx.z_shape = z.shape
        return lse.reshape(z.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        zc, expd, row_sum = ctx.saved_tensors
        w = grad.reshape(row_sum.shape) * ctx.inv_tau / row_sum  # [N, B, 1]
        dim = zc.shape[-1]
        if ctx.symmetric:  # E_ai = E_ia: both sums in one pass over E
            both = torch.bmm(expd, torch.cat((zc, w * zc), dim=-1))  # [N, B, 2D]
            grad_z = w * both[..., :dim] + both[..., dim:]
        else:
            grad_z = w * torch.bmm(expd, zc)
            wz_t = (w * zc).transpose(1, 2).contiguous()  # [N, D, B]
            grad_z += torch.bmm(wz_t, expd).transpose(1, 2)  # sum_a w_a E_ai z_a
        return grad_z.reshape(ctx.z_shape), None


def _sum_over_positives(z: Tensor, pos: Tensor) -> Tensor:
    """``out[..., i, :] = sum_p pos[i, p] z[..., p, :]`` as one ``[B, B] @ [B, rest]`` matmul."""
    batch = z.shape[-2]
    flat = z.movedim(-2, 0).reshape(batch, -1)
    summed = pos @ flat
    return summed.reshape(z.movedim(-2, 0).shape).movedim(0, -2)


def _supcon_from_features(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (eq. 1) for every leading index of ``z[..., B, D]``.

    Args:
        z: ``[..., B, D]`` unit-norm embeddings; the leading dimensions are independent
            latent spaces that share ``labels`` (none for eq. 1, ``[C]`` for eq. 2).
        labels: ``[B]`` integer labels.
        temperature: ``tau > 0``.

    Returns:
        ``[...]`` loss per leading index: for every anchor with at least one positive, the mean
        over its positives ``p`` of ``-(z_i . z_p / tau - log sum_{a != i} exp(z_i . z_a / tau))``,
        averaged over those anchors. A graph-carrying zero where no anchor has a positive.
    """
    tau = _check_temperature(temperature)
    if z.dim() < 2:
        raise ValueError(f"features must have shape [..., B, D], got {tuple(z.shape)}")
    batch = z.shape[-2]
    labels = _check_labels(labels, batch).to(z.device)
    zero = z.sum(dim=(-2, -1)) * 0.0
    if batch < 2:
        return zero  # no anchor can have a positive (nor a denominator)

    eye = torch.eye(batch, dtype=torch.bool, device=z.device)
    pos = (labels[:, None] == labels[None, :]) & ~eye  # [B, B], p != i
    n_pos = pos.sum(dim=-1)  # [B]
    has_pos = n_pos > 0
    n_anchors = int(has_pos.sum())
    if n_anchors == 0:
        return zero

    # log of the denominator, stabilised and with the self-pair masked out: [..., B]
    lse = _MaskedLogSumExp.apply(z, 1.0 / tau)
    # sum over positives of the logits z_i . z_p / tau: [..., B] (no [.., B, B] tensor)
    pos_logit_sum = (z * _sum_over_positives(z, pos.to(z.dtype))).sum(dim=-1) / tau
    n_pos_f = n_pos.to(z.dtype)
    sum_log_prob = pos_logit_sum - n_pos_f * lse
    mean_log_prob = sum_log_prob / n_pos_f.clamp(min=1.0)  # anchors without positives: 0
    weights = has_pos.to(z.dtype) / n_anchors
    return -(mean_log_prob * weights).sum(dim=-1)


def supcon_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss of paper eq. 1 (Khosla et al. 2020, ``L_out``).

    Args:
        features: ``[B, D]`` embeddings, already L2-normalised.
        labels: ``[B]`` integer labels.
        temperature: ``tau > 0``.

    Returns:
        Scalar loss averaged over the anchors that have at least one positive in the batch.
    """
    if features.dim() != 2:
        raise ValueError(f"features must have shape [B, D], got {tuple(features.shape)}")
    return _supcon_from_features(features, labels, temperature)


def mls_loss(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Multi-latent-space contrastive loss of paper eq. 2.

    Args:
        features: ``[B, C, 2]`` one unit-norm 2-D embedding per class latent space.
        labels: ``[B]`` integer labels.
        temperature: ``tau > 0``.

    Returns:
        Scalar: the sum over the ``C`` latent spaces of the eq. 1 loss computed in each space
        alone; all spaces are computed in one batched matmul (``[C, B, B]`` similarities).
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape [B, C, 2], got {tuple(features.shape)}")
    per_space = features.transpose(0, 1)  # [C, B, 2], a view
    return _supcon_from_features(per_space, labels, temperature).sum()
