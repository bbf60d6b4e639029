"""Distributed k-nearest neighbours: exact tree-merged top-k, classifier, regressor, IVF index.

Every (query block x data chunk) tile yields the ``k`` nearest rows of that
chunk for each query of that block; a tree of fan-in ``split_every`` merges
a query block's tiles into its global top ``k``. See
:mod:`dmlkit._kernels.knn` for the exact search of a tile and
:mod:`dmlkit._kernels.ivf` for the approximate (inverted-file) one.
"""
from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
import weakref
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin

from dmlkit import _graph, data
from dmlkit._kernels import ivf as IVF
from dmlkit._kernels import knn as K
from dmlkit._progress import progress_bar

__all__ = ["KNeighborsClassifier", "KNeighborsRegressor", "NearestNeighbors", "recall_at_k"]

_ALGORITHMS = ("brute", "ivf")
_WEIGHTS = ("uniform", "distance")
_MODES = ("connectivity", "distance")
#: Rows per query block when the queries are a NumPy array (at least).
MIN_QUERY_ROWS = 256
#: Rows per query block when the queries are a NumPy array (at most).
MAX_QUERY_ROWS = 16_384
#: A cached index is re-blocked into about this many blocks per worker thread (each
#: search task is one data block against one query block).
SEARCH_BLOCKS_PER_THREAD = 2
#: Marker of an IVF index store written by dmlkit.
_IVF_GENERATOR = "dmlkit.NearestNeighbors(algorithm='ivf')"


def recall_at_k(indices: Any, true_indices: Any) -> float:
    """Fraction of the true ``k`` nearest neighbours that were found.

    Parameters
    ----------
    indices : array-like of shape (n_queries, k)
        Neighbours returned by an approximate search (``-1`` for none).
    true_indices : array-like of shape (n_queries, k)
        The exact neighbours (``algorithm="brute"``).

    Returns
    -------
    float
        ``sum_q |found_q & true_q| / (n_queries k)``: recall@k.
    """
    a, b = np.asarray(indices), np.asarray(true_indices)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"indices has shape {a.shape} and true_indices {b.shape}; expected "
                         "the same shape (n_queries, k)")
    hits = sum(np.intersect1d(x[x >= 0], y).size for x, y in zip(a, b))
    return hits / b.size if b.size else 1.0


def _integer(name: str, value: Any, low: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r} should be an integer >= {low}"
                         + (" or None" if allow_none else ""))


def _labels_to_codes(y, classes):
    return np.searchsorted(classes, y).astype(np.int64)


def _write_ivf_block(X, w, offset, y=None, *, path, centroids, metric):
    """Sort one block by list and write it to the index store at its own rows.

    Blocks are aligned with the store's chunks, so no two tasks write the
    same chunk. Returns the block's rows per list and ``{offset: centre}``,
    the centre its prepared rows are taken from.
    """
    import zarr

    order, lists, counts = IVF.sort_block(X, centroids=centroids, metric=metric)
    g = zarr.open_group(path, mode="r+")
    rows = slice(offset, offset + X.shape[0])
    g["X"][rows] = X[order]
    g["index"][rows] = offset + order
    g["list"][rows] = lists
    if y is not None:
        g["y"][rows] = y[order]
    return counts


class _NeighborsBase(BaseEstimator):
    """Fit and search shared by the estimators (parameters in the subclasses)."""

    _values: str | None = None  # "classes" or "targets": what y is carried as

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        _integer("n_neighbors", self.n_neighbors, 1)
        if self.algorithm not in _ALGORITHMS:
            raise ValueError(f"algorithm={self.algorithm!r} should be one of {_ALGORITHMS}")
        if self.metric not in K.METRICS:
            raise ValueError(f"metric={self.metric!r} should be one of {K.METRICS}")
        _integer("n_lists", self.n_lists, 1, allow_none=True)
        _integer("n_probe", self.n_probe, 1, allow_none=True)
        _graph.check_split_every(self.split_every)
        if self.cache not in ("auto", True, False):
            raise ValueError(f"cache={self.cache!r} should be 'auto', True or False")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress={self.progress!r} should be True or False")
        weights = getattr(self, "weights", "uniform")
        if weights not in _WEIGHTS and not callable(weights):
            raise ValueError(f"weights={weights!r} should be 'uniform', 'distance' or a callable")

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_samples_fit_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError(f"This {type(self).__name__} instance is not fitted yet; "
                                 "call fit first")

    # --------------------------------------------------------------------- fit
    def _targets(self, X: Any, y: Any, X_in):
        """``y`` as rows aligned with ``X`` (the store's ``y`` when None), or None."""
        if self._values is None:
            return None
        return data.as_targets(y, X, X_in)

    def _fit(self, X: Any, y: Any = None):
        self._check_params()
        X_in = data.as_matrix(X)
        n, d = X_in.shape
        y_in = self._targets(X, y, X_in)
        if y_in is not None and self._values == "classes":
            import dask.array as da

            (self.classes_,) = _graph.compute(da.unique(y_in))
            y_in = y_in.map_blocks(_labels_to_codes, self.classes_, dtype=np.int64)
        elif y_in is not None:
            if y_in.dtype.kind not in "fiub":
                raise TypeError(f"y.dtype={y_in.dtype} is not numeric; expected numeric targets")
            y_in = y_in.astype(np.float64)
        if self.algorithm == "ivf":
            n_lists = self.n_lists if self.n_lists is not None else max(1, round(math.sqrt(n)))
            if n_lists > n:
                raise ValueError(f"n_lists={n_lists} should be <= n_samples={n}")
            self._build_ivf(X, X_in, y_in, n_lists)
            self._fit_X = X_in  # the queries of kneighbors(None), read from the source
        else:
            # the fitted model keeps its rows: nothing of them held in memory while they stream
            Xd, (yd,), _ = data.cache(X_in, [y_in], self.cache, X,
                                      per_thread=SEARCH_BLOCKS_PER_THREAD, vectors=False)
            blocks = _graph.RowBlocks(Xd, None, yd)
            passes = _graph.Passes(blocks, self.split_every, check=lambda s: data.check_stats(
                s, X_in.chunks[0], False, supervised=yd is not None))
            passes.run(K.count_rows, K.add, {}, name="knn-fit")  # validates the values
            self._fit_X, self._fit_y = Xd, yd
        self._fit_lazy = data.is_lazy(X)
        self.n_samples_fit_ = n
        self.n_features_in_ = d
        self.effective_metric_ = self.metric
        return self

    def _index_store(self) -> str:
        """The index store's path: ``index_path``, or a new temporary folder."""
        if self.index_path is None:
            folder = tempfile.mkdtemp(prefix="dmlkit-ivf-")
            weakref.finalize(self, shutil.rmtree, folder, ignore_errors=True)
            return os.path.join(folder, "index.zarr")
        path = os.fspath(self.index_path)
        if os.path.exists(path) and os.listdir(path):
            try:
                import zarr

                ours = zarr.open_group(path, mode="r").attrs.get("generator") == _IVF_GENERATOR
            except Exception:  # not a Zarr group at all
                ours = False
            if not ours:
                raise FileExistsError(f"index_path={path!r} exists and is not an index written "
                                      "by dmlkit; give a new or empty folder")
            shutil.rmtree(path)
        return path

    def _build_ivf(self, X: Any, X_in, y_in, n_lists: int) -> None:
        """Train the coarse quantizer, then write the rows, sorted by list, to a Zarr store."""
        import zarr

        from dmlkit.kmeans import KMeans, _integer_seed

        n, d = X_in.shape
        seed = _integer_seed(self.random_state)
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        n_train = min(n, max(64 * n_lists, 16_384))
        sample = X_in if n_train == n else X_in[np.sort(rng.choice(n, n_train, replace=False))]
        if self.metric == "cosine":
            sample = _graph.map_rows(sample, K.normalize_rows, {}, np.float64, sample.shape[1])
        self.quantizer_ = KMeans(n_lists, init="random", max_iter=20, random_state=seed,
                                 split_every=self.split_every, progress=self.progress).fit(sample)
        centroids = self.quantizer_.cluster_centers_.astype(np.float64)
        # blocks of the store: about one per worker thread (every search tile loops over
        # the lists, so fewer, larger tiles cost less), regular (the store's chunks); the
        # cached copy keeps exactly these blocks, inside which rows are sorted by list
        rows = data.cache_block_rows(X_in, per_thread=1, threads=data._total_threads())
        Xb = X_in.rechunk({0: rows}) if set(X_in.chunks[0][:-1]) - {rows} or \
            X_in.chunks[0][-1] > rows else X_in
        yb = None if y_in is None else y_in.rechunk({0: Xb.chunks[0]})
        path = self._index_store()
        g = zarr.open_group(path, mode="w", zarr_format=3)
        g.attrs.update({"generator": _IVF_GENERATOR, "metric": self.metric, "n_lists": n_lists})
        g.create_array("X", shape=(n, d), chunks=(rows, d), dtype=X_in.dtype,
                       dimension_names=("sample", "feature"))
        for name, dtype in (("index", np.int64), ("list", np.int32)) + \
                ((("y", yb.dtype),) if yb is not None else ()):
            g.create_array(name, shape=(n,), chunks=(rows,), dtype=dtype,
                           dimension_names=("sample",))
        g.create_array("centroids", shape=centroids.shape, dtype=np.float64,
                       dimension_names=("list", "feature"))[...] = centroids
        blocks = _graph.RowBlocks(Xb, None, yb)
        passes = _graph.Passes(blocks, self.split_every, check=lambda s: data.check_stats(
            s, X_in.chunks[0], False, supervised=yb is not None))
        counts = passes.run(_write_ivf_block, K.add,
                            {"path": path, "centroids": centroids, "metric": self.metric},
                            name="knn-ivf-write")
        g = zarr.open_group(path, mode="r")
        Xi = data.as_matrix(g["X"])
        center = K.center_dtype(centroids.mean(axis=0))
        # the float32 copy that the search scans, computed from each block where it is
        # (and, cached, kept next to it)
        Ri = _graph.map_rows(Xi, IVF.prepared_rows, {"metric": self.metric, "center": center},
                             np.float32, d + 2)
        extra = [Ri] + [data.as_rows(g[name], Xi, name) for name in ("index", "list")]
        extra.append(None if yb is None else data.as_rows(g["y"], Xi, "y"))
        Xi, (Ri, index, lists, yi), _ = data.cache(Xi, extra, self.cache, path, block_rows=rows,
                                                    vectors=False)
        self._ivf = {"rows": Ri, "X": Xi, "index": index, "list": lists, "y": yi,
                     "center": center}
        self.cluster_centers_ = centroids
        self.list_sizes_ = np.asarray(counts, dtype=np.int64)
        self.n_lists_ = n_lists
        self.index_path_ = path

    # ------------------------------------------------------------------ search
    def _queries(self, Q: Any):
        """Validated queries: a NumPy array, or a dask array for lazy ``Q``."""
        if data.is_lazy(Q):
            Qd = data.as_matrix(Q, "Q")
        else:
            Qd = np.asarray(Q)
            if Qd.ndim != 2:
                raise ValueError(f"Q should be 2-D of shape (n_queries, n_features); got shape "
                                 f"{Qd.shape}" + (" (use Q.reshape(1, -1) for a single query)"
                                                  if Qd.ndim == 1 else ""))
            if Qd.dtype.kind not in "fiub":
                raise TypeError(f"Q.dtype={Qd.dtype} is not numeric; expected a float, integer "
                                "or boolean dtype")
        if Qd.shape[1] != self.n_features_in_:
            raise ValueError(f"Q has {Qd.shape[1]} features; {type(self).__name__} was fitted "
                             f"with n_features_in_={self.n_features_in_}")
        if Qd.shape[0] < 1:
            raise ValueError(f"Q has shape {Qd.shape}; expected at least 1 query")
        return Qd

    def _search(self, Q: Any, n_neighbors: Any, with_values: bool = False):
        """Graph of the search: per query block, the merged :class:`Neighbors`.

        Returns ``(parts, n_rows, finish, lazy)``: the delayed records, the
        rows of each query block, the keyword arguments that turn a record
        into the reported neighbours, and whether results stay lazy.
        """
        self._check_fitted()
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        _integer("n_neighbors", k, 1)
        n = self.n_samples_fit_
        if Q is None:
            if k >= n:
                raise ValueError(f"n_neighbors={k} should be < n_samples_fit={n} when Q is None "
                                 "(a sample is not its own neighbour)")
            Qd, lazy, k_search = self._fit_X, self._fit_lazy, k + 1
        else:
            if k > n:
                raise ValueError(f"n_neighbors={k} should be <= n_samples_fit={n}")
            Qd = self._queries(Q)
            lazy, k_search = data.is_lazy(Q), k
        data_X = self._ivf["rows"] if self.algorithm == "ivf" else self._fit_X
        Q_probe = None  # the queries for choosing the IVF lists, when chunked differently
        if isinstance(Qd, np.ndarray):
            K.check_finite_queries(Qd, 0)
            # enough query blocks that the tiles keep every worker thread busy; IVF tiles
            # loop over the lists, so there as few as that takes (one per thread)
            threads = data._total_threads()
            busy = (1 if self.algorithm == "ivf" else 2) * threads
            want = max(1, -(-busy // data_X.numblocks[0]))
            rows = min(max(-(-Qd.shape[0] // want), MIN_QUERY_ROWS), MAX_QUERY_ROWS)
            import dask.array as da

            prepared = K.prepare_queries(Qd, self.metric)
            Qd = da.from_array(prepared, chunks=(rows, Qd.shape[1]))
            if self.algorithm == "ivf" and Qd.numblocks[0] < threads:
                # choosing the lists is per query: one independent block per worker thread
                # (the scheduler spreads them), the tiles then take Qd's blocks
                Q_probe = da.from_array(prepared, chunks=(-(-prepared.shape[0] // threads),
                                                          prepared.shape[1]))
        else:  # validated (when computed) and prepared block by block
            dtype = Qd.dtype if Qd.dtype == np.float32 and self.metric != "cosine" else np.float64
            Qd = _graph.map_row_blocks(Qd, K.query_block, {"metric": self.metric}, dtype,
                                       Qd.shape[1])
        y = self._ivf["y"] if self.algorithm == "ivf" else self._fit_y
        rows_kw = {"y": y} if with_values else {}
        if self.algorithm == "ivf":
            n_probe = self.n_probe if self.n_probe is not None else self._default_probe()
            _integer("n_probe", n_probe, 1)
            n_probe = min(n_probe, self.n_lists_)
            probes = _graph.map_row_blocks(
                Qd if Q_probe is None else Q_probe, IVF.probes_block,
                {"centroids": self.cluster_centers_, "n_probe": n_probe}, np.int32, n_probe)
            queries, whole = [Qd, probes], []
            if Q_probe is not None and Qd.numblocks[0] == 1:
                queries, whole = [Qd], [probes]  # joined inside the tiles
            elif Q_probe is not None:
                queries[1] = probes.rechunk({0: Qd.chunks[0]})
            parts = _graph.tiles(
                data_X, queries, IVF.ivf_tile, K.merge_neighbors,
                {"k": k_search, "metric": self.metric, "centroids": self.cluster_centers_,
                 "center": self._ivf["center"]},
                rows={"X": self._ivf["X"], "lists": self._ivf["list"],
                      "index": self._ivf["index"], **rows_kw},
                split_every=self.split_every, name="knn-ivf", whole=whole)
        else:
            parts = _graph.tiles(data_X, [Qd], K.brute_partial, K.merge_neighbors,
                                 {"k": k_search, "metric": self.metric}, rows=rows_kw,
                                 split_every=self.split_every, name="knn-brute")
        n_rows = Qd.chunks[0]
        starts = np.concatenate([[0], np.cumsum(n_rows)[:-1]])
        finish = [{"k": k, "metric": self.metric,
                   "self_offset": int(s) if Q is None else None} for s in starts]
        return parts, n_rows, finish, lazy

    def _default_probe(self) -> int:
        return max(1, math.ceil(self.n_lists_ / 16))

    @staticmethod
    def _collect(parts, n_rows, func, finish, dtype, n_columns=None, extra=None):
        """A lazy array of ``func(part, **finish[i], **extra)`` over the query blocks."""
        params = [dict(f, **(extra or {})) for f in finish]
        return _graph.stack(parts, func, n_rows, dtype, n_columns, params)

    def _results(self, search, *outputs):
        """Each output ``(func, dtype, n_columns, extra)`` of a :meth:`_search` over the query
        blocks, stacked.

        Lazy arrays when the search is lazy. Otherwise computed together:
        the merged records come to the client, which applies ``func`` to
        each (with a progress bar, through the lazy arrays instead). For
        outputs about the size of a record (neighbours, distances).
        """
        parts, n_rows, finish, lazy = search
        if lazy or self.progress:
            arrays = [self._collect(parts, n_rows, func, finish, dtype, n_columns, extra)
                      for func, dtype, n_columns, extra in outputs]
            return arrays if lazy else list(self._compute(*arrays))
        records = _graph.compute(*parts)
        return [np.concatenate([func(r, **f, **(extra or {})) for r, f in zip(records, finish)])
                .astype(dtype, copy=False) for func, dtype, _, extra in outputs]

    def _compute(self, *arrays):
        """Compute lazy results together, with a progress bar over query blocks if asked."""
        if not self.progress:
            return _graph.compute(*arrays)
        bar = progress_bar(True, total=int(arrays[0].shape[0]), desc=type(self).__name__)
        try:
            return _graph.compute_with_progress(arrays, bar)
        finally:
            bar.close()

    def kneighbors(self, Q: Any = None, n_neighbors: int | None = None,
                   return_distance: bool = True):
        """The ``n_neighbors`` nearest fitted rows of each query.

        Parameters
        ----------
        Q : array-like of shape (n_queries, n_features), dask array, xarray, Zarr path or None
            Queries. None: the fitted rows themselves, each not counted as its
            own neighbour (scikit-learn's convention; with more than
            ``n_neighbors`` exact duplicates of a row, the first duplicate is
            dropped instead).
        n_neighbors : int, default=None
            Neighbours per query (None: the estimator's ``n_neighbors``).
        return_distance : bool, default=True
            Also return the distances.

        Returns
        -------
        distances : ndarray of shape (n_queries, n_neighbors), float64
            Only with ``return_distance=True``. Euclidean, squared Euclidean
            or ``1 - cos``, sorted ascending; exact (computed in float64 from
            the differences) for every returned neighbour.
        indices : ndarray of shape (n_queries, n_neighbors), int64
            Global row indices into the fitted ``X``; exact ties go to the
            lower index. For ``algorithm="ivf"``, ``-1`` (distance inf) where
            the probed lists hold fewer than ``n_neighbors`` rows.

        Both are dask arrays, one block per query block, when ``Q`` is lazy
        (dask, xarray, Zarr), or is None and the fitted ``X`` was lazy:
        nothing is computed then.

        Raises
        ------
        ValueError
            If ``n_neighbors`` exceeds the fitted rows, ``Q`` has another number
            of features, or holds NaN or inf (for lazy ``Q``: when computed).
        """
        search = self._search(Q, n_neighbors)
        k = search[2][0]["k"]
        ind = (K.indices_of, np.int64, k, None)
        if return_distance:
            return tuple(self._results(search, (K.distances_of, np.float64, k, None), ind))
        return self._results(search, ind)[0]

    def kneighbors_graph(self, Q: Any = None, n_neighbors: int | None = None,
                         mode: str = "connectivity"):
        """Sparse graph of the ``n_neighbors`` nearest fitted rows of each query.

        Parameters
        ----------
        Q, n_neighbors
            As in :meth:`kneighbors`.
        mode : {"connectivity", "distance"}, default="connectivity"
            Entries 1, or the distances.

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_queries, n_samples_fit)
            Computed even for lazy ``Q``: it holds ``n_queries * n_neighbors``
            entries on the client.
        """
        if mode not in _MODES:
            raise ValueError(f"mode={mode!r} should be one of {_MODES}")
        from scipy.sparse import csr_matrix

        search = self._search(Q, n_neighbors)
        search = search[:3] + (False,)  # computed, even for lazy Q
        k = search[2][0]["k"]
        ind = (K.indices_of, np.int64, k, None)
        if mode == "distance":
            dist, ind = self._results(search, (K.distances_of, np.float64, k, None), ind)
            values = dist.ravel()
        else:
            (ind,) = self._results(search, ind)
            values = np.ones(ind.size)
        nq = ind.shape[0]
        found = ind.ravel() >= 0
        indptr = np.concatenate([[0], np.cumsum(found.reshape(nq, k).sum(axis=1))])
        return csr_matrix((values[found], ind.ravel()[found], indptr),
                          shape=(nq, self.n_samples_fit_))


_PARAMS_DOC = """\
    n_neighbors : int, default=5
        Neighbours per query.
    algorithm : {"brute", "ivf"}, default="brute"
        "brute": exact search of every row. "ivf": approximate search of the
        ``n_probe`` inverted lists nearest to each query (see Notes).
    metric : {"euclidean", "sqeuclidean", "cosine"}, default="euclidean"
        "cosine" is ``1 - cos(q, x)``; zero rows are at distance 1 from everything.
    n_lists : int or None, default=None
        IVF only: number of inverted lists (K-means centroids); None means
        ``round(sqrt(n_samples))``.
    n_probe : int or None, default=None
        IVF only: lists scanned per query; None means ``ceil(n_lists / 16)``.
        Used at query time only: change it with ``set_params`` without refitting.
    split_every : int or None, default=None
        Fan-in of the tree that merges a query block's partial top-k (None: 8).
    cache : {"auto", True, False}, default="auto"
        As in :class:`dmlkit.KMeans`: "auto" keeps the fitted rows (or the IVF
        index) in the workers' memory when they take at most half of it and
        streams them from their store on every search otherwise.
    index_path : str, path-like or None, default=None
        IVF only: folder of the Zarr store that holds the index. None: a new
        temporary folder, removed when the estimator is garbage collected
        (on a multi-machine cluster, give a folder every worker sees). An
        existing folder is replaced only if it holds a dmlkit index.
    random_state : int, numpy Generator or RandomState, or None, default=None
        IVF only: seeds the sample and the K-means that train the quantizer.
    progress : bool, default=False
        Progress bars: the quantizer's K-means, and searches by query block."""

_NOTES_DOC = """\
    Exact search ("brute"): for each (query block x data chunk) tile, one
    float32 matrix product per sub-tile of 2048 rows x 256 queries gives
    ``||x - c||^2 - 2 (q - c) . (x - c)`` (``c`` the chunk's mean); a running
    threshold per query (the ``k``-th smallest so far plus a bound on the
    float32 rounding) keeps only a few candidates, whose distances are then
    computed exactly in float64. The tiles of a query block are merged by a
    tree of fan-in ``split_every``, ties going to the lower row index, so the
    result is exact (scikit-learn's brute force, up to exact ties) and does
    not depend on chunking or scheduling. A search reads every chunk of the
    fitted data once per query block; ``fit`` makes one pass (it checks the
    values, and loads the cache).

    IVF ("ivf"): ``fit`` trains ``dmlkit.KMeans(n_lists, init="random",
    max_iter=20)`` on a uniform sample of ``max(64 n_lists, 16384)`` rows
    (at most all of them; normalised for "cosine"), then makes one pass that
    sorts every block of the data by nearest centroid and writes it to a Zarr
    store (``X``, ``index``: the original row numbers, ``list``, and ``y``
    for the supervised estimators; about one block per worker thread), so
    that each list is a contiguous segment of each block. When the index is
    cached, each block also keeps next to it the float32 copy that the search
    scans (relative to the centroids' mean, squared norms appended): about
    twice the memory of ``X`` for float32 data. A query scans the
    segments of its ``n_probe`` nearest lists in every block with the same
    thresholded float32 products as the exact search, so the answer is the
    exact ``k`` nearest *among the rows of the probed lists*: with
    ``n_probe=n_lists`` it equals the exact search. Recall depends on the
    data; measure it with :func:`recall_at_k` against ``algorithm="brute"``.
    The original rows are read again only by ``kneighbors(None)``."""


class NearestNeighbors(_NeighborsBase):
    __doc__ = f"""Unsupervised k-nearest neighbours of chunked data, exact or approximate (IVF).

    The fitted rows stay where they are (a Zarr store, or persisted on the
    workers); only query blocks and small partial top-k records travel.

    Parameters
    ----------
{_PARAMS_DOC}

    Attributes
    ----------
    n_samples_fit_ : int
    n_features_in_ : int
    effective_metric_ : str
    cluster_centers_ : ndarray of shape (n_lists, n_features)
        IVF only: the list centroids.
    list_sizes_ : ndarray of shape (n_lists,)
        IVF only: rows per list.
    index_path_ : str
        IVF only: the Zarr store of the index.
    quantizer_ : dmlkit.KMeans
        IVF only: the fitted coarse quantizer.

    Notes
    -----
{_NOTES_DOC}

    Examples
    --------
    >>> import numpy as np
    >>> from dmlkit import NearestNeighbors
    >>> X = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    >>> dist, ind = NearestNeighbors(n_neighbors=2).fit(X).kneighbors([[0.1, 0.0]])
    >>> ind.tolist()
    [[0, 1]]
    """

    def __init__(self, n_neighbors: int = 5, *, algorithm: str = "brute",
                 metric: str = "euclidean", n_lists: int | None = None,
                 n_probe: int | None = None, split_every: int | None = None,
                 cache: bool | str = "auto", index_path: str | os.PathLike | None = None,
                 random_state: Any = None, progress: bool = False):
        self.n_neighbors = n_neighbors
        self.algorithm = algorithm
        self.metric = metric
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.split_every = split_every
        self.cache = cache
        self.index_path = index_path
        self.random_state = random_state
        self.progress = progress

    def fit(self, X: Any, y: Any = None) -> "NearestNeighbors":
        """Index the rows of ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), dask array, xarray object or Zarr path
        y : ignored

        Returns
        -------
        self : NearestNeighbors
        """
        return self._fit(X)


class _SupervisedMixin:
    """The parameters, predict and score of the classifier and the regressor."""

    def __init__(self, n_neighbors: int = 5, *, weights: Any = "uniform",
                 algorithm: str = "brute", metric: str = "euclidean",
                 n_lists: int | None = None, n_probe: int | None = None,
                 split_every: int | None = None, cache: bool | str = "auto",
                 index_path: str | os.PathLike | None = None, random_state: Any = None,
                 progress: bool = False):
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.algorithm = algorithm
        self.metric = metric
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.split_every = split_every
        self.cache = cache
        self.index_path = index_path
        self.random_state = random_state
        self.progress = progress

    def _predict_blocks(self, Q: Any, func, dtype, n_columns=None, extra=None):
        # the finishers run in tasks, next to the merged records (a record holds k values per
        # query, the prediction one)
        parts, n_rows, finish, lazy = self._search(Q, None, with_values=True)
        extra = dict(extra or {}, weights=self.weights)
        out = self._collect(parts, n_rows, func, finish, dtype, n_columns, extra)
        return out if lazy else self._compute(out)[0]

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Accuracy (classifier) or R^2 (regressor) of ``predict(X)`` against ``y``.

        Lazy predictions are computed: they hold one value per query.
        """
        pred = self.predict(X)
        if data.is_lazy(pred):
            (pred,) = _graph.compute(pred)
        y = np.asarray(_graph.compute(y)[0] if data.is_lazy(y) else y)
        w = None if sample_weight is None else np.asarray(
            _graph.compute(sample_weight)[0] if data.is_lazy(sample_weight) else sample_weight)
        return self._metric(y, pred, sample_weight=w)


class KNeighborsClassifier(_SupervisedMixin, ClassifierMixin, _NeighborsBase):
    __doc__ = f"""Classifier by vote of the k nearest fitted rows, exact or approximate (IVF).

    The labels travel with the rows: each tile returns its neighbours' class
    codes, so ``y`` is never gathered on the client either.

    Parameters
    ----------
{_PARAMS_DOC.replace("        Neighbours per query.", "        Neighbours that vote.")}
    weights : {{"uniform", "distance"}} or callable, default="uniform"
        "uniform": every neighbour counts 1; "distance": ``1 / distance``
        (neighbours at distance 0, if any, get 1 and the others 0); a
        callable maps the distances array to weights, as in scikit-learn.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        Sorted distinct labels of ``y``.
    n_samples_fit_, n_features_in_, effective_metric_
        As in :class:`NearestNeighbors` (and its IVF attributes).

    Notes
    -----
{_NOTES_DOC}

    ``fit`` also computes the distinct labels (one pass over ``y``).
    Predictions break ties between classes towards the first class, as
    scikit-learn does.
    """

    _values = "classes"

    def fit(self, X: Any, y: Any = None) -> "KNeighborsClassifier":
        """Index the rows of ``X`` with their labels ``y`` (None: the store's ``y``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features), dask array, xarray object or Zarr path
        y : array-like of shape (n_samples,), dask array or None

        Returns
        -------
        self : KNeighborsClassifier
        """
        return self._fit(X, y)

    def predict_proba(self, X: Any = None) -> Any:
        """Share of the (weighted) votes of each class.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), dask array, xarray, Zarr path or None
            None: the fitted rows, each without itself (as in :meth:`kneighbors`).

        Returns
        -------
        proba : ndarray of shape (n_queries, n_classes); lazy for lazy ``X``
        """
        self._check_fitted()
        return self._predict_blocks(X, K.class_proba, np.float64, self.classes_.size,
                                    {"n_classes": self.classes_.size})

    def predict(self, X: Any = None) -> Any:
        """The class with the most (weighted) votes among the neighbours of each query.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), dask array, xarray, Zarr path or None

        Returns
        -------
        labels : ndarray of shape (n_queries,); lazy for lazy ``X``
        """
        self._check_fitted()
        return self._predict_blocks(X, K.class_predict, self.classes_.dtype, None,
                                    {"classes": self.classes_})

    @staticmethod
    def _metric(y, pred, sample_weight=None):
        from sklearn.metrics import accuracy_score

        return float(accuracy_score(y, pred, sample_weight=sample_weight))


class KNeighborsRegressor(_SupervisedMixin, RegressorMixin, _NeighborsBase):
    __doc__ = f"""Regression by the (weighted) mean target of the k nearest fitted rows.

    Parameters
    ----------
{_PARAMS_DOC}
    weights : {{"uniform", "distance"}} or callable, default="uniform"
        As in :class:`KNeighborsClassifier`.

    Attributes
    ----------
    n_samples_fit_, n_features_in_, effective_metric_
        As in :class:`NearestNeighbors` (and its IVF attributes).

    Notes
    -----
{_NOTES_DOC}

    ``y`` is one target per row (float64); the targets travel with the
    neighbours, as the labels of :class:`KNeighborsClassifier` do.
    """

    _values = "targets"

    def fit(self, X: Any, y: Any = None) -> "KNeighborsRegressor":
        """Index the rows of ``X`` with their targets ``y`` (None: the store's ``y``).

        Returns
        -------
        self : KNeighborsRegressor
        """
        return self._fit(X, y)

    def predict(self, X: Any = None) -> Any:
        """(Weighted) mean target of the neighbours of each query.

        Returns
        -------
        y_pred : ndarray of shape (n_queries,), float64; lazy for lazy ``X``
        """
        self._check_fitted()
        return self._predict_blocks(X, K.regress, np.float64)

    @staticmethod
    def _metric(y, pred, sample_weight=None):
        from sklearn.metrics import r2_score

        return float(r2_score(y, pred, sample_weight=sample_weight))
