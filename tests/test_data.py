"""The data layer: containers in, validated row-chunked dask arrays out."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from numpy.testing import assert_array_equal

from dmlkit import data, open_zarr
from tests.conftest import write_store


def test_open_zarr_gives_lazy_named_dataset(tmp_path):
    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    path = write_store(tmp_path / "s.zarr", X, y=np.arange(20), chunk_rows=6)
    ds = open_zarr(path)
    assert isinstance(ds, xr.Dataset)
    assert ds["X"].dims == ("sample", "feature") and ds["y"].dims == ("sample",)
    assert isinstance(ds["X"].data, da.Array)
    assert ds["X"].data.chunks == ((6, 6, 6, 2), (2,))
    assert ds["X"].dtype == np.float32
    assert_array_equal(ds["X"].values, X)


@pytest.mark.parametrize("obj", ["numpy", "dask", "dataarray", "dataset", "path"])
def test_as_matrix_accepts_every_container(tmp_path, obj):
    X = np.arange(40, dtype=np.float32).reshape(20, 2)
    path = write_store(tmp_path / "s.zarr", X, chunk_rows=6)
    inputs = {"numpy": X, "dask": da.from_array(X, chunks=6), "dataarray": open_zarr(path)["X"],
              "dataset": open_zarr(path), "path": path}
    out = data.as_matrix(inputs[obj])
    assert isinstance(out, da.Array) and out.dtype == np.float32
    assert out.numblocks[1] == 1
    assert_array_equal(out.compute(), X)


def test_numpy_is_wrapped_in_row_blocks():
    X = np.zeros((1_000_000, 8), dtype=np.float32)  # 32 MB -> two 16 MiB blocks
    out = data.as_matrix(X)
    assert out.chunks[1] == (8,) and len(out.chunks[0]) == 2


def test_feature_chunking_is_rechunked_once_with_a_warning():
    X = da.zeros((100, 6), chunks=(10, 2))
    with pytest.warns(data.ChunkingWarning, match="chunked along features"):
        out = data.as_matrix(X)
    assert out.chunks == ((10,) * 10, (6,))


def test_float32_is_not_upcast():
    X = np.ones((10, 2), dtype=np.float32)
    assert data.as_matrix(X).dtype == np.float32


@pytest.mark.parametrize("X, err, msg", [
    (np.zeros(5), ValueError, r"X should be 2-D .*got shape \(5,\)"),
    (np.zeros((2, 2, 2)), ValueError, "X should be 2-D"),
    (np.array([["a", "b"]]), TypeError, "X.dtype=<U1 is not numeric"),
    (np.zeros((0, 3)), ValueError, "at least 1 sample"),
    (np.zeros((3, 2), dtype=complex), TypeError, "not numeric"),
])
def test_as_matrix_errors(X, err, msg):
    with pytest.raises(err, match=msg):
        data.as_matrix(X)


def test_rows_must_align():
    X = data.as_matrix(da.zeros((10, 2), chunks=(4, 2)))
    y = data.as_rows(np.arange(10), X, "y")
    assert y.chunks == X.chunks[:1]
    with pytest.raises(ValueError, match="y has 9 rows but X has 10"):
        data.as_rows(np.arange(9), X, "y")
    with pytest.raises(ValueError, match=r"y should be 1-D .*\(10, 2\)"):
        data.as_rows(np.zeros((10, 2)), X, "y")


def test_cache_rule(tmp_path, monkeypatch):
    X = np.ones((100, 2))
    path = write_store(tmp_path / "s.zarr", X, chunk_rows=10)
    lazy = data.as_matrix(path)
    _, _, cached = data.cache(lazy, [None], "auto", path)
    assert cached
    monkeypatch.setattr(data, "memory_budget", lambda: 100)  # store is 1600 bytes
    Xc, _, cached = data.cache(lazy, [None], "auto", path)
    assert not cached and Xc is lazy
    _, _, cached = data.cache(lazy, [None], True, path)
    assert cached
    with pytest.raises(ValueError, match="cache='yes'"):
        data.cache(lazy, [None], "yes", path)


def test_open_zarr_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        open_zarr(tmp_path / "missing.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        open_zarr(tmp_path / "empty")


def test_cached_copy_is_reblocked_into_whole_chunks():
    X = da.zeros((1000, 4), chunks=(30, 4))
    # small chunks are joined: 1000 / CACHE_MIN_BLOCKS rows, rounded up to whole chunks
    assert data.CACHE_MIN_BLOCKS == 16
    assert data.cache_block_rows(X) == 90  # 12 blocks of 3 chunks, the last of 10 rows
    few = da.zeros((1000, 4), chunks=(300, 4))
    assert data.cache_block_rows(few) == 300  # fewer chunks than CACHE_MIN_BLOCKS: kept
    assert data.cache_block_rows(X, per_thread=2, threads=2) == 270
    with pytest.raises(ValueError, match="threads"):
        data.cache_block_rows(X, per_thread=2)
    chunky = da.zeros((10**6, 32), chunks=(10**5, 32), dtype="f4")  # 12.8 MB chunks stay
    assert data.cache_block_rows(chunky) == 10**5
    assert data.cache_block_rows(chunky, per_thread=1, threads=2) == 5 * 10**5
    assert data.cache_block_rows(X, per_thread=1, threads=1000) == 30  # never below a chunk
    small = da.zeros((10**6, 32), chunks=(10**3, 32), dtype="f4")  # 128 kB chunks
    assert data.cache_block_rows(small) * 32 * 4 <= data.CACHE_MIN_BLOCK_BYTES
    assert data.cache_block_rows(small) == 63_000  # 16 blocks: fewer than 8 MB would make
    big = da.zeros((10**8, 32), chunks=(10**5, 32), dtype="f4")
    rows = data.cache_block_rows(big)
    assert rows * 32 * 4 <= data.CACHE_BLOCK_BYTES and rows % 10**5 == 0
    Xc, _, cached = data.cache(X, [None], True, X)
    assert cached and len(Xc.chunks[0]) < len(X.chunks[0])


def test_while_X_streams_its_vectors_are_held_in_memory_unless_asked_not_to():
    X = da.from_array(np.ones((1000, 3), dtype=np.float32), chunks=(250, 3)) * 2
    y = da.arange(1000, chunks=250) + 1
    Xc, (yc, none), cached = data.cache(X, [y, None], False, X)
    assert not cached and none is None
    assert Xc.name == X.name  # X streams: still its graph
    assert all(isinstance(v, np.ndarray) for v in dict(yc.__dask_graph__()).values())
    assert_array_equal(yc.compute(), np.arange(1000) + 1)
    _, (lazy,), _ = data.cache(X, [y], False, X, vectors=False)
    assert lazy.name == y.name


@pytest.mark.parametrize("where, rows, nthreads, expected", [
    # 11 of 16 blocks on one of two workers: the last of its blocks move
    (["a"] * 6 + ["b"] * 5 + ["a"] * 5, [4] * 16, {"a": 1, "b": 1},
     ["a"] * 6 + ["b"] * 5 + ["a"] * 2 + ["b"] * 3),
    (["a"] * 8 + ["b"] * 8, [4] * 16, {"a": 1, "b": 1}, ["a"] * 8 + ["b"] * 8),  # even: stays
    (["a"], [9], {"a": 1, "b": 2}, ["a"]),  # one block: a thread works it wherever it is
    (["a", "a", "b"], [10, 10, 5], {"a": 2, "b": 2}, ["a", "a", "b"]),  # one block per thread
    (["a"] * 4, [1] * 4, {"a": 1, "b": 1, "c": 2}, ["a", "c", "c", "b"]),  # by threads
    (["a", "?"], [1, 1], {"a": 1, "b": 1}, ["a", "?"]),  # a holder the scheduler lost
])
def test_rebalanced_moves_the_blocks_that_shorten_the_longest_threads(where, rows, nthreads,
                                                                      expected):
    assert data.rebalanced(where, rows, nthreads) == expected
