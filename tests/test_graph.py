"""The tree-reduction layer: shape of the graph, determinism, one compute per pass."""
from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from dmlkit import _graph
from dmlkit._kernels.kmeans import add


def _sum_rows(X, w, offset, scale=1.0):
    return X.sum(axis=0, dtype=np.float64) * scale


def _offsets(X, w, offset):
    return [(offset, X.shape[0])]


def _concat(a, b):
    return a + b


@pytest.mark.parametrize("split_every", [2, 3, 8, 100])
@pytest.mark.parametrize("chunks", [1, 7, 50, (10, 1, 39, 50)])
def test_reduce_equals_numpy(split_every, chunks):
    X = np.arange(200.0).reshape(100, 2)
    Xd = da.from_array(X, chunks=(chunks, 2))
    blocks = _graph.RowBlocks(Xd)
    out = blocks.reduce(_sum_rows, add, {"scale": 2.0}, split_every)
    (res,) = _graph.compute(out)
    assert_allclose(res, 2 * X.sum(0))


def test_offsets_and_fixed_order():
    Xd = da.from_array(np.zeros((100, 1)), chunks=((10, 1, 39, 50), 1))
    (res,) = _graph.compute(_graph.RowBlocks(Xd).reduce(_offsets, _concat, {}, 2))
    assert res == [(0, 10), (10, 1), (11, 39), (50, 50)]


def test_tree_depth_follows_split_every():
    Xd = da.from_array(np.zeros((64, 1)), chunks=(1, 1))
    out = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {}, 4)
    levels = [k[1] for k in out.dask if isinstance(k, tuple) and "-combine-" in k[0]]
    # 64 -> 16 -> 4 as tasks; the last combine (4 -> 1) runs where it is computed
    assert sorted(set(levels)) == [0, 1]
    assert len(levels) == 16 + 4
    assert len(out.__dask_keys__()) == 4


def test_single_input_groups_get_no_task():
    Xd = da.from_array(np.zeros((10, 1)), chunks=(1, 1))
    out = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {}, 3)
    combines = [k for k in out.dask if isinstance(k, tuple) and "-combine-" in k[0]]
    assert len(combines) == 3 + 1  # 10 -> 3 tasks + 1 passed up -> 1 + 1 passed up
    assert len(out.__dask_keys__()) == 2


def test_few_blocks_need_no_combine_task():
    Xd = da.from_array(np.arange(8.0)[:, None], chunks=(1, 1))
    out = _graph.RowBlocks(Xd).reduce(_offsets, _concat, {}, 8)
    assert not [k for k in out.dask if isinstance(k, tuple) and "-combine-" in k[0]]
    (res,) = _graph.compute(out)
    assert res == [(i, 1) for i in range(8)]  # folded in block order


def test_trees_of_different_shape_have_different_keys():
    Xd = da.from_array(np.zeros((20, 1)), chunks=(1, 1))
    blocks = _graph.RowBlocks(Xd)
    keys = {dask.base.tokenize(blocks.reduce(_sum_rows, add, {}, s)) for s in (2, 3, 4)}
    keys.add(dask.base.tokenize(blocks.reduce(_sum_rows, _concat, {}, 2)))
    assert len(keys) == 4


def test_large_parameters_enter_the_graph_once():
    big = np.ones(10_000)
    assert big.nbytes > _graph.INLINE_PARAMS_BYTES
    Xd = da.from_array(np.zeros((100, 1)), chunks=(10, 1))
    out = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {"scale": 1.0, "payload": big}, 2)
    dsk = dict(out.dask)
    holders = [k for k in dsk if isinstance(k, str) and k.startswith("dict-")]
    assert len(holders) == 1
    maps = [k for k in dsk if isinstance(k, tuple) and "-map-" in k[0]]
    assert len(maps) == 10
    assert all(holders[0] in dask.core.get_dependencies(dsk, k) for k in maps)


def test_small_parameters_travel_inside_tasks():
    Xd = da.from_array(np.ones((100, 2)), chunks=(10, 2))
    out = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {"scale": np.float64(3.0)}, 2)
    dsk = dict(out.dask)
    assert not [k for k in dsk if isinstance(k, str) and k.startswith("dict-")]
    (res,) = _graph.compute(out)
    assert_allclose(res, [300.0, 300.0])


def test_same_graph_keys_for_same_inputs():
    Xd = da.from_array(np.zeros((100, 1)), chunks=(10, 1))
    a = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {"scale": 1.0})
    b = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {"scale": 1.0})
    c = _graph.RowBlocks(Xd).reduce(_sum_rows, add, {"scale": 2.0})
    assert a.__dask_keys__() == b.__dask_keys__() != c.__dask_keys__()


def test_sample_weight_blocks_follow_rows():
    X = np.arange(20.0).reshape(10, 2)
    w = np.arange(10.0)
    blocks = _graph.RowBlocks(da.from_array(X, chunks=(3, 2)), da.from_array(w, chunks=3))

    def weighted(X, w, offset):
        return (X * w[:, None]).sum(0)

    (res,) = _graph.compute(blocks.reduce(weighted, add))
    assert_allclose(res, (X * w[:, None]).sum(0))


def test_passes_fuse_stats_into_first_pass_only():
    X = np.arange(20.0).reshape(10, 2)
    seen = []
    passes = _graph.Passes(_graph.RowBlocks(da.from_array(X, chunks=(4, 2))), None,
                           check=seen.append)
    first = passes.run(_sum_rows, add, {})
    second = passes.run(_sum_rows, add, {"scale": 3.0})
    assert_allclose(first, X.sum(0))
    assert_allclose(second, 3 * X.sum(0))
    assert len(seen) == 1 and seen[0].n_rows == 10
    assert passes.count == 2


def test_map_rows_is_lazy_blockwise():
    X = da.from_array(np.arange(12.0).reshape(6, 2), chunks=(4, 2))
    out = _graph.map_rows(X, lambda b, shift: b.sum(1) + shift, {"shift": 1.0}, np.float64)
    assert out.chunks == ((4, 2),)
    assert_array_equal(out.compute(), np.arange(12.0).reshape(6, 2).sum(1) + 1)


def test_split_every_validation():
    assert _graph.check_split_every(None) == 8
    for bad in (1, 0, 2.5, True, "4"):
        with pytest.raises(ValueError, match="split_every"):
            _graph.check_split_every(bad)


def test_unaligned_blocks_are_aligned_before_the_kernel():
    # a block received from another worker can start at any byte of the message
    raw = bytearray(1 + 40 * 4)
    X = np.frombuffer(raw, dtype=np.float32, offset=1).reshape(20, 2)
    X[:] = np.arange(40, dtype=np.float32).reshape(20, 2)
    assert not X.flags.aligned
    seen = []

    def kernel(Xb, w, offset):
        seen.append(Xb.flags.aligned)
        return Xb.sum(axis=0, dtype=np.float64)

    fixed = _graph.aligned(X)
    assert fixed.flags.aligned and fixed.flags.c_contiguous
    assert_array_equal(fixed, X)
    assert _graph.aligned(fixed) is fixed  # aligned arrays pass through
    out = _graph._map_block(X, {}, kernel=kernel, offsets=np.array([0]), has_w=False,
                            block_id=(0, 0))
    assert seen == [True]
    assert_allclose(out, X.astype(np.float64).sum(0))


def _weighted_target_sums(X, w, offset, y=None):
    return np.concatenate([(X * w[:, None]).sum(0, dtype=np.float64),
                           [float(np.dot(w, y)), float(offset)]])


@pytest.mark.parametrize("split_every", [2, 3, 8])
def test_grouped_passes_give_the_bits_of_the_tree(split_every):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, 3)).astype(np.float32)
    w, y = rng.uniform(0.5, 2, 1000), rng.standard_normal(1000)

    def blocks(slots=None):
        Xd = da.from_array(X, chunks=(37, 3))  # 28 blocks
        if slots is not None:  # as dmlkit.data.persist_placed marks a cached copy
            Xd._dmlkit_slots = slots
        return _graph.RowBlocks(Xd, da.from_array(w, chunks=37), da.from_array(y, chunks=37))

    (plain,) = _graph.compute(blocks().reduce(_weighted_target_sums, add, {}, split_every))
    assert_allclose(plain[:3], (X * w[:, None]).sum(0), rtol=1e-6)
    runs = blocks([("a", 0)] * 10 + [("a", 1)] * 9 + [("b", 0)] * 9)
    assert runs.groups == [list(range(10)), list(range(10, 19)), list(range(19, 28))]
    interleaved = blocks([("a", 0), ("b", 0)] * 14)  # as the scheduler may have put them
    assert interleaved.groups == [list(range(0, 28, 2)), list(range(1, 28, 2))]
    for placed in (runs, interleaved):
        grouped = placed.reduce(_weighted_target_sums, add, {}, split_every)
        assert len(grouped.__dask_keys__()) == len(placed.groups)  # one task per thread
        (got,) = _graph.compute(grouped)
        assert_array_equal(got, plain)  # the same operations in the same order


def test_groups_send_their_whole_subtrees_not_every_block():
    def concat(a, b):
        return a + b

    records = {b: [b] for b in range(10, 19)}
    nodes = _graph.fold_held(records, list(range(10, 19)), 28, concat, 3)
    # blocks 12..17 form two level-1 nodes (9..11 is not held whole), 18 stays alone;
    # 9..17 would be a level-2 node but block 9 is not held
    assert nodes == {(0, 10): [10], (0, 11): [11], (1, 4): [12, 13, 14],
                     (1, 5): [15, 16, 17], (0, 18): [18]}
    whole = _graph.fold_held({b: [b] for b in range(28)}, list(range(28)), 28, concat, 3)
    # 28 -> 10 -> 4 -> 2 records: the level of 2 is the root's, its nodes are tasks' work
    assert whole == {(3, 0): list(range(27)), (3, 1): [27]}


def test_one_block_per_slot_needs_no_groups():
    assert _graph.groups_of([("a", 0), ("b", 0)]) is None
    assert _graph.groups_of(None) is None
    assert _graph.groups_of([("a", 0), ("a", 0), ("b", 0)]) == [[0, 1], [2]]


def _tile_sums(x, offset, q, *extra):
    """Per query: its row sum, plus the block's sum, plus the extra arrays' rows."""
    out = q.sum(axis=1) + x.sum()
    for e in extra:
        out = out + (e if e.ndim == 1 else e.sum(axis=1))
    return out


def _held(a: np.ndarray, rows: int) -> da.Array:
    """A dask array whose blocks are views of ``a`` (as a persisted array's are the
    workers' own arrays)."""
    return da.concatenate([da.from_delayed(dask.delayed(a[s : s + rows]),
                                           (min(rows, len(a) - s),) + a.shape[1:], a.dtype)
                           for s in range(0, len(a), rows)])


def test_tiles_hand_each_tile_its_blocks_without_a_copy():
    """A tile's data block, its rows' arrays and its queries are the graph's own arrays, not
    copies made per tile (a data block can be large, and every query block reads it)."""
    rng = np.random.default_rng(0)
    base, rows2d = rng.standard_normal((50, 3)), rng.standard_normal((50, 2))
    queries = rng.standard_normal((9, 3))
    seen = []

    def kernel(x, offset, q, *, side):
        seen.append(all(np.shares_memory(a, b) for a, b in
                        ((x, base), (q, queries), (side, rows2d))))
        return q.sum(axis=1) + x.sum() + side.sum()

    parts = _graph.tiles(_held(base, 20), [_held(queries, 5)], kernel, lambda a, b: a + b,
                         rows={"side": _held(rows2d, 20)})
    out = np.concatenate(dask.compute(*parts, scheduler="sync"))
    assert seen == [True] * 6  # 3 data blocks x 2 query blocks
    assert_allclose(out, 3 * queries.sum(axis=1) + base.sum() + rows2d.sum())


def test_tiles_take_whole_arrays_joined_inside_the_tile():
    """An array in other row chunks than the (single-block) queries reaches every tile
    whole, with no task of its own, and gives what a rechunked copy gives."""
    rng = np.random.default_rng(0)
    X = da.from_array(rng.standard_normal((50, 3)), chunks=(20, 3))
    Q = da.from_array(rng.standard_normal((9, 3)), chunks=(9, 3))
    side = da.from_array(rng.standard_normal((9, 2)), chunks=(4, 2))
    add_ = lambda a, b: a + b  # noqa: E731
    joined = _graph.tiles(X, [Q], _tile_sums, add_, whole=[side])
    rechunked = _graph.tiles(X, [Q, side.rechunk({0: 9})], _tile_sums, add_)
    (a,), (b,) = dask.compute(*joined), dask.compute(*rechunked)
    assert_allclose(a, b)
    assert_allclose(a, 3 * (Q.sum(axis=1) + side.sum(axis=1)).compute() + X.sum().compute())
    assert not any("rechunk" in str(k) for k in joined[0].__dask_graph__())
    # several whole arrays, each in row chunks of its own
    other = da.from_array(rng.standard_normal(9), chunks=(2, 2, 3, 2))
    (two,) = dask.compute(*_graph.tiles(X, [Q], _tile_sums, add_, whole=[side, other]))
    assert_allclose(two, a + 3 * other.compute())
    with pytest.raises(ValueError, match="one block"):
        _graph.tiles(X, [Q.rechunk(3)], _tile_sums, add_, whole=[side])


def test_kernels_run_on_one_blas_thread_and_the_process_gets_its_own_back():
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen = []

    def kernel(X, w, offset):
        seen.append(blas_threads())
        return X.sum(axis=0)

    blocks = _graph.RowBlocks(da.ones((40, 3), chunks=10))
    with threadpool_limits(2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip("BLAS does not take 2 threads here")
        for scheduler in ("sync", "threads"):
            with dask.config.set(scheduler=scheduler):
                (total,) = _graph.compute(blocks.reduce(kernel, add, {}))
            assert_array_equal(total, [40.0] * 3)
            assert blas_threads() == {2}  # restored once the kernels are done
    assert seen == [{1}] * 8
    # counted: an inner scope that ends leaves BLAS at one thread for the outer one
    with threadpool_limits(2, user_api="blas"):
        with _graph.one_blas_thread:
            with _graph.one_blas_thread:
                assert blas_threads() == {1}
            assert blas_threads() == {1}
        assert blas_threads() == {2}
