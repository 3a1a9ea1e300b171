"""Time the batched MLS loss (paper eq. 2) against two per-class loops.

Run: ``python bench/bench_mls_loss.py [--classes 50] [--batch 512] [--tau 0.1] [--threads 1]``

Three variants do forward + backward on CPU on the same random unit-norm features and labels:

* ``batched``: :func:`cellcontrast.losses.mls_loss`, all ``C`` spaces in one ``[C, B, B]`` pass;
* ``textbook loop``: what one writes from eq. 2 without batching: a Python loop over the ``C``
  class spaces, each the usual masked SupCon computation (logits, row max, self-mask, ``exp``
  times mask, log-probabilities, positive-mask mean; the form of Khosla et al.'s reference);
* ``supcon_loss loop``: a loop over classes of our own single-space ``supcon_loss``, which
  already has the in-place kernel: this isolates what batching the classes alone gains.

After a few warm-up runs the median over repeats is reported, with the speed-ups. All three
loss values must agree to 1e-4 relative (the script exits non-zero otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cellcontrast.nn.losses import mls_loss, supcon_loss


def batched(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    features.grad = None
    loss = mls_loss(features, labels, tau)
    loss.backward()
    return loss.detach()


def textbook_supcon(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Eq. 1 in one space, written the usual way with dense masks (the loop's body)."""
    batch = z.shape[0]
    logits = z @ z.T / tau
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(batch, dtype=torch.bool)
    positives = (labels[:, None] == labels[None, :]) & not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(dim=1, keepdim=True))
    n_pos = positives.sum(dim=1)
    has_pos = n_pos > 0
    mean_log_prob_pos = (positives * log_prob).sum(dim=1)[has_pos] / n_pos[has_pos]
    return -mean_log_prob_pos.mean()


def textbook_loop(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    features.grad = None
    loss = sum(textbook_supcon(features[:, k, :], labels, tau) for k in range(features.shape[1]))
    loss.backward()
    return loss.detach()


def naive_loop(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    features.grad = None
    loss = sum(supcon_loss(features[:, k, :], labels, tau) for k in range(features.shape[1]))
    loss.backward()
    return loss.detach()


def median_time(fn, *args, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tau", type=float, default=0.1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    feats = torch.randn(args.batch, args.classes, 2, generator=gen)
    feats = F.normalize(feats, dim=-1).requires_grad_()
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)

    value_batched = batched(feats, labels, args.tau)
    grad_batched = feats.grad.clone()
    value_naive = naive_loop(feats, labels, args.tau)
    grad_err = (grad_batched - feats.grad).abs().max().item()
    value_textbook = textbook_loop(feats, labels, args.tau)
    grad_err = max(grad_err, (grad_batched - feats.grad).abs().max().item())
    rel = max(abs(value_batched - v).item() / max(abs(v.item()), 1e-12)
              for v in (value_naive, value_textbook))

    t_batched = median_time(
        batched, feats, labels, args.tau, warmup=args.warmup, repeats=args.repeats
    )
    t_naive = median_time(
        naive_loop, feats, labels, args.tau, warmup=args.warmup, repeats=args.repeats
    )
    t_textbook = median_time(
        textbook_loop, feats, labels, args.tau, warmup=args.warmup, repeats=args.repeats
    )

    print(
        f"mls_loss forward+backward, CPU, {args.threads} thread(s): C={args.classes} "
        f"B={args.batch} tau={args.tau}, median of {args.repeats} after {args.warmup} warm-up"
    )
    print(
        f"loss batched={value_batched.item():.6f} textbook={value_textbook.item():.6f} "
        f"supcon_loop={value_naive.item():.6f} max_rel_diff={rel:.2e} max_grad_diff={grad_err:.2e}"
    )
    print(f"batched mls_loss:            {t_batched * 1e3:9.2f} ms")
    print(f"textbook per-class loop:     {t_textbook * 1e3:9.2f} ms   speed-up {t_textbook / t_batched:6.2f}x")
    print(f"supcon_loss per-class loop:  {t_naive * 1e3:9.2f} ms   speed-up {t_naive / t_batched:6.2f}x")
    if rel > 1e-4:
        print("ERROR: the batched and looped losses differ by more than 1e-4 relative", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
