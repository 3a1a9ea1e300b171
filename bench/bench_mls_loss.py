"""Time the batched MLS loss (paper eq. 2) against a naive per-class loop of ``supcon_loss``.

Run: ``python bench/bench_mls_loss.py [--classes 50] [--batch 512] [--tau 0.1] [--threads 1]``

Both variants do forward + backward on CPU on the same random unit-norm features and random
labels; after a few warm-up runs the median over repeats is reported, with the speed-up ratio.
The two loss values must agree to 1e-4 relative (the script exits non-zero otherwise).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from cellcontrast.losses import mls_loss, supcon_loss


def batched(features: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    features.grad = None
    loss = mls_loss(features, labels, tau)
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
    rel = abs(value_batched - value_naive).item() / max(abs(value_naive.item()), 1e-12)
    grad_err = (grad_batched - feats.grad).abs().max().item()

    t_batched = median_time(
        batched, feats, labels, args.tau, warmup=args.warmup, repeats=args.repeats
    )
    t_naive = median_time(
        naive_loop, feats, labels, args.tau, warmup=args.warmup, repeats=args.repeats
    )

    print(
        f"mls_loss forward+backward, CPU, {args.threads} thread(s): C={args.classes} "
        f"B={args.batch} tau={args.tau}, median of {args.repeats} after {args.warmup} warm-up"
    )
    print(
        f"loss batched={value_batched.item():.6f} naive={value_naive.item():.6f} rel_diff={rel:.2e} "
        f"max_grad_diff={grad_err:.2e}"
    )
    print(f"batched mls_loss:        {t_batched * 1e3:9.2f} ms")
    print(f"naive per-class loop:    {t_naive * 1e3:9.2f} ms")
    print(f"speed-up (naive/batched): {t_naive / t_batched:8.2f}x")
    if rel > 1e-4:
        print("ERROR: batched and naive losses differ by more than 1e-4 relative", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
