"""Inflate the gzip chunks of a query's CSR arrays with the standard library's zlib and with
zlib-ng (what `cellcontrast.data.h5chunks` uses), on one and on two threads.

    python bench/bench_inflate.py data/query_1m.h5ad [--chunks 400]

Reading a gzip-compressed query is mostly inflating: this isolates that step. Each
inflater's output is checked against zlib's, byte for byte.
"""

from __future__ import annotations

import argparse
import functools
import time
import zlib
from concurrent.futures import ThreadPoolExecutor


def inflaters() -> dict:
    found = {"zlib": zlib.decompress}
    try:
        from zlib_ng import zlib_ng

        found["zlib-ng"] = zlib_ng.decompress
    except ImportError:
        print("zlib-ng is not installed: only zlib measured")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("query", help="an .h5ad whose X is a gzip-chunked CSR matrix")
    p.add_argument("--chunks", type=int, default=400, help="chunks of each of X/data and X/indices")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (the median is printed)")
    args = p.parse_args(argv)

    import h5py

    with h5py.File(args.query, "r") as f:
        raws = []
        for name in ("X/data", "X/indices"):
            ds = f[name]
            n = min(args.chunks, -(-ds.shape[0] // ds.chunks[0]))
            raws += [ds.id.read_direct_chunk((i * ds.chunks[0],))[1] for i in range(n)]
            bufsize = ds.chunks[0] * ds.dtype.itemsize
    expected = [zlib.decompress(r) for r in raws]
    inflated_mb = sum(map(len, expected)) / 1e6
    print(f"{len(raws)} chunks, {sum(map(len, raws)) / 1e6:.1f} MB compressed, {inflated_mb:.1f} MB inflated")
    print(f"{'inflater':10} {'threads':>7} {'seconds':>8} {'MB/s':>7}")
    for name, inflate in inflaters().items():
        for threads in (1, 2):
            times = []
            for _ in range(args.repeats):
                with ThreadPoolExecutor(threads) as pool:
                    started = time.perf_counter()
                    out = list(pool.map(functools.partial(inflate, bufsize=bufsize), raws))
                    times.append(time.perf_counter() - started)
                if out != expected:
                    raise SystemExit(f"{name} inflated different bytes from zlib")
            seconds = sorted(times)[len(times) // 2]
            print(f"{name:10} {threads:>7} {seconds:>8.3f} {inflated_mb / seconds:>7.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
