"""K-means kernels: per-chunk partial statistics, their combines, local solvers.

Per chunk (no dask here):

- :func:`lloyd_partial` assigns each row to its nearest centre and returns the
  weighted per-cluster sums and weights, the weighted inertia and the rows
  farthest from their centres (used to re-seed empty clusters).
- :func:`candidate_partial` is one round of k-means|| (Bahmani et al. 2012):
  the cost ``phi`` of the chunk with respect to the current candidates and the
  chunk's best sampling keys ``t = u / (w d^2)``; a row is sampled when
  ``t < l / phi_total`` which is only known after the reduction.
- :func:`sample_partial` keeps the rows with the smallest counter-based
  uniforms: a uniform sample without replacement that ignores chunking.
- :func:`assign_weights_partial` counts the weight attracted by each centre.

Local (on the client, small inputs): :func:`kmeans_plusplus` and
:func:`local_lloyd` recluster weighted candidates; :func:`update_centers`
turns reduced Lloyd statistics into new centres.

Every kernel takes a block in either layout. A cached copy for K-means is kept
feature by feature (Fortran order, :func:`to_feature_major`), where
:func:`lloyd_partial` runs its two products as (features x rows) ones, faster
with OpenBLAS; a streamed block comes row-major, as the store holds it.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dmlkit._kernels.random import uniform_rows
from dmlkit._kernels.scratch import scratch

#: Rows per sub-block inside a chunk: keeps the (rows x clusters) distance
#: matrix in cache and lets float32 partial sums be flushed to float64 often.
BLOCK_ELEMENTS = 1 << 16


#: Lloyd's float32 sums, and k-means||'s distances, are of ``x - m`` (``m`` the centres'
#: mean) when ``|m|`` exceeds this many times the centres' spread around it.
SHIFT_SUMS = 8.0


#: Rows per product of the one-hot memberships with the rows (the per-cluster sums):
#: BLAS runs a (k x rows) by (rows x d) product several times faster in pieces of about
#: this many rows than in one piece of 8,192 (measured with OpenBLAS, k=8, d=32). The
#: other products of a sub-block (the scores, the rows' own centres) are run in pieces
#: of this many rows too: on 8,192 rows OpenBLAS allocates a working buffer of about
#: 0.5 MB per call, which a Dask worker with Dask's default malloc settings maps afresh
#: and page-faults in every time.
SUM_ROWS = 2048


def _block_rows(n_centers: int) -> int:
    return int(max(256, min(16384, BLOCK_ELEMENTS // max(n_centers, 1))))


def _as_float(X: np.ndarray) -> np.ndarray:
    """Integer and boolean blocks are computed in float64; floats stay as they are."""
    return X if X.dtype.kind == "f" else X.astype(np.float64)


def assign(X: np.ndarray, centers: np.ndarray):
    """Nearest centre of each row of ``X`` and the squared distance to it.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
    centers : ndarray of shape (k, n_features), same dtype as ``X``

    Returns
    -------
    labels : ndarray of shape (n,), int64
    d2 : ndarray of shape (n,), X's dtype
        Exact squared Euclidean distance ``||x - c_label||^2`` computed from the
        difference (not the expanded form), so sums of it are the true inertia.
    """
    labels = nearest_centers(X, centers)
    diff = X - centers[labels]
    d2 = np.einsum("ij,ij->i", diff, diff)
    return labels, d2


def shifted_scores(centers: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What ranks the centres for a row ``x``, relative to the centres' mean ``m``.

    ``||x - c||^2 - ||x - m||^2 = const_c - 2 x . (c - m)`` with ``const_c =
    ||c - m||^2 + 2 m . (c - m)``: the products see ``c - m``, not ``c``, so
    data far from the origin (an offset of 1e4 in float32, say) keeps the
    digits that tell its clusters apart. Returns ``-2 (c - m)^T`` (d, k) and
    ``const`` (k,) in ``dtype``, and ``m`` in float64.
    """
    C = np.asarray(centers, dtype=np.float64)
    m = C.mean(axis=0) if C.shape[0] else np.zeros(C.shape[1])
    D = C - m
    const = np.einsum("ij,ij->i", D, D) + 2.0 * (D @ m)
    return np.ascontiguousarray((-2.0 * D.T).astype(dtype)), const.astype(dtype), m


def far_from_origin(centers: np.ndarray, m: np.ndarray) -> bool:
    """Whether the centres' mean ``m`` dwarfs their spread around it (:data:`SHIFT_SUMS`):
    float32 sums or squared norms of such rows lose the digits that set them apart."""
    C = np.asarray(centers, dtype=np.float64)
    return bool(C.size) and float(np.abs(m).max()) > SHIFT_SUMS * float(np.abs(C - m).max())


def nearest_centers(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre of each row (the labels of :func:`assign`).

    Scores relative to the centres' mean (:func:`shifted_scores`).
    """
    minus_2dt, const, _ = shifted_scores(centers, X.dtype)
    scores = X @ minus_2dt
    scores += const
    return scores.argmin(axis=1)


def min_sq_distances(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Squared distance of each row to its nearest centre (expanded form, clipped at 0).

    The scores ``||c||^2 - 2 c.x`` are computed as a (centres x rows) product,
    so that the minimum over the centres is one vectorised pass (along the
    short axis of a (rows x centres) product NumPy reduces row by row).
    """
    # relative to the centres' mean where it dwarfs their spread: data far from the
    # origin keeps its digits (a copy of the rows, so only then)
    C64 = np.asarray(centers, dtype=np.float64)
    m = C64.mean(axis=0) if C64.shape[0] else np.zeros(C64.shape[1])
    if far_from_origin(C64, m):
        m = m.astype(X.dtype)
        X = X - m
        centers = (C64 - m).astype(X.dtype)
    x2 = np.einsum("ij,ij->i", X, X)
    c2 = np.einsum("ij,ij->i", centers, centers)
    scores = (-2.0 * centers).astype(centers.dtype, copy=False) @ X.T
    scores += c2[:, None]
    d2 = np.minimum.reduce(scores, axis=0)
    d2 += x2
    return np.maximum(d2, 0, out=d2)


class LloydPartial(NamedTuple):
    """Sufficient statistics of one Lloyd step over some rows.

    sums : ndarray of shape (k, n_features), float64 -- weighted sums of rows per cluster
    weights : ndarray of shape (k,), float64 -- weight per cluster
    inertia : float
        Weighted sum of squared distances to the given centres when computed
        with ``exact=True``; NaN otherwise (see :func:`inertia_from_sums`).
    """

    sums: np.ndarray
    weights: np.ndarray
    inertia: float


class _Members:
    """One-hot memberships of rows in their nearest centre, with buffers reused across
    sub-blocks.

    The scores plus each centre's constant are laid out (centres x rows): a
    row-major block's product (rows x centres) is written transposed into that
    buffer, a feature-major block's product is computed in it directly. The
    minimum over the centres is then one vectorised pass along the long axis
    (NumPy reduces a short axis one row at a time) and a row's membership is
    whether its score equals that minimum: no labels, no ``argmin``. A row
    whose minimum is shared by several centres (duplicate centres) would count
    in each; the memberships' column sums show it, and such a sub-block is
    assigned by ``argmin`` instead, which picks the lowest of the tied centres.
    """

    def __init__(self, k: int, rows: int, dtype, c2: np.ndarray):
        self.c2col = c2[:, None]
        self.T = scratch("kmeans.scores_t", (k, rows), dtype)
        self.best = scratch("kmeans.best", (rows,), dtype)
        self.onehot = scratch("kmeans.onehot", (k, rows), dtype)
        self.ones = np.ones(rows, dtype=dtype)
        self.ids = np.arange(k)[:, None]

    def __call__(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(members, counts)`` from a (rows x centres) product: (k, rows) 0/1 in
        ``scores``' dtype, and (k,) row counts."""
        nb = scores.shape[0]
        return self.of(np.add(scores.T, self.c2col, out=self.T[:, :nb]))

    def of(self, T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(members, counts)`` from the (centres x rows) scores, constants added."""
        nb = T.shape[1]
        best = np.minimum.reduce(T, axis=0, out=self.best[:nb])
        members = np.equal(T, best, out=self.onehot[:, :nb])
        counts = members @ self.ones[:nb]  # exact: integers below 2**24
        if float(counts.sum()) != nb:  # a row tied between centres
            members = np.equal(T.argmin(axis=0), self.ids, out=members)
            counts = members @ self.ones[:nb]
        return members, counts


def feature_major(X: np.ndarray) -> bool:
    """Whether ``X`` (rows x features) is laid out feature by feature (Fortran order):
    ``X.T`` is then a C-contiguous (features x rows) array."""
    return (X.ndim == 2 and X.shape[0] > 1 and X.shape[1] > 1 and X.flags.f_contiguous
            and not X.flags.c_contiguous)


def to_feature_major(X: np.ndarray, rows: int = 256) -> np.ndarray:
    """A copy of ``X`` (rows x features) in Fortran order, the layout that
    :func:`lloyd_partial` reads fastest. Copied a few hundred rows at a time:
    several times faster than ``np.asfortranarray``'s one strided pass."""
    X = np.asarray(X)
    out = np.empty(X.shape, dtype=X.dtype, order="F")
    for s in range(0, X.shape[0], rows):
        out[s : s + rows] = X[s : s + rows]
    return out


def lloyd_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, centers: np.ndarray, exact: bool = False,
    with_sums: bool = True,
) -> LloydPartial:
    """One Lloyd step's statistics for the rows ``X`` starting at global row ``offset``.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
        Row-major, or feature-major (Fortran order, :func:`feature_major`): a
        cached copy is kept that way (:func:`to_feature_major`), for which both
        products run about twice as fast.
    w : ndarray of shape (n,) or None
        Sample weights; None means all ones.
    offset : int
        Global index of the first row of ``X`` (unused; kept for the kernel signature).
    centers : ndarray of shape (k, n_features), float64
        Current centres; cast to ``X``'s dtype for the distance computation.
    exact : bool, default=False
        Also compute the inertia, each row's squared distance taken from the
        difference ``x - c``. Without it the kernel does the least work a Lloyd
        step needs (one product for the scores, one for the sums); the
        inertia then follows from the sums, see :func:`inertia_from_sums`.
    with_sums : bool, default=True
        Compute the per-cluster sums (left at zero otherwise: for a pass that only
        wants the exact inertia and the weights).

    Notes
    -----
    Rows are processed in sub-blocks so the score matrix stays in cache and
    float32 partial sums are flushed into float64 accumulators every
    :data:`SUM_ROWS` rows. The two layouts compute the same quantities with
    different BLAS products, so their float32 rounding differs.
    """
    X = _as_float(X)
    k, d = centers.shape
    C = centers.astype(X.dtype, copy=False)
    minus_2ct, c2, m = shifted_scores(centers, X.dtype)
    # the sums too are of x - m where the centres' mean dwarfs their spread (float32 sums
    # of rows far from the origin would lose the digits that place the centres)
    m32 = m.astype(X.dtype)
    shift = far_from_origin(centers, m) and X.dtype != np.float64
    by_feature = feature_major(X)
    XT = X.T if by_feature else None  # (d, n), C-contiguous
    minus_2c = np.ascontiguousarray(minus_2ct.T) if by_feature else None
    sums = np.zeros((d, k) if by_feature else (k, d), dtype=np.float64)
    weights = np.zeros(k, dtype=np.float64)
    inertia = 0.0 if exact else np.nan
    step = min(_block_rows(k), X.shape[0])
    nearest = _Members(k, step, X.dtype, c2)
    sum_rows = min(SUM_ROWS, step)
    if by_feature:
        moved = scratch("kmeans.moved_t", (d, sum_rows), X.dtype) if shift else None
        m_col = m32[:, None]
        CT = np.ascontiguousarray(C.T)
        own = scratch("kmeans.own_t", (d, step), X.dtype) if exact else None
    else:
        scores = scratch("kmeans.scores", (step, k), X.dtype)
        moved = scratch("kmeans.moved", (sum_rows, d), X.dtype) if shift else None
        own = scratch("kmeans.own", (step, d), X.dtype) if exact else None
    for s in range(0, X.shape[0], step):
        if by_feature:
            Xb = XT[:, s : s + step]
            nb = Xb.shape[1]
            T = nearest.T[:, :nb]
            for a in range(0, nb, sum_rows):  # products in pieces (see SUM_ROWS)
                np.matmul(minus_2c, Xb[:, a : a + sum_rows], out=T[:, a : a + sum_rows])
            members, counts = nearest.of(np.add(T, nearest.c2col, out=T))
        else:
            Xb = X[s : s + step]
            nb = Xb.shape[0]
            for a in range(0, nb, sum_rows):
                np.matmul(Xb[a : a + sum_rows], minus_2ct, out=scores[a : min(a + sum_rows, nb)])
            members, counts = nearest(scores[:nb])
        if exact:  # each row's own centre: the 0/1 memberships times the centres, exactly
            if by_feature:
                diff = own[:, :nb]
                for a in range(0, nb, sum_rows):
                    np.matmul(CT, members[:, a : a + sum_rows], out=diff[:, a : a + sum_rows])
                d2 = np.einsum("ij,ij->j", *(np.subtract(Xb, diff, out=diff),) * 2)
            else:
                diff = own[:nb]
                for a in range(0, nb, sum_rows):
                    np.matmul(members[:, a : a + sum_rows].T, C, out=diff[a : a + sum_rows])
                d2 = np.einsum("ij,ij->i", *(np.subtract(Xb, diff, out=diff),) * 2)
            inertia += float(d2.sum(dtype=np.float64) if w is None
                             else np.dot(d2.astype(np.float64), w[s : s + nb]))
        if w is None:
            weights += counts
        else:
            wb = w[s : s + nb]
            # 0/1 times the float64 weights, through a reused float64 copy of the memberships
            # (a mixed-type product would allocate one per sub-block)
            members64 = scratch("kmeans.members64", (k, step), np.float64)[:, :nb]
            np.copyto(members64, members)
            weights += members64 @ wb.astype(np.float64, copy=False)
            members *= wb.astype(X.dtype, copy=False)
        for a in range(0, nb if with_sums else 0, sum_rows):  # short products: faster
            if by_feature:
                cols = Xb[:, a : a + sum_rows]
                if shift:
                    cols = np.subtract(cols, m_col, out=moved[:, : cols.shape[1]])
                sums += cols @ members[:, a : a + sum_rows].T
            else:
                rows = Xb[a : a + sum_rows]
                if shift:
                    rows = np.subtract(rows, m32, out=moved[: rows.shape[0]])
                sums += members[:, a : a + sum_rows] @ rows
    if by_feature:
        sums = np.ascontiguousarray(sums.T)
    if shift:
        sums += np.outer(weights, m32.astype(np.float64))
    return LloydPartial(sums, weights, inertia)


def inertia_from_sums(stats: LloydPartial, centers: np.ndarray, weighted_sq_norm: float) -> float:
    """Inertia with respect to ``centers`` from a step's sums, without touching the rows.

    ``sum_i w_i ||x_i - c_(i)||^2 = sum_i w_i ||x_i||^2 + sum_k (W_k ||c_k||^2 - 2 c_k . S_k)``,
    with ``S_k`` and ``W_k`` the weighted sum and weight of cluster ``k`` and
    ``weighted_sq_norm`` the first term (a constant of the data, from the first
    pass). Used to monitor iterations; ``inertia_`` itself is computed exactly.
    """
    c = np.asarray(centers, dtype=np.float64)
    per_cluster = stats.weights * np.einsum("ij,ij->i", c, c) - 2.0 * np.einsum("ij,ij->i", c, stats.sums)
    return float(weighted_sq_norm + per_cluster.sum())


def combine_lloyd(a: LloydPartial, b: LloydPartial) -> LloydPartial:
    """Associative merge of two :class:`LloydPartial` records."""
    return LloydPartial(a.sums + b.sums, a.weights + b.weights, a.inertia + b.inertia)


class FarPartial(NamedTuple):
    """The ``m`` rows farthest from their nearest centre, for re-seeding empty clusters.

    Ordered by decreasing squared distance ``d2``, ties to the lower global
    row ``index``; ``weight`` and ``label`` (nearest centre) per row, ``rows``
    of shape (m, n_features) in float64.
    """

    d2: np.ndarray
    index: np.ndarray
    weight: np.ndarray
    label: np.ndarray
    rows: np.ndarray
    m: int


def _top_far(d2, index, weight, label, rows, m) -> FarPartial:
    if d2.shape[0] > m:
        cut = np.partition(d2, d2.shape[0] - m)[d2.shape[0] - m] if m > 0 else np.inf
        sel = np.flatnonzero(d2 >= cut)
        d2, index, weight, label, rows = d2[sel], index[sel], weight[sel], label[sel], rows[sel]
    order = np.lexsort((index, -d2))[:m]
    return FarPartial(d2[order], index[order], weight[order], label[order],
                      np.asarray(rows[order], dtype=np.float64), m)


def farthest_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, centers: np.ndarray, m: int
) -> FarPartial:
    """The ``m`` rows of the chunk farthest from their nearest centre (exact distances)."""
    X = _as_float(X)
    labels, d2 = assign(X, centers.astype(X.dtype, copy=False))
    index = np.arange(offset, offset + X.shape[0], dtype=np.int64)
    return _top_far(d2.astype(np.float64), index, _weights_f64(w, X.shape[0]), labels, X, m)


def combine_far(a: FarPartial, b: FarPartial) -> FarPartial:
    """Associative merge keeping the ``m`` farthest rows."""
    return _top_far(*(np.concatenate([x, y]) for x, y in zip(a[:-1], b[:-1])), a.m)


def update_centers(
    stats: LloydPartial, centers: np.ndarray, far: FarPartial | None = None
) -> tuple[np.ndarray, int]:
    """New centres from reduced Lloyd statistics, re-seeding empty clusters.

    An empty cluster (zero weight) takes the row farthest from its own centre;
    the next empty cluster the second farthest, and so on (rows ordered by
    decreasing squared distance, ties to the lower global index). That row's
    weight moves from its old cluster to the empty one, exactly as
    scikit-learn's ``_relocate_empty_clusters_dense`` does, so the result does
    not depend on chunking or scheduling. Nothing is relocated when every row
    sits on its centre (more clusters than distinct rows); such clusters keep
    their previous centre.

    Returns
    -------
    new_centers : ndarray of shape (k, n_features), float64
    n_relocated : int
    """
    sums = stats.sums.copy()
    weights = stats.weights.copy()
    empty = np.flatnonzero(weights == 0)
    n_relocated = 0
    if empty.size and far is not None and far.d2.size and far.d2[0] > 0:
        for j, cluster in enumerate(empty[: far.d2.size]):
            wj, old, row = far.weight[j], far.label[j], far.rows[j]
            sums[old] -= row * wj
            weights[old] -= wj
            sums[cluster] = row * wj
            weights[cluster] = wj
            n_relocated += 1
    new = centers.astype(np.float64, copy=True)
    filled = weights > 0
    new[filled] = sums[filled] / weights[filled, None]
    return new, n_relocated


class SamplePartial(NamedTuple):
    """Rows kept by a sampling kernel, ordered by ``(key, index)``.

    cost : float -- weighted sum of squared distances to the candidates (0 when unused)
    key : ndarray of shape (m,), float64 -- the sampling key of each kept row
    index : ndarray of shape (m,), int64 -- global row indices
    weight : ndarray of shape (m,), float64
    rows : ndarray of shape (m, n_features), float64
    size : int -- how many rows to keep at most
    """

    cost: float
    key: np.ndarray
    index: np.ndarray
    weight: np.ndarray
    rows: np.ndarray
    size: int


def _smallest(key, index, weight, rows, m):
    finite = np.isfinite(key)
    if not finite.all():
        key, index, weight, rows = key[finite], index[finite], weight[finite], rows[finite]
    if key.shape[0] > m:
        cut = np.partition(key, m - 1)[m - 1] if m > 0 else -np.inf
        sel = np.flatnonzero(key <= cut)
        key, index, weight, rows = key[sel], index[sel], weight[sel], rows[sel]
    order = np.lexsort((index, key))[:m]
    return key[order], index[order], weight[order], rows[order]


def _weights_f64(w, n):
    return np.ones(n) if w is None else np.asarray(w, dtype=np.float64)


def candidate_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, candidates: np.ndarray,
    stream: int, cap: int,
) -> SamplePartial:
    """One k-means|| round over a chunk.

    Computes the weighted cost ``phi`` of the chunk with respect to
    ``candidates`` and keeps the ``cap`` rows with the smallest keys
    ``t_i = u_i / (w_i d_i^2)``, ``u_i`` the counter-based uniform of global row
    ``i`` in ``stream``. Row ``i`` is sampled with probability
    ``min(1, l w_i d_i^2 / phi)`` exactly when ``t_i < l / phi``, a threshold the
    caller applies after the reduction, when the total ``phi`` is known.
    """
    X = _as_float(X)
    n = X.shape[0]
    C = candidates.astype(X.dtype, copy=False)
    step = _block_rows(C.shape[0])
    d2 = np.concatenate(
        [min_sq_distances(X[s : s + step], C) for s in range(0, n, step)] or [np.empty(0)]
    ).astype(np.float64)
    wf = _weights_f64(w, n)
    wd2 = wf * d2
    cost = float(wd2.sum())
    u = uniform_rows(stream, offset, offset + n)
    with np.errstate(divide="ignore"):
        key = np.where(wd2 > 0, u / wd2, np.inf)
    index = np.arange(offset, offset + n, dtype=np.int64)
    kept = _smallest(key, index, wf, X, cap)
    return SamplePartial(cost, kept[0], kept[1], kept[2], np.asarray(kept[3], np.float64), cap)


def sample_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, stream: int, size: int
) -> SamplePartial:
    """Keep the ``size`` rows with the smallest uniforms of ``stream``.

    Over the whole data set this is a uniform sample without replacement of
    ``size`` rows that does not depend on chunking. Rows of zero weight are
    never sampled.
    """
    X = _as_float(X)
    n = X.shape[0]
    wf = _weights_f64(w, n)
    key = uniform_rows(stream, offset, offset + n)
    key[wf <= 0] = np.inf
    index = np.arange(offset, offset + n, dtype=np.int64)
    kept = _smallest(key, index, wf, X, size)
    return SamplePartial(0.0, kept[0], kept[1], kept[2], np.asarray(kept[3], np.float64), size)


def combine_samples(a: SamplePartial, b: SamplePartial) -> SamplePartial:
    """Associative merge: add costs, keep the ``size`` smallest keys."""
    m = a.size
    kept = _smallest(
        np.concatenate([a.key, b.key]),
        np.concatenate([a.index, b.index]),
        np.concatenate([a.weight, b.weight]),
        np.concatenate([a.rows, b.rows]),
        m,
    )
    return SamplePartial(a.cost + b.cost, *kept, m)


def assign_weights_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, centers: np.ndarray
) -> np.ndarray:
    """Weight of the rows nearest to each centre: ndarray of shape (k,), float64."""
    X = _as_float(X)
    C = centers.astype(X.dtype, copy=False)
    step = _block_rows(C.shape[0])
    out = np.zeros(C.shape[0])
    for s in range(0, X.shape[0], step):
        labels = nearest_centers(X[s : s + step], C)
        wb = None if w is None else w[s : s + step]
        out += np.bincount(labels, weights=wb, minlength=C.shape[0])
    return out


def add(a, b):
    """Combine for plain arrays and numbers."""
    return a + b


def kmeans_plusplus(
    points: np.ndarray, weights: np.ndarray, n_clusters: int, rng: np.random.Generator,
    n_local_trials: int | None = None,
) -> np.ndarray:
    """Greedy weighted k-means++ seeding (Arthur and Vassilvitskii 2007) on a small set.

    Each new centre is the best of ``n_local_trials`` (default ``2 + log k``)
    candidates drawn with probability proportional to ``weight * d^2``.

    Returns
    -------
    centers : ndarray of shape (n_clusters, n_features), float64
    """
    points = np.asarray(points, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    n = points.shape[0]
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(n_clusters))
    centers = np.empty((n_clusters, points.shape[1]))
    first = rng.choice(n, p=weights / weights.sum())
    centers[0] = points[first]
    closest = ((points - centers[0]) ** 2).sum(axis=1)
    pot = float(closest @ weights)
    for c in range(1, n_clusters):
        if pot <= 0:  # fewer distinct points than clusters: repeat points
            centers[c] = points[rng.integers(n)]
            continue
        cum = np.cumsum(closest * weights)
        trials = np.searchsorted(cum, rng.random(n_local_trials) * cum[-1], side="right")
        trials = np.minimum(trials, n - 1)
        d_trials = ((points[None, :, :] - points[trials][:, None, :]) ** 2).sum(axis=2)
        d_trials = np.minimum(closest, d_trials)
        pots = d_trials @ weights
        best = int(np.argmin(pots))
        centers[c] = points[trials[best]]
        closest = d_trials[best]
        pot = float(pots[best])
    return centers


def local_lloyd(
    points: np.ndarray, weights: np.ndarray, centers: np.ndarray, max_iter: int = 100,
    tol: float = 1e-8,
) -> np.ndarray:
    """Weighted Lloyd iterations in memory on a small point set (k-means|| reclustering)."""
    points = np.asarray(points, dtype=np.float64)
    centers = np.asarray(centers, dtype=np.float64).copy()
    for _ in range(max_iter):
        part = lloyd_partial(points, weights, 0, centers)
        far = None
        if (part.weights == 0).any():
            far = farthest_partial(points, weights, 0, centers, centers.shape[0])
        new, _ = update_centers(part, centers, far)
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if shift <= tol:
            break
    return centers
