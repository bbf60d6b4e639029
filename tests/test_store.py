"""Direct reads of uncompressed local Zarr chunks (dmlkit._store) against zarr's own."""
from __future__ import annotations

import os

import dask
import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_array_equal

import dmlkit
from dmlkit import _store, data


def _array(path, values, chunk_rows, **kw):
    kw.setdefault("compressors", None)
    a = zarr.create_array(str(path), shape=values.shape, dtype=values.dtype,
                          chunks=(chunk_rows,) + values.shape[1:], zarr_format=3, **kw)
    a[...] = values
    return a


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "bool"])
def test_rows_read_directly_are_zarrs_rows(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((50, 3)) * 100).astype(dtype)
    a = _array(tmp_path / "a.zarr", values, chunk_rows=7)  # 7 full chunks and a ragged one
    source = _store.source_of(a)
    assert source is not None and source.shape == (50, 3) and source.chunk_rows == 7
    for start, stop in [(0, 50), (3, 20), (7, 14), (49, 50), (10, 10), (13, 15)]:
        out = np.empty((stop - start, 3), dtype=dtype)
        source.read_into(start, out)
        assert_array_equal(out, a[start:stop])
    with pytest.raises(IndexError, match="outside"):
        source.read_into(45, np.empty((6, 3), dtype=dtype))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), chunk_rows=st.integers(1, 25), data=st.data())
def test_any_range_of_any_chunking_reads_zarrs_rows(tmp_path_factory, n, chunk_rows, data):
    values = np.arange(n * 2, dtype=np.float32).reshape(n, 2) * 0.5
    a = _array(tmp_path_factory.mktemp("h") / "a.zarr", values, chunk_rows=chunk_rows)
    start = data.draw(st.integers(0, n))
    stop = data.draw(st.integers(start, n))
    out = np.full((stop - start, 2), np.nan, dtype=np.float32)
    _store.source_of(a).read_into(start, out)
    assert_array_equal(out, values[start:stop])


def test_one_dimensional_arrays_and_the_dot_separator(tmp_path):
    values = np.arange(23, dtype=np.float32)
    a = _array(tmp_path / "v.zarr", values, chunk_rows=5,
               chunk_key_encoding={"name": "default", "separator": "."})
    source = _store.source_of(a)
    assert source is not None and source.chunk_file(2).endswith("c.2")
    out = np.empty(14, dtype=np.float32)
    source.read_into(4, out)
    assert_array_equal(out, values[4:18])


def test_a_chunk_never_written_reads_as_the_fill_value(tmp_path):
    a = zarr.create_array(str(tmp_path / "f.zarr"), shape=(20, 2), dtype="float32",
                          chunks=(5, 2), compressors=None, fill_value=2.5, zarr_format=3)
    a[5:10] = np.ones((5, 2), dtype=np.float32)  # chunk 1 only
    assert not os.path.exists(tmp_path / "f.zarr" / "c" / "0" / "0")
    source = _store.source_of(a)
    out = np.empty((20, 2), dtype=np.float32)
    source.read_into(0, out)
    assert_array_equal(out, a[:])
    assert out[0, 0] == 2.5 and out[5, 0] == 1.0


def test_a_store_a_worker_cannot_see_is_an_error_not_fill_values(tmp_path):
    a = _array(tmp_path / "gone.zarr", np.ones((10, 4), dtype=np.float32), chunk_rows=5)
    source = _store.source_of(a)
    os.rename(tmp_path / "gone.zarr", tmp_path / "elsewhere.zarr")
    with pytest.raises(FileNotFoundError, match="no Zarr array here"):
        source.read_into(0, np.empty((5, 4), dtype=np.float32))


def test_a_truncated_chunk_file_is_an_error_that_names_it(tmp_path):
    a = _array(tmp_path / "t.zarr", np.ones((10, 4), dtype=np.float32), chunk_rows=5)
    chunk = tmp_path / "t.zarr" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:40])  # 2.5 rows of 5
    with pytest.raises(OSError, match="shorter"):
        _store.source_of(a).read_into(5, np.empty((5, 4), dtype=np.float32))


def test_only_plain_local_row_chunked_v3_arrays_qualify(tmp_path):
    values = np.ones((40, 4), dtype=np.float32)
    assert _store.source_of(_array(tmp_path / "plain.zarr", values, 10)) is not None
    compressed = _array(tmp_path / "zstd.zarr", values, 10, compressors="auto")
    by_columns = zarr.create_array(str(tmp_path / "cols.zarr"), shape=(40, 4), dtype="float32",
                                   chunks=(10, 2), compressors=None)
    sharded = zarr.create_array(str(tmp_path / "shard.zarr"), shape=(40, 4), dtype="float32",
                                chunks=(10, 4), shards=(20, 4), compressors=None)
    v2 = zarr.create_array(str(tmp_path / "v2.zarr"), shape=(40, 4), dtype="float32",
                           chunks=(10, 4), compressors=None, zarr_format=2)
    swapped = zarr.create_array(str(tmp_path / "be.zarr"), shape=(40, 4), dtype="float32",
                                chunks=(10, 4), compressors=None,
                                serializer=zarr.codecs.BytesCodec(endian="big"))
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), shape=(40, 4), dtype="float32",
                                  chunks=(10, 4), compressors=None)
    for a in (compressed, by_columns, sharded, v2, swapped, in_memory):
        assert _store.source_of(a) is None, a
    assert _store.source_of(np.ones((3, 3))) is None  # not a zarr array at all


def test_with_rows_reuses_its_buffer_unless_a_view_survives(tmp_path):
    values = np.arange(60, dtype=np.float32).reshape(20, 3)
    source = _store.source_of(_array(tmp_path / "b.zarr", values, chunk_rows=8))
    seen = []
    total = _store.with_rows(source, 0, 10, lambda x: (seen.append(x.ctypes.data), x.sum())[1])
    assert total == values[:10].sum()
    _store.with_rows(source, 2, 12, lambda x: seen.append(x.ctypes.data))
    assert seen[0] == seen[1]  # the same memory, read again
    kept = _store.with_rows(source, 0, 10, lambda x: x[3:5])  # a view of the buffer
    after = _store.with_rows(source, 10, 20, lambda x: x.copy())
    assert_array_equal(kept, values[3:5])  # not overwritten by the next read
    assert_array_equal(after, values[10:20])
    with pytest.raises(ZeroDivisionError):
        _store.with_rows(source, 0, 4, lambda x: 1 / 0)
    assert_array_equal(_store.with_rows(source, 4, 8, lambda x: x.copy()), values[4:8])


def test_open_zarr_marks_x_for_direct_reads_only_when_it_can(tmp_path):
    from dmlkit.datasets import make_blobs
    from tests.conftest import write_store

    plain = make_blobs(tmp_path / "plain.zarr", 300, 4, centers=3, chunk_rows=70, random_state=0)
    source = dmlkit.open_zarr(plain).X.data._dmlkit_source
    assert source.root == os.path.abspath(os.path.join(plain, "X"))
    assert data.as_matrix(plain)._dmlkit_source == source
    zstd = write_store(tmp_path / "zstd.zarr", np.ones((300, 4), dtype=np.float32), chunk_rows=70)
    assert getattr(dmlkit.open_zarr(zstd).X.data, "_dmlkit_source", None) is None
    # anything computed from X is read through its graph
    assert getattr(data.as_matrix(plain) * 2, "_dmlkit_source", None) is None


def test_fits_read_directly_and_give_the_bits_of_zarrs_reads(tmp_path, monkeypatch):
    """Streamed passes read each block into a reused buffer, a cached copy into new
    arrays; both see the rows zarr would give."""
    from dmlkit import LogisticRegression
    from dmlkit.datasets import make_classification

    path = make_classification(tmp_path / "c.zarr", 3_000, 5, chunk_rows=700, random_state=1)
    reads, loads = [], []
    streamed, cached = _store.with_rows, _store.read_block
    monkeypatch.setattr(_store, "with_rows", lambda *a: reads.append(a[1:3]) or streamed(*a))

    def read_block(source, block_info=None, convert=None):
        loads.append(1)
        return cached(source, block_info=block_info, convert=convert)

    monkeypatch.setattr(_store, "read_block", read_block)

    def fits():
        with dask.config.set(scheduler="sync"):
            return (dmlkit.KMeans(3, random_state=0, cache=False).fit(path),
                    LogisticRegression(solver="newton", cache=False).fit(path),
                    dmlkit.KMeans(3, random_state=0, cache=True).fit(path))

    km, lr, km_cached = fits()
    assert (0, 700) in reads and (2800, 3000) in reads and km.n_passes_ + lr.n_passes_ > 5
    assert len(loads) == 5  # the cached copy's 5 blocks, read once
    monkeypatch.setattr(_store, "source_of", lambda array: None)
    reads.clear()
    loads.clear()
    km_zarr, lr_zarr, km_cached_zarr = fits()
    assert reads == [] and loads == []
    for ours, theirs in ((km, km_zarr), (km_cached, km_cached_zarr)):
        assert_array_equal(ours.cluster_centers_, theirs.cluster_centers_)
        assert ours.inertia_ == theirs.inertia_
    assert_array_equal(lr.coef_, lr_zarr.coef_)
    assert_array_equal(lr.intercept_, lr_zarr.intercept_)


def test_a_cached_copy_for_kmeans_is_read_straight_into_fortran_order(tmp_path, monkeypatch):
    """Chunks the cache keeps as they are (8 MiB and up) are read into the reused buffer and
    copied once into Fortran order; joined chunks are made so after joining."""
    from dmlkit.datasets import make_blobs

    rows = data.CACHE_MIN_BLOCK_BYTES // (16 * 4)
    path = make_blobs(tmp_path / "b.zarr", 3 * rows, 16, chunk_rows=rows, random_state=0)
    converted = []
    cached = _store.read_block

    def read_block(source, block_info=None, convert=None):
        converted.append(convert is not None)
        return cached(source, block_info=block_info, convert=convert)

    monkeypatch.setattr(_store, "read_block", read_block)
    expect = np.asarray(zarr.open_group(str(path), mode="r")["X"][...])
    with dask.config.set(scheduler="sync"):
        for wanted in (True, False):
            converted.clear()
            X, _, kept = data.cache(data.as_matrix(path), [], True, path, feature_major=wanted)
            assert kept and converted == [wanted] * 3
            assert (_layouts(X) == wanted).all()
            assert_array_equal(X.compute(), expect)
        small = make_blobs(tmp_path / "s.zarr", 20_000, 16, chunk_rows=500, random_state=0)
        X, _, _ = data.cache(data.as_matrix(small), [], True, small, feature_major=True)
        assert X.numblocks[0] < 40 and _layouts(X).all()  # joined, then copied
        assert_array_equal(X.compute(), zarr.open_group(str(small), mode="r")["X"][...])


def _layouts(X):
    """Whether each block of ``X`` is feature-major, as the kernels see it."""
    from dmlkit._kernels.kmeans import feature_major

    return X.map_blocks(lambda b: np.full((1, 1), feature_major(b)), dtype=bool,
                        chunks=((1,) * X.numblocks[0], (1,))).compute().ravel()
