"""The per-chunk kernels alone, against NumPy, with no dask involved."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from dmlkit._kernels import kmeans as K
from dmlkit._kernels.random import stream_key, uniform_rows
from dmlkit._kernels.stats import combine_stats, data_stats, mean_variance


def _split(n, cuts):
    edges = sorted({0, n, *[c % (n + 1) for c in cuts]})
    return list(zip(edges[:-1], edges[1:]))


def _fold(kernel, combine, X, w, parts, **params):
    out = None
    for a, b in parts:
        p = kernel(X[a:b], None if w is None else w[a:b], a, **params)
        out = p if out is None else combine(out, p)
    return out


# ------------------------------------------------------------------ random
def test_uniform_rows_ignore_chunking():
    key = stream_key(3, 0, 1)
    whole = uniform_rows(key, 0, 10_000)
    pieces = np.concatenate([uniform_rows(key, a, b) for a, b in _split(10_000, [17, 4000, 9999])])
    assert_array_equal(whole, pieces)
    assert whole.min() >= 0 and whole.max() < 1
    assert abs(whole.mean() - 0.5) < 0.01 and abs(whole.var() - 1 / 12) < 0.005
    assert not np.array_equal(whole, uniform_rows(stream_key(3, 0, 2), 0, 10_000))
    assert not np.array_equal(whole, uniform_rows(stream_key(4, 0, 1), 0, 10_000))


# ------------------------------------------------------------------- stats
@settings(max_examples=30, deadline=None)
@given(cuts=st.lists(st.integers(0, 500), max_size=6))
def test_stats_combine_matches_numpy(cuts):
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((500, 3)) * [1, 10, 100] + 1e4).astype(np.float32)
    w = rng.uniform(0.5, 2, 500)
    s = _fold(data_stats, combine_stats, X, w, _split(500, cuts))
    assert s.n_rows == 500
    assert_allclose(s.weight_sum, w.sum())
    assert_allclose(s.col_sum, X.astype(np.float64).sum(0), rtol=1e-10)
    assert_allclose(mean_variance(s), np.var(X.astype(np.float64), axis=0).mean(), rtol=1e-8)
    assert_allclose(s.weighted_sq_norm, w @ (X.astype(np.float64) ** 2).sum(1), rtol=1e-10)
    assert s.bad_rows == ()


@pytest.mark.parametrize("layout", ["rows", "features"])
@pytest.mark.parametrize("weighted", [False, True])
def test_stats_over_several_pieces_match_numpy(weighted, layout):
    from dmlkit._kernels import stats

    rng = np.random.default_rng(1)
    # three pieces of a feature-major block (one feature at a time), more of a row-major one
    n = 2 * stats.STATS_PIECE_BYTES // 8 + 123
    X = (rng.standard_normal((n, 4)) * [1, 10, 100, 1000] - 3e3).astype(np.float32)
    w = rng.uniform(0.5, 2, n) if weighted else None
    s = data_stats(K.to_feature_major(X) if layout == "features" else X, w, 0)
    X64, w64 = X.astype(np.float64), (np.ones(n) if w is None else w)
    assert_allclose(s.col_sum, X64.sum(0), rtol=1e-12)
    assert_allclose(s.col_m2, ((X64 - X64.mean(0)) ** 2).sum(0), rtol=1e-9)
    assert_allclose(s.weighted_sq_norm, w64 @ (X64 ** 2).sum(1), rtol=1e-12)
    assert_allclose(s.weight_sum, w64.sum())


def test_stats_do_not_call_huge_finite_values_bad():
    X = np.array([[1e200, 1.0], [-1e200, 2.0]])  # their squares overflow float64
    with np.errstate(over="ignore", invalid="ignore"):
        assert data_stats(X, None, 0).bad_rows == ()
        X[1, 1] = np.nan
        assert data_stats(X, None, 5).bad_rows == ((6, 1),)


@pytest.mark.parametrize("layout", ["rows", "features"])
def test_stats_report_the_first_bad_row_of_each_bad_block(layout):
    X = np.ones((10, 2))
    X[7, 1] = X[9, 0] = np.nan
    y = np.ones(10)
    y[2] = np.inf
    lay = K.to_feature_major if layout == "features" else np.asarray
    s = combine_stats(data_stats(lay(X[:5]), None, 0, y[:5]),
                      data_stats(lay(X[5:]), None, 5, y[5:]))
    assert s.bad_rows == ((2, 1), (7, 2))
    X[3, 0] = -np.inf
    assert data_stats(lay(X[:5]), None, 0).bad_rows == ((3, 1),)


# ------------------------------------------------------------------- Lloyd
def _naive_lloyd(X, w, C):
    d2 = ((X[:, None, :].astype(np.float64) - C[None]) ** 2).sum(-1)
    labels = d2.argmin(1)
    k = C.shape[0]
    sums = np.array([(X[labels == j] * w[labels == j, None]).sum(0) for j in range(k)])
    weights = np.array([w[labels == j].sum() for j in range(k)])
    return sums, weights, float((d2.min(1) * w).sum())


@pytest.mark.parametrize("layout", ["row-major", "feature-major"])
@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_lloyd_partial_against_numpy(exact, weighted, layout):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((40_000, 4))
    C = rng.standard_normal((5, 4))
    w = rng.uniform(0, 2, 40_000) if weighted else np.ones(40_000)
    Xk = K.to_feature_major(X) if layout == "feature-major" else X
    assert K.feature_major(Xk) == (layout == "feature-major")
    p = K.lloyd_partial(Xk, w if weighted else None, 0, C, exact=exact)
    sums, weights, inertia = _naive_lloyd(X, w, C)
    assert_allclose(p.sums, sums, rtol=1e-10)
    assert_allclose(p.weights, weights, rtol=1e-12)
    if exact:
        assert_allclose(p.inertia, inertia, rtol=1e-10)
    else:
        assert np.isnan(p.inertia)
    sq_norm = float((w * (X**2).sum(1)).sum())
    assert_allclose(K.inertia_from_sums(p, C, sq_norm), inertia, rtol=1e-10)


@pytest.mark.parametrize("offset", [0.0, 1e4])  # 1e4: the sums are taken of x - m
@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd_partial_feature_major_agrees_with_row_major(offset, weighted):
    """The two layouts' float32 products round differently; the statistics agree to that."""
    rng = np.random.default_rng(11)
    n = 3 * 8192 + 517  # whole sub-blocks and a ragged one
    X = (rng.standard_normal((n, 9)) + rng.integers(0, 4, (n, 1)) * 3 + offset).astype(np.float32)
    C = np.concatenate([X[:5], X[:1]]).astype(np.float64)  # a duplicate centre: exact ties
    w = rng.uniform(0, 2, n) if weighted else None
    rows = K.lloyd_partial(X, w, 0, C, exact=True)
    features = K.lloyd_partial(K.to_feature_major(X), w, 0, C, exact=True)
    assert_array_equal(features.weights, rows.weights)  # the same rows in each cluster
    assert features.weights[5] == 0  # ties go to the lowest centre in both
    assert_allclose(features.sums, rows.sums, rtol=1e-6, atol=1e-6 * np.abs(rows.sums).max())
    assert features.inertia == pytest.approx(rows.inertia, rel=1e-6)
    assert features.sums.flags.c_contiguous


@pytest.mark.parametrize("layout", ["row-major", "feature-major"])
def test_lloyd_partial_without_sums_keeps_the_inertia_and_weights(layout):
    rng = np.random.default_rng(14)
    X = rng.standard_normal((20_000, 6)).astype(np.float32)
    X = K.to_feature_major(X) if layout == "feature-major" else X
    C = rng.standard_normal((4, 6))
    w = rng.uniform(0, 2, 20_000)
    full = K.lloyd_partial(X, w, 0, C, exact=True)
    part = K.lloyd_partial(X, w, 0, C, exact=True, with_sums=False)
    assert part.inertia == full.inertia
    assert_array_equal(part.weights, full.weights)
    assert_array_equal(part.sums, np.zeros_like(full.sums))


def test_to_feature_major_keeps_the_values_in_fortran_order():
    rng = np.random.default_rng(12)
    for shape in [(1000, 7), (257, 3), (1, 5), (6, 1), (0, 4)]:
        X = rng.standard_normal(shape).astype(np.float32)
        F = K.to_feature_major(X)
        assert F.flags.f_contiguous and F.dtype == X.dtype
        assert_array_equal(F, X)
    # a single row or column is both layouts: the row-major path takes it
    assert not K.feature_major(K.to_feature_major(np.ones((1, 5))))
    assert not K.feature_major(K.to_feature_major(np.ones((6, 1))))


def test_stats_of_a_feature_major_block_match_row_major():
    rng = np.random.default_rng(13)
    X = (rng.standard_normal((50_000, 5)) * 3 + 100).astype(np.float32)
    w = rng.uniform(0, 2, 50_000)
    for weights in (None, w):
        a, b = data_stats(X, weights, 0), data_stats(K.to_feature_major(X), weights, 0)
        assert_allclose(b.col_sum, a.col_sum, rtol=1e-12)
        assert_allclose(b.col_m2, a.col_m2, rtol=1e-12)
        assert b.weighted_sq_norm == pytest.approx(a.weighted_sq_norm, rel=1e-12)


def test_lloyd_partial_float32_accumulates_in_float64():
    rng = np.random.default_rng(2)
    X = (rng.standard_normal((100_000, 3)) + 1000).astype(np.float32)
    C = np.array([[1000.0, 1000.0, 1000.0]])
    p = K.lloyd_partial(X, None, 0, C)
    assert p.sums.dtype == np.float64
    assert_allclose(p.sums[0], X.astype(np.float64).sum(0), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 300), max_size=5))
def test_lloyd_combine_is_chunking_invariant(cuts):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((300, 2))
    C = rng.standard_normal((4, 2))
    whole = K.lloyd_partial(X, None, 0, C)
    parts = _fold(K.lloyd_partial, K.combine_lloyd, X, None, _split(300, cuts), centers=C)
    assert_allclose(parts.sums, whole.sums, rtol=1e-12, atol=1e-12)
    assert np.isnan(parts.inertia) and np.isnan(whole.inertia)


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 200), max_size=5), m=st.integers(1, 7))
def test_farthest_rows_are_chunking_invariant(cuts, m):
    rng = np.random.default_rng(4)
    X = np.round(rng.standard_normal((200, 2)), 1)  # many exact ties
    C = np.zeros((1, 2))
    far = _fold(K.farthest_partial, K.combine_far, X, None, _split(200, cuts), centers=C, m=m)
    d2 = (X**2).sum(1)
    expect = np.lexsort((np.arange(200), -d2))[:m]
    assert_array_equal(far.index, expect)
    assert_allclose(far.rows, X[expect])


def test_update_centers_relocates_like_sklearn():
    X = np.array([[0.0], [1.0], [9.0]])
    C = np.array([[0.5], [100.0]])
    p = K.lloyd_partial(X, None, 0, C)
    far = K.farthest_partial(X, None, 0, C, 1)
    new, n = K.update_centers(p, C, far)
    assert n == 1
    assert_allclose(new.ravel(), [0.5, 9.0])


# ------------------------------------------------------------- sampling
@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(0, 1000), max_size=6), size=st.integers(1, 50))
def test_sample_is_chunking_invariant(cuts, size):
    X = np.arange(2000.0).reshape(1000, 2)
    key = stream_key(0, 5)
    s = _fold(K.sample_partial, K.combine_samples, X, None, _split(1000, cuts),
              stream=key, size=size)
    expect = np.argsort(uniform_rows(key, 0, 1000), kind="stable")[:size]
    assert_array_equal(s.index, expect)
    assert_array_equal(s.rows[:, 0], X[expect, 0])


def test_candidate_round_samples_exactly_bernoulli():
    """Keeping the smallest ``u / (w d^2)`` then cutting at ``l / phi`` is Bahmani's draw."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((5000, 3))
    w = rng.uniform(0.1, 2, 5000)
    C = X[:2]
    key, ell = stream_key(1, 2), 16.0
    s = _fold(K.candidate_partial, K.combine_samples, X, w, _split(5000, [1234, 3000]),
              candidates=C, stream=key, cap=200)
    d2 = ((X[:, None] - C[None]) ** 2).sum(-1).min(1)
    phi = (w * d2).sum()
    assert_allclose(s.cost, phi, rtol=1e-9)
    bernoulli = np.flatnonzero(uniform_rows(key, 0, 5000) < np.minimum(1, ell * w * d2 / phi))
    chosen = s.index[s.key < ell / phi]
    assert_array_equal(np.sort(chosen), bernoulli)
    assert 5 < chosen.size < 40  # about ell
    assert s.key.size == 200  # room left: the cut is exact


def test_assign_weights_and_local_solvers():
    rng = np.random.default_rng(6)
    pts = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(5, 0.1, (50, 2))])
    w = np.ones(100)
    counts = K.assign_weights_partial(pts, None, 0, np.array([[0.0, 0.0], [5.0, 5.0]]))
    assert_array_equal(counts, [50, 50])
    start = K.kmeans_plusplus(pts, w, 2, np.random.default_rng(0))
    centers = K.local_lloyd(pts, w, start)
    assert_allclose(np.sort(centers[:, 0]), [0, 5], atol=0.1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 2, 7, 8, 33, 300])
def test_members_are_the_one_hot_argmin(k, dtype):
    rng = np.random.default_rng(k)
    X = (rng.standard_normal((5000, 6)) * 1e3).astype(dtype)  # negative and positive scores
    C = (rng.standard_normal((k, 6)) * 1e3).astype(dtype)
    c2 = np.einsum("ij,ij->i", C, C)
    scores = X @ (-2.0 * C.T).astype(dtype)
    expect = (scores + c2).argmin(axis=1)
    members, counts = K._Members(k, 5000, np.dtype(dtype), c2)(scores)
    assert members.dtype == dtype and members.shape == (k, 5000)
    assert_array_equal(members, (expect[None, :] == np.arange(k)[:, None]))
    assert_array_equal(counts, np.bincount(expect, minlength=k))


def test_members_of_tied_duplicate_centres_go_to_the_lowest():
    X = np.array([[0.0, 1.0], [5.0, 5.0], [0.0, -1.0]], dtype=np.float32)
    C = np.array([[5.0, 5.0], [0.0, 0.0], [0.0, 0.0]], dtype=np.float32)
    c2 = np.einsum("ij,ij->i", C, C)
    members, counts = K._Members(3, 4, np.dtype(np.float32), c2)(X @ (-2.0 * C.T))
    assert_array_equal(members, [[0, 1, 0], [1, 0, 1], [0, 0, 0]])  # each row counted once
    assert_array_equal(counts, [1, 2, 0])


@pytest.mark.parametrize("labels", [
    np.array([1, 0, 1, 1], dtype=np.int8),
    np.array([-128, 127, 0, 127], dtype=np.int8),  # the span overflows int8
    np.array([5, -3, 5, 2]),
    np.array([True, False, True]),
    np.array([2**63 + 5, 2**63 + 1, 2**63 + 5], dtype=np.uint64),
    np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).min + 3]),
    np.array([0, 1 << 16]),  # too wide a span: sorted instead
    np.array(["b", "a", "b"]),
    np.array([0.5, -1.0, 0.5]),
    np.array([], dtype=np.int64),
])
def test_label_counts_equal_numpy_unique(labels):
    from dmlkit._kernels.stats import block_label_counts, combine_label_counts, label_counts

    values, counts = label_counts(labels)
    ref_values, ref_counts = np.unique(labels, return_counts=True)
    assert values.dtype == ref_values.dtype
    assert_array_equal(values, ref_values)
    assert_array_equal(counts, ref_counts)
    # the pass's kernel and combine give the same from two halves
    half = labels.size // 2
    merged = combine_label_counts(block_label_counts(None, None, 0, y=labels[:half]),
                                  block_label_counts(None, None, half, y=labels[half:]))
    assert_array_equal(merged[0], ref_values)
    assert_array_equal(merged[1], ref_counts)


def test_scratch_buffers_are_per_name_and_per_thread():
    import threading

    from dmlkit._kernels.scratch import scratch

    a = scratch("test.a", (4, 3), np.float32)
    assert a.shape == (4, 3) and a.dtype == np.float32 and a.flags.c_contiguous
    assert np.shares_memory(a, scratch("test.a", (2, 2), np.float64))  # reused: fits
    assert not np.shares_memory(a, scratch("test.b", (4, 3), np.float32))
    big = scratch("test.a", (100, 100), np.float64)  # grown
    assert big.shape == (100, 100) and not np.shares_memory(a, big)
    other = []
    t = threading.Thread(target=lambda: other.append(scratch("test.a", (100, 100), np.float64)))
    t.start()
    t.join()
    assert not np.shares_memory(big, other[0])  # each thread has its own
