"""Supervised contrastive losses (paper eq. 1 and eq. 2).

Both losses are computed by one private function, :func:`_supcon_from_features`, which takes
unit-norm embeddings ``z[..., B, D]`` with any leading batch shape: the single-space loss
(MLP-CL, eq. 1) has no leading dimension, the multi-latent-space loss (MLS-CL, eq. 2) has one
of size ``C`` (one latent space per class), so the ``C`` spaces go through batched matmuls
(``[k, B, B]`` similarities for a chunk of ``k`` spaces at a time) and no Python loop over
classes.

Speed (``bench/bench_mls_loss.py``): the similarity buffer is the only large tensor. It holds
a cache-sized chunk of spaces and is reused for the next chunk (a fresh 50 MB CPU buffer per
call costs about as much as the whole arithmetic, in page faults); it is worked on in place,
stabilised by a bound rather than a row maximum so that it stays symmetric, and the gradient
is formed while the chunk is in cache (see :class:`_WeightedMaskedLogSumExp`). The numerator
uses ``[B, B] @ [B, C * D]`` instead.

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

# Spaces are processed in chunks whose [k, B, B] buffer holds about this many elements per torch
# thread (1 MiB of float32): the buffer then stays in the cores' L2 caches through every pass
# over it, and it is small enough for malloc to reuse heap memory instead of mapping (and
# page-faulting) fresh memory on each call, as a [C, B, B] buffer of 52 MB did (C = 50,
# B = 512: 2x slower in about one process in four).
_CHUNK_ELEMENTS = 1 << 18


class _WeightedMaskedLogSumExp(torch.autograd.Function):
    """``out[n] = sum_i c_i log sum_{a != i} exp(z_ni . z_na / tau)`` for ``z[N, B, D]``, ``B >= 2``.

    ``c[B]`` are constant anchor weights. Because the output is one number per space, the
    gradient of each space is fixed up to the scalar that backward receives: it is formed in
    the same pass as the value, chunk by chunk, while the chunk's ``[k, B, B]`` buffer is
    still in cache, and backward only scales it. No ``[N, B, B]`` tensor is kept.

    Stabiliser: with ``m = max_a |z_a|^2`` (1 for unit-norm features), every logit is at most
    ``m / tau`` (Cauchy-Schwarz), so subtracting that one constant bounds every term by 1,
    as the row maximum would, and keeps the buffer ``E`` symmetric: the gradient
    ``dz_i = w_i sum_a E_ia z_a + sum_a w_a E_ai z_a`` (``w = c / (tau s)``, ``s`` the row
    sums) is then one matmul ``E @ [z, w z]``, and the value needs no max pass. Where the
    terms could underflow (``2 m / tau > 80``, tiny temperatures) the row maximum over
    ``a != i`` is subtracted instead, and the gradient takes two matmuls. Either way every
    entry lies in ``[0, 1]``, each row sum is positive and its log finite; nothing is
    multiplied by a mask after an ``exp``.
    """

    @staticmethod
    def forward(ctx, z: Tensor, weights: Tensor, inv_tau: float, want_grad: bool) -> Tensor:
        n_spaces, batch, dim = z.shape
        max_sq = float(z.square().sum(dim=-1).max())
        symmetric = 2.0 * max_sq * inv_tau <= _MAX_SPREAD
        if symmetric:
            # One matmul writes the shifted logits (z_i . z_a - m) / tau: an extra coordinate
            # (-m / tau on the left, 1 on the right) adds the shift without another pass.
            ones = torch.ones(n_spaces, batch, 1, dtype=z.dtype, device=z.device)
            left = torch.cat((z * inv_tau, ones * (-max_sq * inv_tau)), dim=-1)
            right = torch.cat((z, ones), dim=-1).transpose(1, 2)
        # each thread works on its own part of a chunk, so a chunk can hold one L2's worth each
        per_chunk = max(1, _CHUNK_ELEMENTS * torch.get_num_threads() // (batch * batch))
        buffer = torch.empty(min(per_chunk, n_spaces), batch, batch, dtype=z.dtype, device=z.device)
        out = torch.empty(n_spaces, dtype=z.dtype, device=z.device)
        grad_z = torch.empty_like(z) if want_grad else None
        for start in range(0, n_spaces, per_chunk):
            stop = min(n_spaces, start + per_chunk)
            zc, expd = z[start:stop], buffer[: stop - start]
            if symmetric:
                torch.bmm(left[start:stop], right[start:stop], out=expd)
                expd.exp_()
                expd.diagonal(dim1=-2, dim2=-1).zero_()
                row_sum = expd.sum(dim=-1, keepdim=True)
                lse = row_sum.log() + max_sq * inv_tau
            else:
                expd.baddbmm_(zc, zc.transpose(1, 2), beta=0.0, alpha=inv_tau)
                expd.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
                row_max = expd.amax(dim=-1, keepdim=True)  # finite: each row has B - 1 >= 1 entries
                expd.sub_(row_max).exp_()
                row_sum = expd.sum(dim=-1, keepdim=True)
                lse = row_sum.log() + row_max
            out[start:stop] = (lse.squeeze(-1) * weights).sum(dim=-1)
            if want_grad:
                w = weights[:, None] * inv_tau / row_sum  # [k, B, 1]
                if symmetric:  # E_ai = E_ia: both sums in one pass over E
                    both = torch.bmm(expd, torch.cat((zc, w * zc), dim=-1))  # [k, B, 2D]
                    grad_z[start:stop] = w * both[..., :dim] + both[..., dim:]
                else:
                    grad_chunk = w * torch.bmm(expd, zc)
                    wz_t = (w * zc).transpose(1, 2).contiguous()  # [k, D, B]
                    grad_chunk += torch.bmm(wz_t, expd).transpose(1, 2)  # sum_a w_a E_ai z_a
                    grad_z[start:stop] = grad_chunk
        if want_grad:
            ctx.save_for_backward(grad_z)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        (grad_z,) = ctx.saved_tensors
        return grad[:, None, None] * grad_z, None, None, None


def _sum_over_positives(z: Tensor, pos: Tensor) -> Tensor:
    """``out[..., i, :] = sum_p pos[i, p] z[..., p, :]`` as one ``[B, B] @ [B, rest]`` matmul."""
    batch = z.shape[-2]
    flat = z.movedim(-2, 0).reshape(batch, -1)
    summed = pos @ flat
    return summed.reshape(z.movedim(-2, 0).shape).movedim(0, -2)


def _supcon_from_features(z: Tensor, labels: Tensor, temperature: float, groups: Tensor | None = None) -> Tensor:
    """Supervised contrastive loss (eq. 1) for every leading index of ``z[..., B, D]``.

    Args:
        z: ``[..., B, D]`` unit-norm embeddings; the leading dimensions are independent
            latent spaces that share ``labels`` (none for eq. 1, ``[C]`` for eq. 2).
        labels: ``[B]`` integer labels.
        temperature: ``tau > 0``.
        groups: ``[B]`` integer batch (donor, study) of each cell, or None. Given, an anchor's
            positives are the cells of its type from *other* batches only (cross-batch
            positives: what the embedding should hold together is the type across donors);
            cells of its type from its own batch stay in the denominator like any other cell.

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
    if groups is not None:  # cross-batch positives only
        groups = _check_labels(groups, batch).to(z.device)
        pos &= groups[:, None] != groups[None, :]
    n_pos = pos.sum(dim=-1)  # [B]
    has_pos = n_pos > 0
    n_anchors = int(has_pos.sum())
    if n_anchors == 0:
        return zero

    # sum over positives of the logits z_i . z_p / tau: [..., B] (no [.., B, B] tensor)
    pos_logit_sum = (z * _sum_over_positives(z, pos.to(z.dtype))).sum(dim=-1) / tau
    # For an anchor with positives, mean_p log prob = pos_logit_sum / |P(i)| - lse_i, so the
    # loss is -sum_i c_i pos_logit_sum_i / |P(i)| + sum_i c_i lse_i with c = has_pos / n_anchors.
    weights = has_pos.to(z.dtype) / n_anchors
    numerator = (pos_logit_sum * (weights / n_pos.to(z.dtype).clamp(min=1.0))).sum(dim=-1)
    # the log-denominators (stabilised, self-pair masked), weighted and summed per space
    flat = z.reshape(-1, batch, z.shape[-1]).contiguous()
    want_grad = torch.is_grad_enabled() and flat.requires_grad  # skip it for evaluation
    denominator = _WeightedMaskedLogSumExp.apply(flat, weights, 1.0 / tau, want_grad)
    return denominator.reshape(z.shape[:-2]) - numerator


def supcon_loss(features: Tensor, labels: Tensor, temperature: float, groups: Tensor | None = None) -> Tensor:
    """Supervised contrastive loss of paper eq. 1 (Khosla et al. 2020, ``L_out``).

    Args:
        features: ``[B, D]`` embeddings, already L2-normalised.
        labels: ``[B]`` integer labels.
        temperature: ``tau > 0``.
        groups: ``[B]`` batches: positives from other batches only (see `_supcon_from_features`).

    Returns:
        Scalar loss averaged over the anchors that have at least one positive in the batch.
    """
    if features.dim() != 2:
        raise ValueError(f"features must have shape [B, D], got {tuple(features.shape)}")
    return _supcon_from_features(features, labels, temperature, groups)


def mls_loss(features: Tensor, labels: Tensor, temperature: float, groups: Tensor | None = None) -> Tensor:
    """Multi-latent-space contrastive loss of paper eq. 2.

    Args:
        features: ``[B, C, 2]`` one unit-norm 2-D embedding per class latent space.
        labels: ``[B]`` integer labels.
        temperature: ``tau > 0``.
        groups: ``[B]`` batches: positives from other batches only.

    Returns:
        Scalar: the sum over the ``C`` latent spaces of the eq. 1 loss computed in each space
        alone; all spaces are computed in one batched matmul (``[C, B, B]`` similarities).
    """
    if features.dim() != 3:
        raise ValueError(f"features must have shape [B, C, 2], got {tuple(features.shape)}")
    per_space = features.transpose(0, 1)  # [C, B, 2], a view
    return _supcon_from_features(per_space, labels, temperature, groups).sum()
