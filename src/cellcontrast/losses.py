"""Supervised contrastive losses (paper eq. 1 and eq. 2).

Both losses are computed by one private function, :func:`_supcon_from_features`, which takes
unit-norm embeddings ``z[..., B, D]`` with any leading batch shape: the single-space loss
(MLP-CL, eq. 1) has no leading dimension, the multi-latent-space loss (MLS-CL, eq. 2) has one
of size ``C`` (one latent space per class), so all ``C`` spaces go through one batched matmul
to a ``[C, B, B]`` similarity tensor and no Python loop over classes.

Speed (``bench/bench_mls_loss.py``): the ``[C, B, B]`` tensor is the only large one; it is
allocated once and then worked on in place (a fresh 50 MB CPU buffer costs about as much as
the whole arithmetic, page faults), and the numerator uses ``[B, B] @ [B, C * D]`` instead.

Numerics (DESIGN.md, "Numerics"):

* the self-pair is removed from the denominator by setting its logit to ``-inf`` before the
  log-sum-exp, which subtracts the row maximum over ``a != i`` before exponentiating; nothing
  is ever multiplied by a mask after an ``exp``;
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


class _MaskedLogSumExp(torch.autograd.Function):
    """``lse[..., i] = log sum_{a != i} exp(z_i . z_a / tau)`` for ``z[..., B, D]``, ``B >= 2``.

    The leading dimensions are flattened to one batch dimension ``N`` and all ``N`` spaces are
    computed together. Exactly one ``[N, B, B]`` buffer is allocated; every step works in place
    on it: ``baddbmm`` writes the logits ``z_i . z_a / tau``, the diagonal (self-pair) is set
    to ``-inf``, the row maximum over ``a != i`` is subtracted and ``exp`` taken, so every
    entry lies in ``[0, 1]`` and each row sum in ``[1, B - 1]`` (its log is finite). The
    buffer ``E`` and the row sums ``s`` are kept for backward, which needs two batched
    matmuls and no further ``[N, B, B]`` tensor:
    ``dz_i = w_i sum_a E_ia z_a + sum_a w_a E_ai z_a`` with ``w = grad / (tau s)``.
    (Fresh large buffers are costly on CPU, which is why nothing else of that size is made.)
    """

    @staticmethod
    def forward(ctx, z: Tensor, inv_tau: float) -> Tensor:
        batch, dim = z.shape[-2], z.shape[-1]
        zc = z.reshape(-1, batch, dim).contiguous()
        expd = torch.empty(zc.shape[0], batch, batch, dtype=z.dtype, device=z.device)
        expd.baddbmm_(zc, zc.transpose(1, 2), beta=0.0, alpha=inv_tau)
        expd.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
        row_max = expd.amax(dim=-1, keepdim=True)  # finite: each row has B - 1 >= 1 entries
        expd.sub_(row_max).exp_()
        row_sum = expd.sum(dim=-1, keepdim=True)
        ctx.save_for_backward(zc, expd, row_sum)
        ctx.inv_tau = inv_tau
        ctx.z_shape = z.shape
        lse = row_sum.log() + row_max
        return lse.reshape(z.shape[:-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        zc, expd, row_sum = ctx.saved_tensors
        w = grad.reshape(row_sum.shape) * ctx.inv_tau / row_sum  # [N, B, 1]
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
