"""Nearest-neighbour kernels: the exact top-k of a (query block x data chunk) tile, and its merge.

Per tile (no dask here):

- :func:`brute_partial` returns, for every query of a block, the ``k`` rows of
  one data chunk nearest to it, with their exact distances and global row
  indices (and optionally the rows' targets, so that labels never need to be
  gathered afterwards).
- :func:`merge_neighbors` merges two such records into the ``k`` nearest of
  both. The order is total (distance, then global row index), so the merge
  is associative and commutative and its result does not depend on the
  chunking or on the shape of the reduction tree.

How a tile is searched
----------------------
Distances are ranked by the *proxy* ``||x - c||^2 - 2 (q - c) . (x - c)``
(``c`` a centre of the chunk), which differs from ``||q - x||^2`` by a constant
per query. Appending ``||x - c||^2`` as a column of the data and ``1`` to the
queries (scaled by -2) makes the proxy of a whole (rows x queries) sub-tile
one float32 matrix product. A running threshold per query, the ``k``-th
smallest proxy among the candidates so far plus a rounding margin, prunes the
sub-tile with one vectorised comparison: only the entries under it become
candidates (about ``k log(m / k)`` per query of a chunk of ``m`` rows in
random order), and the thresholds are tightened whenever candidates pile up
(:func:`_prune`, one sort). No full sort, no partition of the tile. The
candidates' distances are then recomputed exactly, in float64 from the
differences ``q - x``, and the ``k`` smallest kept, ties going to the lower
row index. The margin bounds the float32 rounding of the proxy, so no row
that belongs to the exact top-k is ever pruned (see :func:`_margin`).

Data far from the float32 range's comfortable middle (rows farther than
``2**40`` from their centre, whose squares would overflow float32 near
``2**64``, or all within ``2**-40`` of it) are scaled by a power of two
first, which changes no ranking and rounds nothing (:func:`prepare_rows`);
a query far enough from a chunk's rows that its proxy could overflow
(:data:`FAR`) takes every row of the chunk as a candidate, as its rounding
margin would anyway.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Rows of a sub-tile: the (rows x queries) float32 proxy (2 MB) stays in cache.
TILE_ROWS = 2048
#: Queries of a sub-tile.
TILE_QUERIES = 256
#: Rows whose k-th smallest proxy sets the first thresholds (a partition along
#: the rows is slow: the first prune soon tightens them).
FIRST_ROWS = 256
#: Candidate pairs whose exact distances are computed at once (bounds temporaries).
EXACT_BATCH = 1 << 13
#: Queries searched at once inside a tile (bounds the candidates held).
QUERY_GROUP = 4096
#: Index padding of a query with fewer than ``k`` neighbours in a chunk.
NO_INDEX = -1

METRICS = ("euclidean", "sqeuclidean", "cosine")
#: A chunk's rows are scaled (by a power of two) when their largest distance from the
#: centre is outside [1 / SAFE_NORM, SAFE_NORM] (see :func:`prepare_rows`).
SAFE_NORM = 2.0**40
#: Queries farther than this from the (scaled) centre compare nothing in float32 (their
#: products could overflow): every row is their candidate.
FAR = 2.0**60


class Neighbors(NamedTuple):
    """The ``k`` nearest rows found so far for each query of a block.

    distances : ndarray of shape (n_queries, k), float64
        Sorted ascending. The *ranking* distance: squared Euclidean for
        "euclidean" and "sqeuclidean", ``1 - cos`` for "cosine"; ``inf`` pads.
    indices : ndarray of shape (n_queries, k), int64
        Global row indices; ``-1`` pads a query with fewer than ``k`` rows seen.
    values : ndarray of shape (n_queries, k) or None
        The target of each neighbour (``y`` of the fitted rows) when requested;
        pads hold 0.
    """

    distances: np.ndarray
    indices: np.ndarray
    values: np.ndarray | None


def empty_neighbors(n_queries: int, k: int, values_dtype=None) -> Neighbors:
    """A record with no neighbour yet (all padding)."""
    return Neighbors(np.full((n_queries, k), np.inf), np.full((n_queries, k), NO_INDEX, np.int64),
                     None if values_dtype is None else np.zeros((n_queries, k), values_dtype))


def _sort_key(indices: np.ndarray) -> np.ndarray:
    """Pads (-1) sort after every real index among equal distances."""
    return np.where(indices < 0, np.iinfo(np.int64).max, indices)


def merge_neighbors(a: Neighbors, b: Neighbors) -> Neighbors:
    """The ``k`` nearest of two records for the same queries (associative, commutative).

    Rows are ordered by distance, then by global index, a total order on
    distinct rows: merging in any grouping gives the same record bit for bit.
    One stable argsort by distance (each record is in that order already);
    only the queries with equal distances among their ``k + 1`` first are
    sorted again, by distance and index.
    """
    k = a.distances.shape[1]
    d = np.concatenate([a.distances, b.distances], axis=1)
    i = np.concatenate([a.indices, b.indices], axis=1)
    order = np.argsort(d, axis=1, kind="stable")
    first = np.take_along_axis(d, order[:, : k + 1], axis=1)
    tied = np.flatnonzero((first[:, 1:] == first[:, :-1]).any(axis=1))
    if tied.size:
        order[tied] = np.lexsort((_sort_key(i[tied]), d[tied]), axis=1)
    order = order[:, :k]
    values = None
    if a.values is not None:
        values = np.take_along_axis(np.concatenate([a.values, b.values], axis=1), order, axis=1)
    return Neighbors(np.take_along_axis(d, order, axis=1), np.take_along_axis(i, order, axis=1),
                     values)


def _as_float(X: np.ndarray) -> np.ndarray:
    return X if X.dtype.kind == "f" else X.astype(np.float64)


def normalize_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit Euclidean norm in float64; zero rows stay zero (as scikit-learn's)."""
    X = np.asarray(X, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", X, X))
    norms[norms == 0] = 1.0
    return X / norms[:, None]


def exact_distances(Q: np.ndarray, X: np.ndarray, metric: str) -> np.ndarray:
    """Ranking distance of the pairs ``(Q[i], X[i])`` in float64.

    Squared Euclidean from the differences (no cancellation), or ``1 - cos``
    clipped to [0, 2] for "cosine" (rows already normalised by the caller).
    """
    if metric == "cosine":
        d = 1.0 - np.einsum("ij,ij->i", Q, X)
        return np.clip(d, 0.0, 2.0, out=d)
    diff = np.asarray(Q, dtype=np.float64) - X
    return np.einsum("ij,ij->i", diff, diff)


def _margin(q_norm: np.ndarray, x_norm_max: float, n_features: int,
            folded: bool = False) -> np.ndarray:
    """Twice a bound on the float32 rounding error of the proxy, per query.

    With ``R = ||q - c|| + max ||x - c||``, rounding ``q - c`` and ``x - c`` to
    float32 moves ``||q - x||^2`` by at most ``2 u R^2`` (``u = 2**-24``), the
    stored ``||x - c||^2`` carries ``u R^2`` and the (d + 1)-term dot product at
    most ``(d + 1) u R^2 / (1 - (d + 1) u)``, whatever the summation order. If
    every proxy is within ``e`` of its exact value, a row of the exact top-k
    has a computed proxy within ``2 e`` of the computed ``k``-th smallest.

    ``folded``: the product has one more term, minus the query's threshold,
    whose size is at most ``R^2`` plus this margin (callers clip it there),
    so the terms' absolute values add up to at most about ``2 R^2``: a
    (d + 2)-term sum with twice the bound.
    """
    u = float(np.finfo(np.float32).eps) / 2
    terms = n_features + 1 + folded
    dot = terms / (1 - terms * u) * (2.001 if folded else 1.0)
    e = (dot + 4.0) * u * (q_norm + x_norm_max) ** 2
    return 2.0 * e * (1 + 1e-3) + np.finfo(np.float32).tiny


class _Prepared(NamedTuple):
    """A data chunk ready for the float32 proxy: ``[s (x - c), s^2 ||x - c||^2]`` per row."""

    rows: np.ndarray  # (m, d + 1) float32 (d + 2 with a column of ones)
    center: np.ndarray  # (d,) float32 (float64 if float32 cannot hold it)
    norm_max: float  # max s ||x - c||
    scale: float = 1.0  # s, a power of two


def safe_norm(norm_max: float) -> bool:
    """Whether rows at most ``norm_max`` from their centre need no scaling."""
    return norm_max == 0.0 or 1.0 / SAFE_NORM <= norm_max <= SAFE_NORM


def center_dtype(center: np.ndarray) -> np.ndarray:
    """A centre in float32, or in float64 where float32 cannot hold it."""
    center = np.asarray(center, dtype=np.float64)
    fits = center.size == 0 or np.abs(center).max() < np.finfo(np.float32).max / 4
    return center.astype(np.float32) if fits else center


def center_of(X: np.ndarray) -> np.ndarray:
    """The mean row of a chunk, as :func:`center_dtype` keeps it."""
    return center_dtype(X.mean(axis=0, dtype=np.float64) if X.shape[0] else
                        np.zeros(X.shape[1]))


def prepare_rows(X: np.ndarray, metric: str, center: np.ndarray | None = None,
                 scale: float | None = None, ones: bool = False) -> _Prepared:
    """The augmented float32 copy of a chunk (one copy, one pass; two where it is scaled).

    ``X`` is float (already normalised for "cosine", where the centre is 0
    and the norm column 1, so the proxy is ``1 - 2 cos`` even for zero rows).
    ``center`` defaults to the chunk's mean. The rows are scaled by
    ``scale``, by default 1 unless their largest distance from the centre is
    outside the safe range (:func:`safe_norm`): then by the power of two
    that brings it into [0.5, 1) (a second pass, in float64).
    ``ones`` appends a column of ones (``[s (x - c), s^2 ||x - c||^2, 1]``),
    which multiplies a per-query term folded into the products.
    """
    m, d = X.shape
    rows = np.empty((m, d + 1 + ones), dtype=np.float32)
    if ones:
        rows[:, d + 1] = 1.0
    if metric == "cosine":
        rows[:, :d] = X
        rows[:, d] = 1.0
        return _Prepared(rows, np.zeros(d, np.float32), 1.0)
    center = center_of(X) if center is None else center_dtype(center)
    if scale is None or scale == 1.0:
        with np.errstate(over="ignore", invalid="ignore"):  # checked below
            np.subtract(X, center, out=rows[:, :d], casting="unsafe")
            sq = np.einsum("ij,ij->i", rows[:, :d], rows[:, :d], dtype=np.float64)
        norm_max = float(np.sqrt(sq.max())) if m else 0.0
        if scale is not None or safe_norm(norm_max):
            with np.errstate(over="ignore"):  # inf: ivf_tile prepares such rows again
                rows[:, d] = sq
            return _Prepared(rows, center, norm_max)
    diff = np.subtract(X, center, dtype=np.float64)
    sq = np.einsum("ij,ij->i", diff, diff)
    if scale is None:
        scale = 2.0 ** -int(np.frexp(np.sqrt(sq.max()))[1]) if sq.max() > 0 else 1.0
    diff *= scale
    rows[:, :d] = diff
    rows[:, d] = sq * scale**2
    return _Prepared(rows, center, float(np.sqrt(sq.max())) * scale if m else 0.0, scale)


def scaled_queries(Q: np.ndarray, P: _Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Queries against a prepared chunk: ``s (q - c)`` (float64), its float32 products'
    side ``-2 s (q - c)`` (rows of zeros for queries farther than :data:`FAR`, which
    then compare only the rows' norms: their margin lets every row through) and
    ``s^2 ||q - c||^2``."""
    Qc = np.subtract(Q, P.center, dtype=np.float64)
    if P.scale != 1.0:
        Qc *= P.scale
    qc2 = np.einsum("ij,ij->i", Qc, Qc, dtype=np.float64)
    minus_2 = -2.0 * Qc
    far = qc2 > FAR**2
    if far.any():
        minus_2[far] = 0.0
    return Qc, minus_2, qc2


def _sortable_up(s: np.ndarray) -> np.ndarray:
    """``s`` rounded up to float32 (beyond its range: inf), as uint64 integers that sort
    like the values."""
    with np.errstate(over="ignore"):
        s32 = s.astype(np.float32)
    up = s32 < s
    s32[up] = np.nextafter(s32[up], np.float32(np.inf))
    # in place (few large temporaries): negative values get all bits flipped, the others
    # only the sign bit (the arithmetic shift gives -1 or 0)
    bits = s32.view(np.int32)
    bits ^= (bits >> 31) | np.int32(-(1 << 31))
    return bits.view(np.uint32).astype(np.uint64)


def _from_sortable(key: np.ndarray) -> np.ndarray:
    key = key & np.uint64(0xFFFFFFFF)
    positive = key >> np.uint64(31) == 1
    bits = np.where(positive, key & np.uint64(0x7FFFFFFF), ~key & np.uint64(0xFFFFFFFF))
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


def _prune(q, s, r, k: int, margin: np.ndarray, n_queries: int):
    """Keep the candidates within ``margin`` of their query's ``k``-th smallest value.

    Returns the kept ``(q, s, r)`` (in no particular order) and the new
    threshold per query (``inf`` where a query has fewer than ``k``
    candidates). The ``k``-th smallest of every query comes from one sort of
    64-bit keys (query in the high bits, the value rounded up to float32 in
    the low ones), a vectorised sort much faster than an argsort; the
    rounding up only loosens the threshold.
    """
    counts = np.bincount(q, minlength=n_queries)
    starts = np.cumsum(counts) - counts
    keys = _sortable_up(s)
    high = q.astype(np.uint64)
    high <<= np.uint64(32)
    keys |= high
    keys.sort()
    kth = np.full(n_queries, np.inf)
    full = counts >= k
    kth[full] = _from_sortable(keys[starts[full] + k - 1])
    threshold = kth + margin
    keep = s <= threshold[q]
    return q[keep], s[keep], r[keep], threshold


def _threshold32(threshold: np.ndarray) -> np.ndarray:
    """float32 thresholds, rounded up: ``proxy32 <= t32`` whenever ``proxy32 <= t``."""
    with np.errstate(over="ignore"):
        t32 = threshold.astype(np.float32)
    return np.where(t32 < threshold, np.nextafter(t32, np.float32(np.inf)), t32)


def _hits(mask: np.ndarray, words: np.ndarray, n: int) -> np.ndarray:
    """Flat positions of the True entries among the first ``n`` of a sparse bool buffer.

    ``mask`` has a multiple of 8 entries; ``words`` is a bool scratch buffer
    of ``mask.size // 8``. The mask is scanned as 64-bit words first (one
    vectorised comparison with 0), then only the non-zero words, gathered as
    words and read byte by byte: several times faster than ``flatnonzero``
    on the whole mask.
    """
    n_words = -(-n // 8)
    as_words = mask.view(np.uint64)
    at = np.flatnonzero(np.not_equal(as_words[:n_words], 0, out=words[:n_words]))
    if not at.size:
        return at
    byte = np.flatnonzero(np.take(as_words, at).view(np.uint8))
    hits = at[byte >> 3] * 8 + (byte & 7)
    return hits[hits < n] if n % 8 else hits


def candidates(P: _Prepared, QT: np.ndarray, k: int, margin: np.ndarray):
    """Candidate pairs ``(query, row)``: a superset of each query's ``k`` nearest rows.

    Parameters
    ----------
    P : prepared chunk, from :func:`prepare_rows`
    QT : ndarray of shape (d + 1, n_queries), float32
        Augmented queries ``[-2 (q - c), 1]``, transposed.
    k : int
    margin : ndarray of shape (n_queries,)
        From :func:`_margin`.

    Returns
    -------
    q, r : ndarrays of int64
        Query and (chunk-local) row of every candidate.
    """
    m = P.rows.shape[0]
    nq = QT.shape[1]
    if k >= m:  # every row is a neighbour
        return np.repeat(np.arange(nq), m), np.tile(np.arange(m), nq)
    out_q, out_r = [], []
    first = min(m, max(FIRST_ROWS, k))
    for q0 in range(0, nq, TILE_QUERIES):
        Qs = np.ascontiguousarray(QT[:, q0 : q0 + TILE_QUERIES])
        b = Qs.shape[1]
        mg = margin[q0 : q0 + b]
        buf = np.empty((TILE_ROWS, b), dtype=np.float32)
        mask = np.zeros(-(-TILE_ROWS * b // 8) * 8, dtype=bool)
        words = np.empty(mask.size // 8, dtype=bool)
        # the first rows set the thresholds: their k-th smallest proxy per query
        S = P.rows[:first] @ Qs
        threshold = np.partition(S, k - 1, axis=0)[k - 1].astype(np.float64) + mg
        t32 = _threshold32(threshold)
        rr, qq = np.nonzero(S <= t32)
        parts_q, parts_s, parts_r = [qq], [S[rr, qq]], [rr]
        pending = rr.size
        limit = max(4 * b * k, 1 << 14)
        for r0 in range(first, m, TILE_ROWS):
            block = P.rows[r0 : r0 + TILE_ROWS]
            nb = block.shape[0]
            Sb = np.matmul(block, Qs, out=buf[:nb])
            np.less_equal(Sb, t32, out=mask[: nb * b].reshape(nb, b))
            hit = _hits(mask, words, nb * b)
            if hit.size:
                rows, cols = np.divmod(hit, b)
                parts_q.append(cols)
                parts_s.append(Sb.ravel()[hit])
                parts_r.append(rows + r0)
                pending += hit.size
                if pending > limit:  # tighten the thresholds
                    q, s, r, threshold = _prune(np.concatenate(parts_q), np.concatenate(parts_s),
                                                np.concatenate(parts_r), k, mg, b)
                    parts_q, parts_s, parts_r = [q], [s], [r]
                    pending = q.size
                    t32 = _threshold32(threshold)
        q, s, r, _ = _prune(np.concatenate(parts_q), np.concatenate(parts_s).astype(np.float64),
                            np.concatenate(parts_r), k, mg, b)
        out_q.append(q + q0)
        out_r.append(r)
    return np.concatenate(out_q), np.concatenate(out_r)


def pair_distances(Q: np.ndarray, q: np.ndarray, X: np.ndarray, r: np.ndarray, metric: str,
                   rows=None) -> np.ndarray:
    """:func:`exact_distances` of the pairs ``(Q[q[i]], X[r[i]])``, :data:`EXACT_BATCH` at a time.

    The gathered rows of a batch stay small (in cache, and under the size
    at which a worker's allocator maps fresh pages). ``rows``, if given,
    turns gathered rows of ``X`` into what ``metric`` compares (e.g. unit
    rows for "cosine").
    """
    dist = np.empty(q.size)
    for s in range(0, q.size, EXACT_BATCH):
        sl = slice(s, s + EXACT_BATCH)
        Xs = X[r[sl]]
        dist[sl] = exact_distances(Q[q[sl]], Xs if rows is None else rows(Xs), metric)
    return dist


def _grouped_order(q: np.ndarray, d: np.ndarray, index: np.ndarray, n_queries: int) -> np.ndarray:
    """The permutation sorting the triples by ``(q, d, index)``.

    One unstable sort of ``d`` and a stable sort of ``q`` (a radix sort for
    fewer than 2**16 queries) give that order unless a query has two exactly
    equal distances (only the index can then order them): that case takes a
    full lexicographic sort.
    """
    by_d = np.argsort(d)
    qs = q[by_d]
    order = by_d[np.argsort(qs.astype(np.uint16) if n_queries <= 1 << 16 else qs, kind="stable")]
    qo, do = q[order], d[order]
    if ((qo[1:] == qo[:-1]) & (do[1:] == do[:-1])).any():
        return np.lexsort((index, d, q))
    return order


def select(q: np.ndarray, d: np.ndarray, index: np.ndarray, n_queries: int, k: int,
           values: np.ndarray | None = None) -> Neighbors:
    """The ``k`` smallest ``(d, index)`` of each query from flat candidate triples."""
    order = _grouped_order(q, d, index, n_queries)
    q, d, index = q[order], d[order], index[order]
    counts = np.bincount(q, minlength=n_queries)
    starts = np.cumsum(counts) - counts
    rank = np.arange(q.size) - starts[q]
    keep = rank < k
    q, rank = q[keep], rank[keep]
    out = empty_neighbors(n_queries, k, None if values is None else values.dtype)
    out.distances[q, rank] = d[keep]
    out.indices[q, rank] = index[keep]
    if values is not None:
        out.values[q, rank] = values[order][keep]
    return out


def prepare_queries(Q: np.ndarray, metric: str) -> np.ndarray:
    """Queries in the form the kernels compare: float, unit rows for "cosine"."""
    Q = _as_float(Q)
    return normalize_rows(Q) if metric == "cosine" else Q


def brute_partial(
    X: np.ndarray, offset: int, Q: np.ndarray, *, k: int, metric: str,
    y: np.ndarray | None = None,
) -> Neighbors:
    """Exact ``k`` nearest rows of the chunk ``X`` for every query of ``Q``.

    Parameters
    ----------
    X : ndarray of shape (m, n_features)
        A data chunk whose first row has global index ``offset``.
    offset : int
    Q : ndarray of shape (n_queries, n_features)
        Queries, from :func:`prepare_queries`.
    k : int
        Neighbours to keep; a chunk with fewer than ``k`` rows pads.
    metric : {"euclidean", "sqeuclidean", "cosine"}
    y : ndarray of shape (m,), optional
        Targets of the chunk's rows, carried along as ``values``.

    Returns
    -------
    Neighbors
        Exact float64 ranking distances (see :class:`Neighbors`), sorted,
        ties to the lower global index.

    Notes
    -----
    One float32 matrix product per (2048 rows x 256 queries) sub-tile, one
    comparison with the running thresholds, then exact distances for the
    surviving candidates only. See the module docstring. Queries are
    processed in groups of :data:`QUERY_GROUP`, so memory stays bounded
    whatever the size of ``Q``.
    """
    X = _as_float(X)
    if metric == "cosine":
        X = normalize_rows(X)
    m, d = X.shape
    nq = Q.shape[0]
    out = empty_neighbors(nq, k, None if y is None else y.dtype)
    if m == 0 or nq == 0:
        return out
    P = prepare_rows(X, metric)
    for g0 in range(0, nq, QUERY_GROUP):
        Qg = Q[g0 : g0 + QUERY_GROUP]
        _, minus_2, qc2 = scaled_queries(Qg, P)
        QT = np.empty((d + 1, Qg.shape[0]), dtype=np.float32)
        QT[:d] = minus_2.T
        QT[d] = 1.0
        q, r = candidates(P, QT, k, _margin(np.sqrt(qc2), P.norm_max, d))
        dist = pair_distances(Qg, q, X, r, metric)
        part = select(q, dist, r + offset, Qg.shape[0], k, None if y is None else y[r])
        for full, piece in zip(out, part):
            if full is not None:
                full[g0 : g0 + Qg.shape[0]] = piece
    return out


def count_rows(X: np.ndarray, w, offset: int, y=None) -> int:
    """Rows of a block (the fit's validation pass)."""
    return X.shape[0]


def add(a, b):
    """Combine for counts."""
    return a + b


# --------------------------------------------------------------------------- results


def output_distances(d: np.ndarray, metric: str) -> np.ndarray:
    """Ranking distances to the metric's own: the square root for "euclidean"."""
    return np.sqrt(d) if metric == "euclidean" else d


def finalize(part: Neighbors, *, k: int, metric: str, self_offset: int | None = None) -> Neighbors:
    """The ``k`` neighbours to report, with the metric's distances.

    With ``self_offset`` (the queries are the fitted rows ``self_offset,
    self_offset + 1, ...``, searched for ``k + 1`` neighbours), each query's
    own row is dropped, as scikit-learn does: when the row is not among the
    ``k + 1`` (more than ``k`` exact duplicates), the first neighbour is.
    """
    d, i, v = part
    if self_offset is not None:
        n = i.shape[0]
        keep = i != np.arange(self_offset, self_offset + n)[:, None]
        keep[keep.all(axis=1), 0] = False
        d = d[keep].reshape(n, -1)
        i = i[keep].reshape(n, -1)
        v = None if v is None else v[keep].reshape(n, -1)
    d, i = d[:, :k], i[:, :k]
    return Neighbors(output_distances(d, metric), i, None if v is None else v[:, :k])


def neighbor_weights(distances: np.ndarray, weights) -> np.ndarray:
    """Weight of each neighbour, as scikit-learn's ``_get_weights``.

    "uniform": ones. "distance": ``1 / d``; a query with neighbours at distance
    0 gives those weight 1 and the others 0. A callable is applied to the
    distances and must return an array of the same shape.
    """
    if weights == "uniform":
        return np.ones_like(distances)
    if weights == "distance":
        with np.errstate(divide="ignore"):
            w = 1.0 / distances
        inf = np.isinf(w)
        rows = inf.any(axis=1)
        w[rows] = inf[rows]
        return w
    w = np.asarray(weights(distances), dtype=np.float64)
    if w.shape != distances.shape:
        raise ValueError(f"weights (a callable) returned shape {w.shape}; expected the "
                         f"shape of the distances {distances.shape}")
    return w


def class_proba(part: Neighbors, *, k: int, metric: str, n_classes: int, weights,
                self_offset: int | None = None) -> np.ndarray:
    """Class probabilities of each query from its neighbours' class codes (``values``)."""
    nb = finalize(part, k=k, metric=metric, self_offset=self_offset)
    w = neighbor_weights(nb.distances, weights)
    w[nb.indices < 0] = 0.0  # padding (approximate search found fewer than k rows)
    n = w.shape[0]
    proba = np.zeros((n, n_classes))
    rows = np.repeat(np.arange(n), w.shape[1])
    np.add.at(proba, (rows, nb.values.ravel()), w.ravel())
    total = proba.sum(axis=1, keepdims=True)
    total[total == 0] = 1.0
    return proba / total


def class_predict(part: Neighbors, *, classes: np.ndarray, **kwargs) -> np.ndarray:
    """The class with the largest (weighted) vote; ties go to the first class."""
    return classes[class_proba(part, n_classes=classes.size, **kwargs).argmax(axis=1)]


def regress(part: Neighbors, *, k: int, metric: str, weights,
            self_offset: int | None = None) -> np.ndarray:
    """(Weighted) mean of the neighbours' targets (``values``)."""
    nb = finalize(part, k=k, metric=metric, self_offset=self_offset)
    w = neighbor_weights(nb.distances, weights)
    w[nb.indices < 0] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return (nb.values * w).sum(axis=1) / w.sum(axis=1)


def distances_of(part: Neighbors, **kwargs) -> np.ndarray:
    """The reported distances of :func:`finalize`."""
    return finalize(part, **kwargs).distances


def indices_of(part: Neighbors, **kwargs) -> np.ndarray:
    """The reported indices of :func:`finalize`."""
    return finalize(part, **kwargs).indices


def check_finite_queries(Q: np.ndarray, offset: int, name: str = "Q") -> np.ndarray:
    """Raise ValueError naming the first row of ``Q`` that holds NaN or inf."""
    if Q.dtype.kind == "f":
        bad = ~np.isfinite(Q).all(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad) + offset
            more = f" and {rows.size - 1} more row(s)" if rows.size > 1 else ""
            raise ValueError(f"{name} contains NaN or inf in row {rows[0]}{more}; clean or "
                             "impute the queries first")
    return Q


def query_block(Q: np.ndarray, offset: int, *, metric: str) -> np.ndarray:
    """A validated, prepared block of queries (see :func:`prepare_queries`)."""
    return prepare_queries(check_finite_queries(Q, offset), metric)
