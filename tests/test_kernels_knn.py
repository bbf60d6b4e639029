"""The nearest-neighbour kernels: exact top-k of a tile, its merge, the IVF scan."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from dmlkit._kernels import ivf as IVF
from dmlkit._kernels import knn as K


def reference(Q, X, k, metric="euclidean", offset=0):
    """Exact ranking distances in float64 and the k smallest, ties to the lower index."""
    Q = np.asarray(Q, dtype=np.float64)
    X = np.asarray(X, dtype=np.float64)
    if metric == "cosine":
        D = 1.0 - K.normalize_rows(Q) @ K.normalize_rows(X).T
    else:
        D = ((Q[:, None, :] - X[None, :, :]) ** 2).sum(-1)
    order = np.argsort(D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1), order + offset


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", K.METRICS)
@pytest.mark.parametrize("k", [1, 7, 40])
def test_brute_partial_equals_exact(dtype, metric, k):
    rng = np.random.default_rng(k)
    X = rng.standard_normal((3000, 9)).astype(dtype)
    Q = rng.standard_normal((300, 9)).astype(dtype)
    out = K.brute_partial(X, 100, K.prepare_queries(Q, metric), k=k, metric=metric)
    d, i = reference(Q, X, k, metric, offset=100)
    assert_array_equal(out.indices, i)
    assert_allclose(out.distances, d, rtol=1e-12, atol=1e-12)
    assert out.values is None


def test_float32_cancellation_does_not_reorder():
    """Rows far from the origin and near-ties: float32 ||x||^2 - 2 q.x alone would reorder them.

    The chunk is centred and the candidates re-ranked in float64, with a
    margin that bounds the float32 rounding, so the order is the exact one.
    """
    rng = np.random.default_rng(0)
    base = rng.standard_normal((2000, 16)) * 1e-2
    X = (base + 1e3).astype(np.float32)  # |x| ~ 4000, spread ~ 0.01
    Q = X[:200] + np.float32(1e-3)
    out = K.brute_partial(X, 0, K.prepare_queries(Q, "euclidean"), k=10, metric="euclidean")
    d, i = reference(Q, X, 10)
    assert_array_equal(out.indices, i)
    # the naive float32 expansion does reorder some of them
    Xn, Qn = X.astype(np.float32), Q.astype(np.float32)
    naive = (Xn * Xn).sum(1)[None, :] - 2 * Qn @ Xn.T
    assert not np.array_equal(np.argsort(naive, axis=1, kind="stable")[:, :10], i)


def test_chunk_with_fewer_rows_than_k_pads():
    X = np.arange(6, dtype=np.float64).reshape(3, 2)
    out = K.brute_partial(X, 10, np.zeros((2, 2)), k=5, metric="sqeuclidean",
                          y=np.array([7, 8, 9]))
    assert_array_equal(out.indices, [[10, 11, 12, -1, -1]] * 2)
    assert_array_equal(out.distances[:, 3:], np.inf)
    assert_allclose(out.distances[0, :3], [1.0, 13.0, 41.0])  # rows [0,1], [2,3], [4,5]
    assert_array_equal(out.values, [[7, 8, 9, 0, 0]] * 2)


def test_ties_go_to_the_lower_index():
    X = np.zeros((50, 3))
    X[::2] = 1.0  # two groups of 25 identical rows
    out = K.brute_partial(X, 0, np.zeros((1, 3)), k=30, metric="euclidean")
    assert_array_equal(out.indices[0], np.r_[np.arange(1, 50, 2), np.arange(0, 10, 2)])


def test_integer_and_zero_rows_cosine():
    X = np.array([[0, 0], [1, 0], [0, 2], [3, 3]], dtype=np.int64)
    Q = np.array([[1.0, 1.0], [0.0, 0.0]])
    out = K.brute_partial(X, 0, K.prepare_queries(Q, "cosine"), k=4, metric="cosine")
    # a zero row (or query) is at cosine distance 1 from everything, as in scikit-learn
    assert_allclose(out.distances[1], [1.0] * 4)
    assert_array_equal(out.indices[0], [3, 1, 2, 0])


def test_exact_k_equals_rows_and_query_groups():
    rng = np.random.default_rng(2)
    X = rng.standard_normal((40, 3))
    Q = rng.standard_normal((K.QUERY_GROUP + 5, 3))
    out = K.brute_partial(X, 0, Q, k=40, metric="sqeuclidean")
    d, i = reference(Q, X, 40)
    assert_array_equal(out.indices, i)


def _random_record(rng, n_queries, k, index_pool, continuous=False):
    if continuous:  # distinct distances, with a few exact ties put in
        d = rng.random((n_queries, k))
        tie = rng.random((n_queries, k)) < 0.3
        d[tie] = 0.5  # across records too
    else:
        d = rng.integers(0, 4, size=(n_queries, k)).astype(np.float64)
    d = np.sort(d, axis=1)
    i = np.stack([rng.choice(index_pool, k, replace=False) for _ in range(n_queries)])
    pad = rng.random((n_queries, k)) < 0.2
    d[pad], i[pad] = np.inf, -1
    order = np.lexsort((K._sort_key(i), d), axis=1)
    d, i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return K.Neighbors(d, i, i * 10)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.integers(1, 4), st.booleans())
def test_merge_is_associative_and_commutative(seed, k, n_queries, continuous):
    """With ties (small integer distances, or continuous ones with a few exact ties put in:
    the stable argsort and its lexsort fallback) and padding, any grouping gives the same
    bits."""
    rng = np.random.default_rng(seed)
    pools = np.array_split(rng.permutation(60), 3)  # disjoint rows, as chunks have
    a, b, c = (_random_record(rng, n_queries, k, p, continuous) for p in pools)
    left = K.merge_neighbors(K.merge_neighbors(a, b), c)
    right = K.merge_neighbors(a, K.merge_neighbors(b, c))
    swapped = K.merge_neighbors(c, K.merge_neighbors(b, a))
    for x, y, z in zip(left, right, swapped):
        assert_array_equal(x, y)
        assert_array_equal(x, z)
    # and equals the top-k of everything, ordered by (distance, index)
    d = np.concatenate([a.distances, b.distances, c.distances], axis=1)
    i = np.concatenate([a.indices, b.indices, c.indices], axis=1)
    order = np.lexsort((K._sort_key(i), d), axis=1)[:, :k]
    assert_array_equal(left.indices, np.take_along_axis(i, order, 1))
    assert_array_equal(left.values, left.indices * 10)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.lists(st.integers(1, 40), min_size=1, max_size=5),
       st.integers(1, 12))
def test_chunked_tiles_merge_to_the_exact_answer(seed, sizes, k):
    rng = np.random.default_rng(seed)
    X = rng.integers(-3, 4, size=(sum(sizes), 3)).astype(np.float32)  # many exact ties
    Q = rng.integers(-3, 4, size=(5, 3)).astype(np.float32)
    k = min(k, X.shape[0])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    parts = [K.brute_partial(X[o : o + s], int(o), Q, k=k, metric="sqeuclidean")
             for o, s in zip(offsets, sizes)]
    merged = parts[0]
    for p in parts[1:]:
        merged = K.merge_neighbors(merged, p)
    d, i = reference(Q, X, k)
    assert_array_equal(merged.indices, i)
    assert_array_equal(merged.distances, d)


def test_finalize_drops_self_like_sklearn():
    # rows 0..3 identical: query 3 (self) is not among its 3 nearest, so the first is dropped
    part = K.Neighbors(np.zeros((2, 3)), np.array([[0, 1, 2], [1, 4, 0]]), None)
    out = K.finalize(part, k=2, metric="euclidean", self_offset=3)
    assert_array_equal(out.indices, [[1, 2], [1, 0]])


def test_weights_like_sklearn():
    from sklearn.neighbors._base import _get_weights

    d = np.array([[0.0, 1.0, 2.0], [0.5, 1.0, 4.0]])
    assert_allclose(K.neighbor_weights(d.copy(), "distance"), _get_weights(d.copy(), "distance"))
    assert_allclose(K.neighbor_weights(d, lambda x: x**2), d**2)
    with pytest.raises(ValueError, match="returned shape"):
        K.neighbor_weights(d, lambda x: x[:, 0])


def test_check_finite_queries_names_the_row():
    Q = np.ones((5, 2))
    Q[3, 1] = np.nan
    with pytest.raises(ValueError, match="Q contains NaN or inf in row 13"):
        K.check_finite_queries(Q, 10)


@pytest.mark.parametrize("metric", K.METRICS)
def test_ivf_with_every_list_probed_is_exact(metric):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((1500, 6)).astype(np.float32) + 50
    Q = rng.standard_normal((120, 6)).astype(np.float32) + 50
    Xp = K.normalize_rows(X) if metric == "cosine" else X
    C = Xp[rng.choice(1500, 12, replace=False)].astype(np.float64)
    order, lists, counts = IVF.sort_block(X, centroids=C, metric=metric)
    assert counts.sum() == 1500 and np.all(np.diff(lists) >= 0)
    Qp = K.prepare_queries(Q, metric)
    probes = IVF.probes_block(Qp, 0, centroids=C, n_probe=12)
    out = IVF.ivf_partial(X[order], 0, Qp, probes, lists=lists, index=order.astype(np.int64),
                          k=8, metric=metric, centroids=C, y=order * 2)
    d, i = reference(Q, X, 8, metric)
    assert_array_equal(out.indices, i)
    assert_allclose(out.distances, d, rtol=1e-10, atol=1e-12)
    assert_array_equal(out.values, i * 2)


def test_ivf_probes_nearest_first_and_partial_scan():
    rng = np.random.default_rng(1)
    C = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    X = np.concatenate([c + rng.standard_normal((100, 2)) for c in C])
    probes = IVF.probes_block(np.array([[9.0, 1.0]]), 0, centroids=C, n_probe=2)
    assert_array_equal(probes, [[1, 0]])
    order, lists, _ = IVF.sort_block(X, centroids=C, metric="euclidean")
    out = IVF.ivf_partial(X[order], 0, np.array([[9.0, 1.0]]), probes[:, :1], lists=lists,
                          index=order.astype(np.int64), k=5, metric="euclidean", centroids=C)
    assert np.all((out.indices >= 100) & (out.indices < 200))  # only list 1 was scanned


def test_ivf_long_lists_and_many_queries_go_in_pieces(monkeypatch):
    """A list longer than LIST_ROWS, probed by more than LIST_QUERIES queries: same answer."""
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.standard_normal((700, 4)), 20 + rng.standard_normal((60, 4))])
    Q = rng.standard_normal((90, 4))
    C = np.array([[0.0] * 4, [20.0] * 4])
    order, lists, _ = IVF.sort_block(X, centroids=C, metric="euclidean")
    probes = IVF.probes_block(Q, 0, centroids=C, n_probe=2)
    args = dict(lists=lists, index=order.astype(np.int64), k=15, metric="euclidean", centroids=C)
    whole = IVF.ivf_partial(X[order], 0, Q, probes, **args)
    monkeypatch.setattr(IVF, "LIST_ROWS", 64)
    monkeypatch.setattr(IVF, "LIST_QUERIES", 7)
    pieces = IVF.ivf_partial(X[order], 0, Q, probes, **args)
    d, i = reference(Q, X, 15)
    assert_array_equal(whole.indices, i)
    assert_array_equal(pieces.indices, i)
    assert_array_equal(pieces.distances, whole.distances)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean"])
def test_ivf_frequent_prunes_and_short_nearest_lists_stay_exact(monkeypatch, metric):
    """Pruning after every product, with lists shorter than k: every list probed is exact."""
    rng = np.random.default_rng(11)
    X = rng.standard_normal((400, 5))
    Q = rng.standard_normal((60, 5))
    # centroids next to a few outer rows: their lists hold a handful of rows (fewer than k)
    outer = np.argsort((X**2).sum(1))[-3:]
    C = np.concatenate([X[rng.choice(400, 6, replace=False)] * 0.3, X[outer] * 1.05])
    order, lists, counts = IVF.sort_block(X, centroids=C, metric=metric)
    Qp = K.prepare_queries(Q, metric)
    probes = IVF.probes_block(Qp, 0, centroids=C, n_probe=len(C))
    monkeypatch.setattr(IVF, "PRUNE_EVERY", 0)
    monkeypatch.setattr(IVF, "MIN_PRUNE", 1)
    out = IVF.ivf_partial(X[order], 0, Qp, probes, lists=lists, index=order.astype(np.int64),
                          k=12, metric=metric, centroids=C)
    assert counts.min() < 12
    d, i = reference(Q, X, 12, metric)
    assert_array_equal(out.indices, i)
    assert_allclose(out.distances, d, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("offset", [0.0, 1e3, 3e5])
def test_ivf_exact_ties_at_the_kth_distance_stay_exact(monkeypatch, offset):
    """Rows on a small integer grid (many exactly equal distances at the k-th place) far
    from the origin, pruning after every product: the folded float32 thresholds lose no
    row, and ties go to the lower index."""
    rng = np.random.default_rng(7)
    X = rng.integers(0, 4, size=(600, 3)).astype(np.float64) + offset
    Q = rng.integers(0, 4, size=(40, 3)).astype(np.float64) + offset + 0.5 * (
        np.arange(40)[:, None] % 2)
    C = X[rng.choice(600, 5, replace=False)] + 0.25
    order, lists, _ = IVF.sort_block(X, centroids=C, metric="euclidean")
    probes = IVF.probes_block(Q, 0, centroids=C, n_probe=len(C))
    monkeypatch.setattr(IVF, "PRUNE_EVERY", 0)
    monkeypatch.setattr(IVF, "MIN_PRUNE", 1)
    out = IVF.ivf_partial(X[order], 0, Q, probes, lists=lists, index=order.astype(np.int64),
                          k=30, metric="euclidean", centroids=C)
    D = ((Q[:, None] - X[None]) ** 2).sum(-1)
    assert_array_equal(out.indices, np.argsort(D, axis=1, kind="stable")[:, :30])


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 40), st.integers(2, 600),
       st.sampled_from([3, 50, 2**24]))
def test_probe_selection_takes_the_n_smallest(seed, rows, m, distinct):
    """The bounded selection of the probed lists: exactly the n smallest scores of each row
    (with exact ties at the n-th, as many of them as fit), whatever the row length."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, m))
    scores = rng.integers(0, distinct, size=(rows, m)).astype(np.float32)
    cols = IVF._smallest(scores, n)
    assert cols.shape == (rows, n)
    for row, c in zip(scores, cols):
        # the n smallest, of exact ties at the n-th the lower columns, in column order
        assert_array_equal(c, np.sort(np.argsort(row, kind="stable")[:n]))
    # a NaN score (from an overflow) ranks last instead of breaking the selection
    scores[0, 0] = np.nan
    cols = IVF._smallest(scores, n)
    assert cols.shape == (rows, n) and 0 not in cols[0]


def test_probes_are_the_nearest_centroids_nearest_first():
    rng = np.random.default_rng(5)
    C = rng.standard_normal((1000, 6))
    Q = rng.standard_normal((300, 6)).astype(np.float32)
    probes = IVF.probes_block(Q, 0, centroids=C, n_probe=48)
    d = ((Q[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1)
    got = np.take_along_axis(d, probes, axis=1)
    assert probes.dtype == np.int32
    assert all(np.unique(p).size == 48 for p in probes)
    # the same distances as the 48 nearest (up to the scores' float32 rounding)
    assert_allclose(np.sort(got, axis=1), np.sort(d, axis=1)[:, :48], rtol=1e-5)
    assert_allclose(got[:, 0], d.min(axis=1), rtol=1e-5)


def test_a_prune_keeps_the_bound_of_a_query_short_of_candidates():
    """A query with fewer than k candidates so far keeps the threshold it had (from its
    nearest list); the others get the k-th smallest of theirs plus the margin."""
    qc2, margin = np.zeros(2), np.full(2, 1e-3)
    folded = np.zeros(2, np.float32)
    hits = IVF._Hits(qc2, margin, k=3, limit=10**9, folded=folded, every=np.full(2, 100.0))
    hits.set_threshold(slice(None), np.array([5.0, 7.0]))
    assert_array_equal(folded, [-5.0, -7.0])
    hits.add(np.array([0, 0, 0, 0, 1]), np.array([1.0, 2.0, 3.0, 4.0, 0.5]), np.arange(5))
    q, s, r = hits.prune()
    assert_allclose(hits.threshold, [3.0 + 1e-3, 7.0])
    assert_array_equal(np.sort(r), [0, 1, 2, 4])  # row 3 (4.0) is above query 0's k-th
    assert -folded[0] >= hits.threshold[0] and folded[1] == -7.0  # rounded up
    assert_allclose(folded, [-3.001, -7.0], rtol=1e-6)


def test_folded_thresholds_round_up_and_stop_at_the_bound_that_takes_every_row():
    """The products compare ``proxy - t32`` with 0: ``t32`` is ``threshold - ||q - c||^2``
    rounded up to float32, and no more than ``every`` (an infinite or NaN threshold, one
    short of k rows, gets ``every``)."""
    qc2 = np.array([1.0, 2.0, 0.0, 0.0])
    folded = np.zeros(4, np.float32)
    every = np.array([50.0, 50.0, 50.0, 50.0])
    hits = IVF._Hits(qc2, np.zeros(4), k=1, limit=10**9, folded=folded, every=every)
    hits.set_threshold(slice(None), np.array([1.1, 1e9, np.inf, np.nan]))
    t32 = -folded[0]
    assert t32 >= 1.1 - 1.0 > np.nextafter(t32, np.float32(0))  # the float32 just above
    assert_array_equal(folded[1:], [-50.0, -50.0, -50.0])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5), st.integers(1, 70), st.booleans())
def test_select_orders_by_distance_then_lower_index(seed, k, n, ties):
    """Few distinct distances (exact ties, within and across queries), or none; query
    numbers past 2**16 too."""
    rng = np.random.default_rng(seed)
    n_queries = int(rng.integers(1, 8)) if seed % 3 else 70_000
    q = rng.integers(0, n_queries, n)
    d = (rng.integers(0, 4, n).astype(np.float64) * (1.0 if seed % 2 else rng.random())
         if ties else rng.random(n))
    index = rng.permutation(1000)[:n].astype(np.int64)
    out = K.select(q, d, index, n_queries, k)
    for j in np.unique(q):
        mine = np.flatnonzero(q == j)
        ref = mine[np.lexsort((index[mine], d[mine]))][:k]
        got = out.indices[j][out.indices[j] != K.NO_INDEX]
        assert_array_equal(got, index[ref])
        assert_array_equal(out.distances[j, : ref.size], d[ref])
