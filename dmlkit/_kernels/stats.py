"""Per-chunk data statistics: counts, weighted sums, spread and finiteness.

The first pass of every fit runs :func:`data_stats` fused with the
algorithm's own kernel, so validating the values of ``X`` costs no extra pass.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class DataStats(NamedTuple):
    """Sufficient statistics of a block of rows.

    n_rows : int
    weight_sum : float
        Sum of sample weights (``n_rows`` when unweighted).
    weight_min : float
        Smallest sample weight (``inf`` for an empty block).
    col_sum : ndarray of shape (n_features,), float64
        Unweighted column sums.
    col_m2 : ndarray of shape (n_features,), float64
        Unweighted sums of squared deviations from the block's column means.
    weighted_sq_norm : float
        ``sum_i w_i ||x_i||^2``.
    bad_rows : tuple of (int, int)
        ``(first_bad_row, n_bad_rows)`` of each block holding NaN or inf:
        the global index of its first row with a non-finite value and how
        many of its rows have one.
    """

    n_rows: int
    weight_sum: float
    weight_min: float
    col_sum: np.ndarray
    col_m2: np.ndarray
    weighted_sq_norm: float
    bad_rows: tuple


#: Bytes of the float64 copy of a piece of rows that :func:`data_stats` works on.
STATS_PIECE_BYTES = 2**20


def data_stats(X: np.ndarray, w: np.ndarray | None, offset: int,
               y: np.ndarray | None = None) -> DataStats:
    """Statistics of one row block ``X`` (rows ``offset ..``) with weights ``w``.

    NaN or inf in ``X``, ``w`` or (when given) ``y`` marks the block as bad.

    Notes
    -----
    One read of ``X``, a piece of :data:`STATS_PIECE_BYTES` at a time (rows of a
    row-major block, one feature's values of a feature-major one), converted to
    float64 relative to the block's first row ``r`` (the shifted-data
    algorithm: sums of ``x - r`` and of its squares give the column sums, the
    sums of squared deviations and the squared norms without the
    cancellation of raw sums of squares when the data sit far from the
    origin). A non-finite value of ``X`` makes the sums of squares non-finite,
    which is how it is detected.
    """
    n, d = X.shape
    finite = True
    for v in (w, y):
        if v is not None and v.dtype.kind == "f":
            finite = finite and bool(np.isfinite(v).all())
    if n:
        shift = X[0].astype(np.float64)
        if not np.isfinite(shift).all():
            finite = False
    if finite and n:
        wf = None if w is None else np.asarray(w, dtype=np.float64)
        # sums of x - r and of its squares per column; weighted, sums of w (x - r) per
        # column and of w ||x - r||^2
        by_feature = X.flags.f_contiguous and not X.flags.c_contiguous
        s1, s2, ws1, wsq = (_feature_major_sums(X.T, shift, wf) if by_feature
                            else _row_major_sums(X, shift, wf))
        # (squares of float64 values beyond 1e154 overflow: then X itself decides)
        finite = bool(np.isfinite(s2).all()) or bool(np.isfinite(X).all())
    if not finite or n == 0:
        bad = ()
        if not finite:  # rare: find the rows
            rows = ~np.isfinite(X).all(axis=1) if X.dtype.kind == "f" else np.zeros(n, bool)
            for v in (w, y):
                if v is not None and v.dtype.kind == "f":
                    rows |= ~np.isfinite(v)
            bad = ((offset + int(np.argmax(rows)), int(rows.sum())),)
        return DataStats(n, 0.0, np.inf, np.zeros(d), np.zeros(d), 0.0, bad)
    col_sum = s1 + n * shift
    col_m2 = np.maximum(s2 - s1 * s1 / n, 0.0)
    r2 = float(shift @ shift)
    if wf is None:
        weight_sum, weight_min = float(n), 1.0
        wsq = float(s2.sum()) + 2.0 * float(shift @ s1) + n * r2
    else:
        weight_sum, weight_min = float(wf.sum()), float(wf.min())
        wsq = wsq + 2.0 * float(shift @ ws1) + weight_sum * r2
    return DataStats(n, weight_sum, weight_min, col_sum, col_m2, wsq, ())


def _row_major_sums(X: np.ndarray, shift: np.ndarray, wf: np.ndarray | None) -> tuple:
    """:func:`data_stats`' sums over a row-major block, in pieces of rows converted to
    float64: ``(s1, s2, ws1, wsq)``."""
    n, d = X.shape
    s1, s2, ws1, wsq = np.zeros(d), np.zeros(d), np.zeros(d), 0.0
    step = max(1, STATS_PIECE_BYTES // (8 * max(d, 1)))
    m = min(step, n)
    part, sq, ones = np.empty((m, d)), np.empty((m, d)), np.ones(m)
    for a in range(0, n, step):
        b = min(a + step, n)
        p, q = part[: b - a], sq[: b - a]
        np.copyto(p, X[a:b])  # float64 (a mixed-type subtract is several times slower)
        p -= shift
        np.multiply(p, p, out=q)
        # column sums as products with ones: BLAS, much faster than sum(axis=0)
        s1 += ones[: b - a] @ p
        s2 += ones[: b - a] @ q
        if wf is not None:
            wp = wf[a:b]
            ws1 += wp @ p
            wsq += float(wp @ (q @ np.ones(d)))
    return s1, s2, ws1, wsq


def _feature_major_sums(XT: np.ndarray, shift: np.ndarray, wf: np.ndarray | None) -> tuple:
    """:func:`_row_major_sums` for a feature-major block, ``XT`` its (features x rows)
    C-contiguous transpose. Each feature's values are contiguous: converted to
    float64 a piece at a time, each is summed with one reduction and one dot
    product (pieces of rows of this layout would be read across its columns)."""
    d, n = XT.shape
    s1, s2, ws1, wsq = np.zeros(d), np.zeros(d), np.zeros(d), 0.0
    step = max(1, STATS_PIECE_BYTES // 8)
    p_buf = np.empty(min(step, n))
    sq_buf = np.empty(p_buf.shape[0]) if wf is not None else None
    for a in range(0, n, step):
        b = min(a + step, n)
        p = p_buf[: b - a]
        for j in range(d):
            np.copyto(p, XT[j, a:b])  # float64
            np.subtract(p, shift[j], out=p)
            s1[j] += p.sum()
            s2[j] += p @ p
            if wf is not None:
                ws1[j] += p @ wf[a:b]
                wsq += float(np.multiply(p, p, out=sq_buf[: b - a]) @ wf[a:b])
    return s1, s2, ws1, wsq


def combine_stats(a: DataStats, b: DataStats) -> DataStats:
    """Merge two :class:`DataStats` (Chan et al. pairwise update of ``col_m2``)."""
    n = a.n_rows + b.n_rows
    if a.n_rows == 0 or b.n_rows == 0:
        m2 = a.col_m2 + b.col_m2
    else:
        delta = b.col_sum / b.n_rows - a.col_sum / a.n_rows
        m2 = a.col_m2 + b.col_m2 + delta**2 * (a.n_rows * b.n_rows / n)
    return DataStats(
        n,
        a.weight_sum + b.weight_sum,
        min(a.weight_min, b.weight_min),
        a.col_sum + b.col_sum,
        m2,
        a.weighted_sq_norm + b.weighted_sq_norm,
        a.bad_rows + b.bad_rows,
    )


def label_counts(*blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct labels of some blocks of ``y``, sorted, and how often each occurs."""
    parts = [_unique_counts(b) for b in blocks]
    return combine_label_counts(*parts) if len(parts) != 1 else parts[0]


#: Integer labels spanning fewer values than this are counted by ``bincount`` (no sort).
COUNT_RANGE = 1 << 16


def _unique_counts(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(b, return_counts=True)``; for integer (and boolean) labels in a short
    range, from one ``bincount`` instead of a sort."""
    b = np.asarray(b)
    if b.size and b.dtype.kind in "iub" and b.ndim == 1:
        v = b.view(np.uint8) if b.dtype.kind == "b" else b
        lo, hi = v.min(), v.max()
        if int(hi) - int(lo) < COUNT_RANGE:
            # offsets from the smallest label: signed ones in int64, unsigned ones in their
            # own dtype (neither overflows)
            wide = v.dtype.kind == "i"
            offsets = v.astype(np.int64) - np.int64(lo) if wide else (v - lo).astype(np.intp)
            c = np.bincount(offsets, minlength=int(hi) - int(lo) + 1)
            present = np.flatnonzero(c)
            values = present + np.int64(lo) if wide else present.astype(v.dtype) + lo
            return values.astype(b.dtype), c[present]
    return np.unique(b, return_counts=True)


def block_label_counts(X: np.ndarray, w, offset: int, *, y: np.ndarray):
    """:func:`label_counts` of a row block's labels (a pass's kernel; ``X`` unused)."""
    return _unique_counts(y)


def combine_label_counts(*parts: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Merge :func:`label_counts` results: the union of the labels, counts added."""
    values = np.concatenate([p[0] for p in parts])
    counts = np.concatenate([p[1] for p in parts]).astype(np.int64)
    labels, where = np.unique(values, return_inverse=True)
    total = np.zeros(labels.size, dtype=np.int64)
    np.add.at(total, where.ravel(), counts)
    return labels, total


def mean_variance(stats: DataStats) -> float:
    """Mean over features of the (population) variance of each column."""
    return float(np.mean(stats.col_m2 / max(stats.n_rows, 1)))


class Moments(NamedTuple):
    """Weighted first and second moments of the columns of some rows.

    weight : float -- total weight
    col_sum : ndarray of shape (n_features,) -- weighted column sums
    col_m2 : ndarray of shape (n_features,) -- weighted sums of squared deviations
        from the rows' weighted column means
    """

    weight: float
    col_sum: np.ndarray
    col_m2: np.ndarray


#: Rows of a block whose moments are computed at once (bounds the float64 copies).
MOMENT_ROWS = 8192


def moments(X: np.ndarray, w: np.ndarray | None, offset: int) -> Moments:
    """:class:`Moments` of one row block.

    In float64 whatever ``X``'s dtype, relative to the block's first row (data
    far from the origin, or float32 data, loses no digits to the sums), in
    pieces of :data:`MOMENT_ROWS` rows merged as :func:`combine_moments` does.
    """
    n, d = X.shape
    wf = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    out = Moments(0.0, np.zeros(d), np.zeros(d))
    if n == 0:
        return out
    shift = np.asarray(X[0], dtype=np.float64)
    if not np.isfinite(shift).all():
        shift = np.zeros(d)
    for s in range(0, n, MOMENT_ROWS):
        ws = wf[s : s + MOMENT_ROWS]
        weight = float(ws.sum())
        if weight == 0:
            continue
        D = np.subtract(X[s : s + MOMENT_ROWS], shift, dtype=np.float64)
        total = ws @ D
        D -= total / weight
        D *= D
        part = Moments(weight, total + weight * shift, ws @ D)
        out = combine_moments(out, part)
    return out


def combine_moments(a: Moments, b: Moments) -> Moments:
    """Chan et al.'s pairwise merge, weighted."""
    weight = a.weight + b.weight
    if a.weight == 0 or b.weight == 0:
        return Moments(weight, a.col_sum + b.col_sum, a.col_m2 + b.col_m2)
    delta = b.col_sum / b.weight - a.col_sum / a.weight
    m2 = a.col_m2 + b.col_m2 + delta**2 * (a.weight * b.weight / weight)
    return Moments(weight, a.col_sum + b.col_sum, m2)
