"""Inverted-file (IVF) kernels: approximate nearest neighbours on data grouped by list.

The index assigns every row to its nearest *list* centroid (a coarse
quantizer trained by K-means) and stores each data block with its rows sorted
by list, so that the rows of one list form a contiguous segment of every
block. A query probes its ``n_probe`` nearest lists: in each block it scans
only those segments.

Per block (no dask here):

- :func:`sort_block` orders a block's rows by list (stable, so by global
  index inside a list) and counts the rows of each list.
- :func:`probes_block` finds the ``n_probe`` nearest lists of each query.
- :func:`ivf_partial` scans the probed segments of one block for a block of
  queries and returns the same :class:`~dmlkit._kernels.knn.Neighbors`
  record as the exact search, merged by the same
  :func:`~dmlkit._kernels.knn.merge_neighbors`.
"""
from __future__ import annotations

import numpy as np

from dmlkit._kernels.knn import (Neighbors, _as_float, _hits, _margin, _Prepared, _prune,
                                 _threshold32, empty_neighbors, normalize_rows, pair_distances,
                                 prepare_rows, safe_norm, scaled_queries, select, SAFE_NORM,
                                 center_dtype)



#: Rows of one list scanned by one matrix product (longer lists go in pieces).
LIST_ROWS = 4096
#: Queries of one list scanned by one matrix product (more go in groups).
LIST_QUERIES = 2048
#: Candidates added (per query and neighbour) between two prunes, and at least
#: :data:`MIN_PRUNE` (each prune tightens the thresholds, and sorts what it keeps).
PRUNE_EVERY = 2
MIN_PRUNE = 1 << 15
#: Column groups of the bound that :func:`_smallest` partitions first.
SELECT_GROUP = 8
#: The largest folded threshold: above ``(FAR + SAFE_NORM)^2``, under float32's largest
#: value, and more than the ``||x - c||^2 <= SAFE_NORM^2`` that a query farther than
#: ``FAR`` compares (so it lets every row through).
EVERY_CAP = 2.0**121


def _unit_or_float(X: np.ndarray, metric: str) -> np.ndarray:
    return normalize_rows(X) if metric == "cosine" else _as_float(X)


def nearest_lists(X: np.ndarray, centroids: np.ndarray, n: int,
                  sort: bool | str = False) -> np.ndarray:
    """The ``n`` nearest centroids of each row (squared Euclidean).

    ``X`` is already normalised for the cosine metric. Returns int32 of shape
    (rows, n): nearest first when ``sort`` is True; with ``sort="first"``
    only the nearest comes first, the others in no particular order (no
    sort: cheaper); else all in no particular order.
    Scores ``||c||^2 - 2 x.c`` are computed in float32 in blocks of rows,
    relative to the centroids' mean (no cancellation for data far from the
    origin) and scaled by a power of two when the centroids spread beyond
    the safe range (:func:`~dmlkit._kernels.knn.safe_norm`); in float64 for a
    block with rows farther than that from the centroids. Of exactly equal
    scores, the lower column is taken (and comes first).
    """
    X = _as_float(X)
    mean = centroids.mean(axis=0)
    C64 = centroids - mean
    spread = float(np.abs(C64).max()) if C64.size else 0.0
    factor = 1.0 if safe_norm(spread) else 2.0 ** -int(np.frexp(spread)[1])
    if factor != 1.0:
        C64 *= factor
    C = C64.astype(np.float32)
    c2 = np.einsum("ij,ij->i", C, C)
    minus_2ct = np.ascontiguousarray(-2.0 * C.T)
    n_c = C.shape[0]
    n = min(n, n_c)
    out = np.empty((X.shape[0], n), dtype=np.int32 if n_c < 2**31 else np.int64)
    step = max(64, (1 << 18) // max(n_c, 1))
    for s in range(0, X.shape[0], step):
        rows = X[s : s + step] - mean
        if factor != 1.0:  # scaled as the centroids are
            rows *= factor
        if rows.size and max(rows.max(), -rows.min()) > SAFE_NORM:  # far rows: float64
            scores = rows @ (-2.0 * C64.T)
            scores += np.einsum("ij,ij->i", C64, C64)
        else:
            scores = rows.astype(np.float32) @ minus_2ct
            scores += c2
        if n == 1:
            out[s : s + step, 0] = scores.argmin(axis=1)
            continue
        near = _smallest(scores, n) if n < n_c else np.broadcast_to(np.arange(n), scores.shape)
        if sort == "first":  # swap the nearest into column 0
            near = np.array(near)
            rows = np.arange(near.shape[0])
            best = np.take_along_axis(scores, near, axis=1).argmin(axis=1)
            nearest = near[rows, best]
            near[rows, best] = near[:, 0]
            near[:, 0] = nearest
        elif sort:
            near = np.take_along_axis(near, np.argsort(
                np.take_along_axis(scores, near, axis=1), axis=1, kind="stable"), axis=1)
        out[s : s + step] = near
    return out


def _smallest(scores: np.ndarray, n: int) -> np.ndarray:
    """Columns of the ``n`` smallest scores of each row, in increasing column order.

    A bound first: the ``m`` columns are cut into ``g = ceil(m / G)`` strided
    groups of about ``G`` columns each (group ``j``: columns ``j, j + g, j +
    2g, ...``; ``G`` is :data:`SELECT_GROUP`, or less for rows shorter than
    ``2 G n``), and the ``n``-th smallest of the groups' minima is at least
    the ``n``-th smallest score (``n`` distinct groups hold a score at or
    under it). Only the scores at or under the bound, a few more than ``n``
    per row, are then partitioned, in a padded (rows, widest row) array:
    several times cheaper than partitioning every score. Of exactly equal
    scores at the ``n``-th place, the lower columns are taken. Rows shorter
    than ``4 n`` are partitioned whole, and so is every row when one has
    fewer than ``n`` scores at or under its bound (NaN scores).
    """
    rows, m = scores.shape
    group = min(SELECT_GROUP, m // (2 * n))
    if group < 2 or rows == 0:
        return _first_columns(scores, n)
    g = -(-m // group)
    mins = scores[:, :g].copy()
    for a in range(g, m, g):
        w = min(g, m - a)
        np.minimum(mins[:, :w], scores[:, a : a + w], out=mins[:, :w])
    bound = np.partition(mins, n - 1, axis=1)[:, n - 1 : n]
    r, c = np.divmod(np.flatnonzero(scores <= bound), m)
    counts = np.bincount(r, minlength=rows)
    if counts.min() < n:  # NaN among the scores
        return _first_columns(scores, n)
    pos = np.arange(r.size) - (np.cumsum(counts) - counts)[r]
    vals = np.full((rows, int(counts.max())), np.inf, dtype=scores.dtype)
    vals[r, pos] = scores[r, c]
    cols = np.zeros(vals.shape, dtype=np.int64)
    cols[r, pos] = c
    return cols[_take_n(vals, n)].reshape(rows, n)


def _first_columns(scores: np.ndarray, n: int) -> np.ndarray:
    """:func:`_smallest` by partitioning every score (NaN ranks last)."""
    nan = np.isnan(scores)
    if nan.any():
        scores = np.where(nan, np.inf, scores)
    return np.nonzero(_take_n(scores, n))[1].reshape(-1, n)


def _take_n(vals: np.ndarray, n: int) -> np.ndarray:
    """Mask of the ``n`` smallest of each row (ties at the ``n``-th: the first columns)."""
    kth = np.partition(vals, n - 1, axis=1)[:, n - 1 : n]
    take = vals < kth
    tied = vals == kth
    need = n - np.count_nonzero(take, axis=1)[:, None]
    if (need < np.count_nonzero(tied, axis=1)[:, None]).any():
        tied &= np.cumsum(tied, axis=1) <= need
    take |= tied
    return take


def sort_block(X: np.ndarray, *, centroids: np.ndarray, metric: str):
    """Rows of a block ordered by list.

    Returns
    -------
    order : ndarray of shape (m,), int64
        Permutation of the block's rows: by list, then by row.
    lists : ndarray of shape (m,), int32
        The list of each row, in that order.
    counts : ndarray of shape (n_lists,), int64
        Rows per list in this block.
    """
    labels = nearest_lists(_unit_or_float(X, metric), centroids, 1)[:, 0]
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=centroids.shape[0]).astype(np.int64)
    return order, labels[order].astype(np.int32), counts


def probes_block(Q: np.ndarray, offset: int, *, centroids: np.ndarray, n_probe: int) -> np.ndarray:
    """The ``n_probe`` lists each (prepared) query scans: (n_queries, n_probe), int32.

    The nearest list comes first (:func:`ivf_partial` sets the query's first
    threshold from it); the order of the others does not change the result.
    """
    return nearest_lists(Q, centroids, n_probe, sort="first")


def _group(lists_of_pairs: np.ndarray, n_lists: int):
    """Pairs grouped by list: (order of the pairs, start of each list's run).

    List numbers below 2**16 are sorted as uint16, for which NumPy's stable
    sort is a radix sort.
    """
    keys = lists_of_pairs.astype(np.uint16) if n_lists <= 1 << 16 else lists_of_pairs
    order = np.argsort(keys, kind="stable")
    counts = np.bincount(lists_of_pairs, minlength=n_lists)
    return order, np.concatenate([[0], np.cumsum(counts)])


def prepare_block(X: np.ndarray, metric: str, center: np.ndarray | None = None) -> _Prepared:
    """An index block as :func:`ivf_partial` scans it: ``[s (x - c), s^2 ||x - c||^2, 1]`` in
    float32 (the ones multiply the queries' thresholds, folded into the products).

    ``c`` is ``center`` (the same for every block, e.g. the mean of the
    centroids), else the block's mean; rows are normalised first for "cosine".
    ``s`` is 1, or a power of two for rows outside float32's safe range
    (:func:`~dmlkit._kernels.knn.prepare_rows`).
    """
    return prepare_rows(_unit_or_float(X, metric), "euclidean", center, ones=True)


def prepared_rows(X: np.ndarray, *, metric: str, center: np.ndarray) -> np.ndarray:
    """Just the array of :func:`prepare_block`, never scaled (a blockwise function: the
    index stores it; :func:`ivf_tile` prepares a block whose rows are not in the safe
    range again, scaled)."""
    return prepare_rows(_unit_or_float(X, metric), "euclidean", center, scale=1.0,
                        ones=True).rows


def ivf_tile(rows: np.ndarray, offset: int, Q: np.ndarray, probes: np.ndarray, *,
             X: np.ndarray, center: np.ndarray, **kwargs) -> Neighbors:
    """:func:`ivf_partial` on a block whose :func:`prepared_rows` (with ``center``) are given.

    The prepared rows can then be computed once, next to the block, and kept
    in memory with it.
    """
    norm_max = float(np.sqrt(rows[:, -2].max())) if rows.shape[0] else 0.0
    if safe_norm(norm_max):
        prepared = _Prepared(rows, center_dtype(center), norm_max)
    else:  # rows too far from the centre for float32 products (or all too near it): scaled
        prepared = prepare_block(X, kwargs["metric"], center)
    return ivf_partial(X, offset, Q, probes, prepared=prepared, **kwargs)


def ivf_partial(
    X: np.ndarray, offset: int, Q: np.ndarray, probes: np.ndarray, *, lists: np.ndarray,
    index: np.ndarray, k: int, metric: str, centroids: np.ndarray, y: np.ndarray | None = None,
    prepared: _Prepared | None = None,
) -> Neighbors:
    """The ``k`` nearest rows of each query among the probed lists of one index block.

    Parameters
    ----------
    X : ndarray of shape (m, n_features)
        An index block, rows sorted by list.
    offset : int
        Unused (rows carry their global indices in ``index``).
    Q : ndarray of shape (n_queries, n_features)
        Prepared queries (see :func:`~dmlkit._kernels.knn.prepare_queries`).
    probes : ndarray of shape (n_queries, n_probe), int32
        Lists each query scans, nearest first, from :func:`probes_block`.
    lists, index : ndarrays of shape (m,)
        List and global row index of each row of ``X``.
    k : int
    metric : {"euclidean", "sqeuclidean", "cosine"}
    centroids : ndarray of shape (n_lists, n_features)
    y : ndarray of shape (m,), optional
        Targets carried along as ``values``.
    prepared : optional
        :func:`prepare_block` of ``X`` (its scale included), when stored with
        the index (else computed here: one pass over the block).

    Returns
    -------
    Neighbors
        Exact distances; the result is the exact ``k`` nearest among the rows
        of the probed lists (ties to the lower index).

    Notes
    -----
    The block is prepared as for the exact search (rows relative to a
    centre, squared norms appended as a column; the estimator keeps this copy
    next to the block when the index is cached) and each list is one float32
    product of the queries that probe it and its rows (see :func:`_scan`).
    Every query's nearest list first sets its threshold (the ``k``-th
    smallest distance there, plus the float32 rounding margin: one
    product per list, see :func:`_first_thresholds`); then one product per
    list with all the queries probing it adds the few entries under the
    thresholds. Survivors get exact float64
    distances. The Python loop runs over lists, not queries (and each list
    adds its candidates as small arrays, gathered only when pruning: see
    :class:`_Hits`).
    """
    nq, n_probe = probes.shape
    if X.shape[0] == 0 or nq == 0:
        return empty_neighbors(nq, k, None if y is None else y.dtype)
    n_lists, d = centroids.shape
    P = prepared if prepared is not None else prepare_block(X, metric)  # [x - c, ||x - c||^2, 1]
    _, minus_2, qc2 = scaled_queries(Q, P)
    # [-2 (q - c), 1, -t]: a product with the rows is the proxy less the query's threshold t
    Qf = np.empty((nq, d + 2), dtype=np.float32)
    Qf[:, :d] = minus_2
    Qf[:, d] = 1.0
    Qf[:, d + 1] = 0.0
    q_norm = np.sqrt(qc2)
    margin = _margin(q_norm, P.norm_max, d, folded=True)
    # a threshold that lets every row through: proxy <= R^2 - ||q - c||^2, R = ||q - c||
    # + max ||x - c||; larger ones are clipped to it (which bounds the folded term); for
    # queries farther than FAR (whose products hold only ||x - c||^2) EVERY_CAP
    every = np.fmin((q_norm + P.norm_max) ** 2 * (1 + 1e-3) - qc2 + margin, EVERY_CAP)
    bounds = np.searchsorted(lists, np.arange(n_lists + 1)).tolist()
    hits = _Hits(qc2, margin, k, limit=max(PRUNE_EVERY * nq * k, MIN_PRUNE), folded=Qf[:, d + 1],
                 every=every)
    # thresholds from each query's nearest list (the queries grouped by it, t = 0 so far),
    # then one scan of every probed list with the queries probing it
    order0, starts0 = _group(probes[:, 0], n_lists)
    hits.set_threshold(slice(None), _first_thresholds(P.rows, Qf, k, order0, bounds,
                                                      starts0.tolist()) + qc2 + margin)
    order, starts = _group(probes.ravel(), n_lists)
    _scan(P.rows, Qf, hits, order // n_probe, bounds, starts.tolist())
    q, _, r = hits.prune()
    if not q.size:
        return empty_neighbors(nq, k, None if y is None else y.dtype)
    dist = pair_distances(Q, q, X, r, metric, rows=lambda Xs: _unit_or_float(Xs, metric))
    return select(q, dist, index[r], nq, k, None if y is None else y[r])


class _Hits:
    """The candidates ``(query, proxy score, row)`` of a block and the queries' thresholds.

    :func:`_scan` adds, per product, the queries, rows and proxy scores of
    the entries under the thresholds: small arrays, which are concatenated
    (and the scores turned into ``||q - x||^2``) only when pruning, for all
    products at once. ``threshold`` is on ``||q - x||^2``, in the block's
    scaled units (``s^2`` times: see :func:`prepare_block`); ``qc2`` is
    ``s^2 ||q - c||^2``. ``folded`` (the queries' last column in the
    products) receives ``-t32``: ``t32`` the float32 bound on the proxy
    ``||x - c||^2 - 2 (q - c).(x - c)`` that the products compare with 0
    after subtracting it, at most ``every``, which lets every row through.
    """

    def __init__(self, qc2, margin, k, limit, folded, every):
        self.qc2, self.margin, self.k, self.limit = qc2, margin, k, limit
        self.folded, self.every = folded, every
        self.threshold = np.full(qc2.size, np.inf)
        self.kept = (np.empty(0, np.int64), np.empty(0), np.empty(0, np.int64))
        self.q, self.s, self.r = [], [], []  # added since the last prune
        self.pending = 0

    def add(self, q, scores, r):
        """Candidates: queries ``q``, rows ``r`` and their proxy ``scores`` (float64)."""
        self.q.append(q)
        self.s.append(scores)
        self.r.append(r)
        self.pending += q.size
        if self.pending > self.limit:  # tighten the thresholds
            self.prune()

    def prune(self):
        """Keep the candidates within the margin of their query's ``k``-th; new thresholds.

        Returns the kept ``(q, s, r)``, ``s`` in float64 on ``||q - x||^2``.
        """
        kq, ks, kr = self.kept
        q = np.concatenate([kq, *self.q])
        s = np.concatenate([ks, *self.s])
        r = np.concatenate([kr, *self.r])
        s[kq.size :] += self.qc2[q[kq.size :]]
        q, s, r, threshold = _prune(q, s, r, self.k, self.margin, self.qc2.size)
        # a query with fewer than k candidates so far keeps the bound it had
        self.set_threshold(slice(None), np.minimum(threshold, self.threshold))
        self.kept, self.q, self.s, self.r, self.pending = (q, s, r), [], [], [], q.size
        return q, s, r

    def set_threshold(self, queries, threshold):
        self.threshold[queries] = threshold
        every = self.every[queries]
        with np.errstate(invalid="ignore"):
            t = threshold - self.qc2[queries]
        t = np.where(np.isnan(t) | (t > every), every, t)  # qc2 = inf: NaN
        self.folded[queries] = -_threshold32(t)


def _lists_to_scan(bounds, starts) -> list:
    """The lists with rows in the block and queries probing them."""
    return [i for i in range(len(starts) - 1)
            if bounds[i + 1] > bounds[i] and starts[i + 1] > starts[i]]


def _first_thresholds(rows, Qf, k: int, probing, bounds, starts) -> np.ndarray:
    """Per query, the ``k``-th smallest proxy score among the first rows of its nearest list.

    List ``l`` is the nearest of the queries ``probing[starts[l] :
    starts[l + 1]]``; its first :data:`LIST_ROWS` rows are compared with
    them (one product per list, or per :data:`LIST_QUERIES` of its queries;
    the queries' folded thresholds are still 0). ``inf`` where the list has
    fewer than ``k`` rows in the block.
    """
    kth = np.full(Qf.shape[0], np.inf)
    for lst in _lists_to_scan(bounds, starts):
        s0 = bounds[lst]
        e0 = min(bounds[lst + 1], s0 + LIST_ROWS)
        if e0 - s0 < k:
            continue
        for a in range(starts[lst], starts[lst + 1], LIST_QUERIES):  # bounded products
            qs = probing[a : min(a + LIST_QUERIES, starts[lst + 1])]
            D = np.matmul(Qf[qs], rows[s0:e0].T)
            kth[qs] = np.partition(D, k - 1, axis=1)[:, k - 1]
    return kth


def _scan(rows, Qf, hits: _Hits, probing, bounds, starts) -> None:
    """Compare every list's rows with the queries that probe it, adding the hits.

    List ``l`` (rows ``bounds[l]:bounds[l + 1]``) is probed by the queries
    ``probing[starts[l] : starts[l + 1]]``. Each product is
    ``(queries x rows)``, at most :data:`LIST_QUERIES` x :data:`LIST_ROWS`
    (longer runs go in pieces): the proxy less each query's threshold,
    folded in (the queries' last column holds ``-t``, the rows' a 1), so
    that the hits are the entries at or under 0, a comparison with one
    scalar (several times cheaper than with a threshold per query). The
    hits' proxies (``t`` added back, in float64) go to ``hits``; a query's
    threshold is read when its list's queries are gathered (pruning only
    tightens it: reading it later would only take fewer hits).
    """
    d2 = rows.shape[1]
    scan = _lists_to_scan(bounds, starts)
    if not scan:
        return
    # buffers reused by every list (fresh large temporaries cost page faults, the more so in
    # dask workers, which return freed memory to the OS eagerly)
    n_rows = min(max(bounds[i + 1] - bounds[i] for i in scan), LIST_ROWS)
    n_q = min(max(starts[i + 1] - starts[i] for i in scan), LIST_QUERIES)
    gathered = np.empty((n_q, d2), dtype=np.float32)
    tile = np.empty(n_rows * n_q, dtype=np.float32)
    mask = np.zeros(-(-tile.size // 8) * 8, dtype=bool)
    words = np.empty(mask.size // 8, dtype=bool)
    zero = np.float32(0.0)
    for lst in scan:
        s0, e0 = bounds[lst], bounds[lst + 1]
        for a in range(starts[lst], starts[lst + 1], LIST_QUERIES):
            b = min(a + LIST_QUERIES, starts[lst + 1])
            qs = probing[a:b]
            G = np.take(Qf, qs, axis=0, out=gathered[: b - a])
            for s in range(s0, e0, LIST_ROWS):
                e = min(e0, s + LIST_ROWS)
                shape = (b - a, e - s)
                D = np.matmul(G, rows[s:e].T, out=tile[: shape[0] * shape[1]].reshape(shape))
                np.less_equal(D, zero, out=mask[: D.size].reshape(shape))
                found = _hits(mask, words, D.size) if D.size > 1 << 15 else \
                    np.flatnonzero(mask[: D.size])
                if found.size:
                    i, j = np.divmod(found, e - s)
                    scores = D.ravel()[found].astype(np.float64)
                    scores -= G[i, d2 - 1]  # + t
                    hits.add(qs[i], scores, j + s)
