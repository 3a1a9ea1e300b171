"""Inflating gzip chunks in threads gives exactly what h5py reads, or is not used at all."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import pytest

from cellcontrast.data.h5chunks import ChunkedGzipArray


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _dataset(tmp_path, values, **kwargs):
    f = h5py.File(tmp_path / "a.h5", "w")
    return f.create_dataset("x", data=values, **kwargs)


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.int64, ">f4"])
def test_in_order_ranges_equal_h5py(tmp_path, pool, dtype):
    values = np.random.default_rng(0).integers(0, 50, 1000).astype(dtype)
    dset = _dataset(tmp_path, values, chunks=(7,), compression="gzip")
    assert ChunkedGzipArray.supports(dset)
    array = ChunkedGzipArray(dset, pool)
    bounds = np.unique(np.r_[0, np.random.default_rng(1).integers(0, 1000, 40), 1000])
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):  # a CSR walk: ranges in order
        got = array.submit(lo, hi)()
        np.testing.assert_array_equal(got, values[lo:hi])
        assert (got.dtype.kind, got.dtype.itemsize) == (dset.dtype.kind, dset.dtype.itemsize)
        assert got.flags.writeable
    # Out of order and empty ranges too
    for lo, hi in [(990, 1000), (0, 3), (500, 500), (6, 8), (0, 1000)]:
        np.testing.assert_array_equal(array.submit(lo, hi)(), values[lo:hi])


def test_unwritten_chunks_read_as_fill_value(tmp_path, pool):
    f = h5py.File(tmp_path / "a.h5", "w")
    dset = f.create_dataset("x", shape=(100,), dtype=np.float32, chunks=(10,), compression="gzip",
                            fillvalue=3.0)
    dset[20:35] = np.arange(15)
    array = ChunkedGzipArray(dset, pool)
    np.testing.assert_array_equal(array.submit(0, 100)(), dset[:])


@pytest.mark.parametrize("kwargs", [
    {"chunks": (7,), "compression": "gzip", "shuffle": True},
    {"chunks": (7,), "compression": "lzf"},
    {"chunks": (7,), "compression": "gzip", "fletcher32": True},
    {"chunks": (7,)},
    {},
])
def test_other_storage_is_left_to_h5py(tmp_path, kwargs):
    dset = _dataset(tmp_path, np.arange(100, dtype=np.float32), **kwargs)
    assert not ChunkedGzipArray.supports(dset)


def test_two_dimensional_is_left_to_h5py(tmp_path):
    dset = _dataset(tmp_path, np.zeros((10, 10), np.float32), chunks=(5, 5), compression="gzip")
    assert not ChunkedGzipArray.supports(dset)


def test_inflates_with_zlib_ng_when_installed():
    # zlib-ng inflates the same bytes about twice as fast as zlib (bench/bench_inflate.py);
    # a silent fall back to zlib would cost annotate its lead over the read time
    zlib_ng = pytest.importorskip("zlib_ng.zlib_ng")
    import cellcontrast.data.h5chunks as h5chunks

    assert h5chunks.inflate is zlib_ng.decompress
