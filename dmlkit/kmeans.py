"""Distributed K-means: Lloyd's algorithm as one tree-reduced pass per iteration."""
from __future__ import annotations

import numbers
import time
import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin

from dmlkit import _graph, data
from dmlkit._kernels import kmeans as K
from dmlkit._kernels.random import stream_key
from dmlkit._kernels.stats import mean_variance
from dmlkit._progress import progress_bar

_INITS = ("k-means||", "k-means++", "random")


def _labels_block(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    X = K._as_float(X)
    return K.assign(X, centers.astype(X.dtype, copy=False))[0]


def _distances_block(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    X = K._as_float(X)
    C = centers.astype(X.dtype, copy=False)
    d2 = np.einsum("ij,ij->i", X, X)[:, None] - 2.0 * (X @ C.T) + np.einsum("ij,ij->i", C, C)
    return np.sqrt(np.maximum(d2, 0, out=d2))


def _integer_seed(random_state: Any) -> int:
    """An integer seed from ``random_state`` (None: fresh OS entropy)."""
    if random_state is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state={random_state} should be >= 0")
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(0, 2**31 - 1))
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(0, 2**63 - 1))
    raise ValueError(f"random_state={random_state!r} should be None, an int >= 0, a "
                     "numpy RandomState or a numpy Generator")


class KMeans(ClusterMixin, TransformerMixin, BaseEstimator):
    """K-means clustering of data too large for memory, one pass per Lloyd iteration.

    Each iteration maps a kernel over every row chunk of ``X`` that returns the
    chunk's weighted per-cluster sums and weights and its inertia; the partial
    results are combined by a tree reduction of fan-in ``split_every`` and the
    new centres are the weighted means. Parameters and attributes mean what
    they mean in :class:`sklearn.cluster.KMeans`.

    Parameters
    ----------
    n_clusters : int, default=8
        Number of clusters.
    init : {"k-means||", "k-means++", "random"} or array-like of shape (n_clusters, n_features), default="k-means||"
        - "k-means||": scalable k-means++ (Bahmani et al. 2012). A first centre
          drawn uniformly from the rows, then ``init_rounds`` rounds that each
          sample every row with probability ``l * w * d^2 / phi`` (``l =
          oversampling_factor * n_clusters``, ``d`` the distance to the current
          candidates, ``phi`` their total cost), one pass per round; a last
          pass weights each candidate by the sample weight nearest to it, and
          weighted k-means++ followed by Lloyd reclusters the candidates into
          ``n_clusters`` centres in memory.
        - "k-means++": greedy k-means++ on a uniform sample of at most
          100,000 rows (one pass to draw it).
        - "random": ``n_clusters`` rows drawn uniformly without replacement
          (one pass).
        - an array: these initial centres (``n_init`` is then 1).
    n_init : int, default=1
        Number of runs with different seeds; the run with the lowest inertia wins.
    max_iter : int, default=300
        Maximum number of Lloyd iterations per run.
    tol : float, default=1e-4
        Convergence when the sum of squared centre shifts is at most
        ``tol * mean(var(X, axis=0))``, relative to the data's variance as in
        scikit-learn. The variance comes from the first pass at no extra cost.
    random_state : int, numpy Generator or RandomState, or None, default=None
        Seeds all sampling. The random numbers are tied to global row numbers,
        so the same seed gives the same sample for every chunking and schedule.
    oversampling_factor : float, default=2.0
        k-means|| draws about ``oversampling_factor * n_clusters`` candidates
        per round.
    init_rounds : int, default=5
        Rounds of k-means|| sampling.
    split_every : int or None, default=None
        Fan-in of the tree reduction (None: 8).
    cache : {"auto", True, False}, default="auto"
        "auto" persists ``X`` in the cluster's memory when it takes at most
        half of it and streams it from its store on every pass otherwise.
        The cached copy keeps ``X``'s chunks (joining chunks under 8 MiB),
        spread evenly over the workers; each pass then runs one task per
        worker thread over the chunks it holds, which keeps the scheduler's
        overhead per pass small. The copy holds each chunk feature by
        feature (Fortran order), where the Lloyd kernel runs about twice as
        fast; an ``X`` already in the workers' memory is copied so too when
        it takes at most an eighth of their memory (else used as it is).
        Products over the two layouts round differently in float32, so a
        cached and a streamed fit agree to that rounding, not to the bit.
        While ``X`` streams (``False``, or too
        large), ``sample_weight`` (and a supervised estimator's targets)
        stays in memory when it takes at most a quarter of that half
        (nearest neighbours excepted: a fitted index keeps its rows).
    progress : bool, default=False
        Show a progress bar (terminal or notebook) with the current inertia.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
        In ``X``'s floating dtype (float64 for integer data).
    labels_ : ndarray of shape (n_samples,), or a lazy dask array for lazy input
        Index of the nearest final centre of every row.
    inertia_ : float
        Weighted sum of squared distances of the rows to their nearest final centre.
    n_iter_ : int
        Lloyd iterations run in the best run.
    converged_ : bool
        Whether the best run met ``tol`` before ``max_iter``.
    history_ : list of dict
        Per Lloyd iteration of the best run: ``iteration``, ``inertia`` (with
        respect to the centres the iteration started from), ``center_shift``
        (sum of squared shifts), ``n_relocated`` (empty clusters re-seeded) and
        ``seconds``.
    n_passes_ : int
        Passes over the data made by ``fit`` (all runs, init included).
    n_features_in_ : int

    Notes
    -----
    Passes over the data: one per Lloyd iteration, plus ``init_rounds + 1``
    for k-means|| (which also reads the one chunk holding its first centre),
    one for "k-means++" and "random", none for an array, plus one at the end
    for the exact ``inertia_`` with respect to the final centres. Each pass is
    one ``compute``.

    Convergence is tested on the centre shift only. scikit-learn also stops
    when no label changed ("strict convergence"); then the shift is exactly 0,
    so with ``tol=0`` both stop at the same iteration.
    The first pass also checks the data for NaN and inf and computes its
    variance, fused into the same tasks.

    An empty cluster is re-seeded deterministically with the row farthest from
    its own centre (the second empty cluster with the second farthest, and so
    on; ties go to the lower row index), whose weight moves from its old
    cluster, as scikit-learn does. Finding those rows costs one more pass, in
    the iterations that leave a cluster empty only.

    Examples
    --------
    >>> import numpy as np
    >>> from dmlkit import KMeans
    >>> X = np.array([[1, 2], [1, 4], [1, 0], [10, 2], [10, 4], [10, 0]], dtype=float)
    >>> km = KMeans(n_clusters=2, random_state=0).fit(X)
    >>> sorted(km.cluster_centers_[:, 0].tolist())
    [1.0, 10.0]
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | Any = "k-means||",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: Any = None,
        oversampling_factor: float = 2.0,
        init_rounds: int = 5,
        split_every: int | None = None,
        cache: bool | str = "auto",
        progress: bool = False,
    ):
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.oversampling_factor = oversampling_factor
        self.init_rounds = init_rounds
        self.split_every = split_every
        self.cache = cache
        self.progress = progress

    # ------------------------------------------------------------------ checks
    def _check_params(self, n_samples: int, n_features: int) -> np.ndarray | None:
        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"{name}={v!r} should be an integer >= {low}")

        integer("n_clusters", 1)
        integer("n_init", 1)
        integer("max_iter", 1)
        integer("init_rounds", 1)
        if not isinstance(self.tol, numbers.Real) or not self.tol >= 0:
            raise ValueError(f"tol={self.tol!r} should be a number >= 0")
        if not isinstance(self.oversampling_factor, numbers.Real) or not self.oversampling_factor > 0:
            raise ValueError(f"oversampling_factor={self.oversampling_factor!r} should be > 0")
        _graph.check_split_every(self.split_every)
        if n_samples < self.n_clusters:
            raise ValueError(f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}")
        if isinstance(self.init, str):
            if self.init not in _INITS:
                raise ValueError(f"init={self.init!r} should be one of {_INITS} or an array "
                                 f"of shape (n_clusters, n_features)")
            return None
        init = np.asarray(self.init, dtype=np.float64)
        if init.shape != (self.n_clusters, n_features):
            raise ValueError(f"init has shape {init.shape}; expected (n_clusters, n_features)"
                             f" = ({self.n_clusters}, {n_features})")
        if not np.isfinite(init).all():
            raise ValueError("init contains NaN or inf")
        return init

    # -------------------------------------------------------------------- fit
    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "KMeans":
        """Compute k-means clustering.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), dask array, xarray object or Zarr path
            Training rows; a Zarr store is read chunk by chunk, never loaded whole.
        y : ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights; None means all ones.

        Returns
        -------
        self : KMeans
        """
        X_in = data.as_matrix(X)
        n, d = X_in.shape
        init_array = self._check_params(n, d)
        w_in = data.check_sample_weight(sample_weight, X_in)
        n_init = self.n_init
        if init_array is not None and n_init != 1:
            warnings.warn(f"n_init={n_init} is ignored when init is an array; running once",
                          RuntimeWarning, stacklevel=2)
            n_init = 1
        seed = _integer_seed(self.random_state)
        Xd, (w,), _ = data.cache(X_in, [w_in], self.cache, X, feature_major=True)
        blocks = _graph.RowBlocks(Xd, w)
        passes = _graph.Passes(
            blocks, self.split_every,
            check=lambda s: data.check_stats(s, X_in.chunks[0], w is not None))
        best = None
        for run in range(n_init):
            # the steps on the client (k-means++ and Lloyd on the candidates, the centre
            # updates) on one BLAS thread too, as the linear models' solvers
            with _graph.one_blas_thread:
                result = self._fit_single(passes, seed, run, init_array)
            if best is None or result["inertia"] < best["inertia"]:
                best = result
        dtype = X_in.dtype if X_in.dtype.kind == "f" else np.dtype(np.float64)
        self.cluster_centers_ = best["centers"].astype(dtype)
        self.inertia_ = float(best["inertia"])
        self.n_iter_ = best["n_iter"]
        self.converged_ = best["converged"]
        self.history_ = best["history"]
        self.n_passes_ = passes.count
        self.n_features_in_ = d
        if data.is_lazy(X):
            # lazy labels read X from its source, so the cached copy can be released
            self.labels_ = self._predict_dask(X_in)
        else:
            (self.labels_,) = _graph.compute(self._predict_dask(Xd))
        return self

    def _fit_single(self, passes: _graph.Passes, seed: int, run: int, init_array) -> dict:
        """One run of init + Lloyd + final inertia; assumes validated input."""
        bar = progress_bar(self.progress, total=self.max_iter, desc=f"KMeans run {run + 1}")
        try:
            if init_array is not None:
                centers = init_array
            else:
                bar.set_postfix_str(f"init {self.init}")
                centers = self._init_centers(passes, seed, run)
                bar.reset(total=self.max_iter)  # the rate counts Lloyd iterations only
            tol = None
            history: list[dict] = []
            converged = False
            shift = np.inf
            for it in range(self.max_iter):
                t0 = time.perf_counter()
                part = passes.run(K.lloyd_partial, K.combine_lloyd,
                                  {"centers": centers}, name="kmeans-lloyd")
                if tol is None:
                    tol = mean_variance(passes.stats) * self.tol
                far = None
                n_empty = int((part.weights == 0).sum())
                if n_empty:  # rare: one more pass to find the farthest rows
                    far = passes.run(K.farthest_partial, K.combine_far,
                                     {"centers": centers, "m": n_empty}, name="kmeans-far")
                new, n_relocated = K.update_centers(part, centers, far)
                inertia = K.inertia_from_sums(part, centers, passes.stats.weighted_sq_norm)
                shift = float(((new - centers) ** 2).sum())
                centers = new
                history.append({"iteration": it + 1, "inertia": inertia,
                                "center_shift": shift, "n_relocated": n_relocated,
                                "seconds": time.perf_counter() - t0})
                bar.update(1)
                bar.set_postfix_str(f"inertia {inertia:.6g}")
                if shift <= tol:
                    converged = True
                    bar.finish()
                    break
            final = passes.run(K.lloyd_partial, K.combine_lloyd,
                               {"centers": centers, "exact": True, "with_sums": False},
                               name="kmeans-inertia")
            inertia = final.inertia
        finally:
            bar.close()
        return {"centers": centers, "inertia": inertia, "n_iter": len(history),
                "converged": converged, "history": history}

    def _init_centers(self, passes: _graph.Passes, seed: int, run: int) -> np.ndarray:
        k = self.n_clusters
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(run, 0)))
        n = passes.blocks.X.shape[0]
        if self.init == "random":
            s = passes.run(K.sample_partial, K.combine_samples,
                           {"stream": stream_key(seed, run, 1), "size": k}, name="kmeans-random")
            return s.rows
        if self.init == "k-means++":
            s = passes.run(K.sample_partial, K.combine_samples,
                           {"stream": stream_key(seed, run, 1), "size": min(n, 100_000)},
                           name="kmeans-sample")
            return K.kmeans_plusplus(s.rows, s.weight, k, rng)
        # k-means||
        first = int(rng.integers(n))
        (row,) = _graph.compute(passes.blocks.X[first])
        candidates = np.asarray(row, dtype=np.float64)[None, :]
        ell = self.oversampling_factor * k
        cap = int(3 * ell + 64)
        for r in range(self.init_rounds):
            params = {"candidates": candidates, "stream": stream_key(seed, run, 2, r), "cap": cap}
            s = passes.run(K.candidate_partial, K.combine_samples, params, name="kmeans-init")
            if s.cost <= 0:
                break  # every row sits on a candidate
            threshold = ell / s.cost
            while s.key.size == cap and s.key[-1] < threshold:
                # more rows qualify than were kept (rare): redo the round, keeping more
                cap *= 4
                s = passes.run(K.candidate_partial, K.combine_samples,
                               dict(params, cap=cap), name="kmeans-init")
            chosen = s.key < threshold
            candidates = np.concatenate([candidates, s.rows[chosen]])
        weights = passes.run(K.assign_weights_partial, K.add, {"centers": candidates},
                             name="kmeans-init-weights")
        keep = weights > 0
        if keep.sum() >= k:
            candidates, weights = candidates[keep], weights[keep]
        else:  # too few distinct rows attracted weight: keep all, tiny weights
            weights = np.maximum(weights, 1e-12 * max(weights.max(), 1.0))
        start = K.kmeans_plusplus(candidates, weights, k, rng)
        return K.local_lloyd(candidates, weights, start)

    # ---------------------------------------------------------------- predict
    def _predict_dask(self, Xd):
        return _graph.map_rows(Xd, _labels_block, {"centers": self.cluster_centers_}, np.int64)

    def predict(self, X: Any) -> Any:
        """Index of the nearest centre of each row.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), dask array, xarray object or Zarr path

        Returns
        -------
        labels : ndarray of shape (n_samples,); a lazy dask array for lazy input
        """
        labels = self._predict_dask(data.as_fitted_matrix(self, X, "cluster_centers_"))
        return labels if data.is_lazy(X) else _graph.compute(labels)[0]

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        """Fit, then return ``labels_``."""
        return self.fit(X, sample_weight=sample_weight).labels_

    def transform(self, X: Any) -> Any:
        """Euclidean distance of each row to every centre.

        Returns
        -------
        distances : ndarray of shape (n_samples, n_clusters); lazy for lazy input
        """
        Xd = data.as_fitted_matrix(self, X, "cluster_centers_")
        out = _graph.map_rows(Xd, _distances_block, {"centers": self.cluster_centers_},
                              self.cluster_centers_.dtype, n_columns=self.n_clusters)
        return out if data.is_lazy(X) else _graph.compute(out)[0]

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Opposite of the weighted inertia of ``X`` with respect to the fitted centres (one pass)."""
        Xd = data.as_fitted_matrix(self, X, "cluster_centers_")
        w = data.check_sample_weight(sample_weight, Xd)
        blocks = _graph.RowBlocks(Xd, w)
        passes = _graph.Passes(blocks, self.split_every,
                               check=lambda s: data.check_stats(s, blocks.row_chunks, w is not None))
        part = passes.run(K.lloyd_partial, K.combine_lloyd,
                          {"centers": self.cluster_centers_.astype(np.float64), "exact": True,
                           "with_sums": False}, name="kmeans-score")
        return -float(part.inertia)
