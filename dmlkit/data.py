"""Zarr / xarray in, validated dask arrays out.

This module owns chunking, dimension names and dtypes. Estimators accept
NumPy arrays, dask arrays, xarray ``DataArray`` / ``Dataset`` (its ``X``
variable) or the path of a Zarr store written by :mod:`dmlkit.datasets`; they
hand all of them to :func:`as_matrix` and get back a dask array with one chunk
along features. Validation here reads metadata only; checks on the values
(NaN, inf, negative weights) run fused into the first pass of each fit.
"""
from __future__ import annotations

import logging
import math
import os
import threading
import warnings
from collections import Counter
from typing import Any, Sequence

import dask
import dask.array as da
from dask.highlevelgraph import HighLevelGraph
import numpy as np

from dmlkit import _store
from dmlkit._kernels.kmeans import to_feature_major

logger = logging.getLogger(__name__)

#: Target bytes per row block when a NumPy array is wrapped as a dask array.
DEFAULT_CHUNK_BYTES = 16 * 2**20
#: Largest block of a cached (persisted) copy of X.
CACHE_BLOCK_BYTES = 256 * 2**20
#: Cached copies keep X's chunks when they hold at least this many bytes; smaller
#: chunks are joined up to it (in blocks of at most 1 / :data:`CACHE_MIN_BLOCKS` of X).
CACHE_MIN_BLOCK_BYTES = 8 * 2**20
#: Joined chunks of a cached copy make blocks of about 1 / this of X's rows, rounded up to
#: whole chunks (so between about half this many blocks and this many, where X has that
#: many chunks). A constant, not the cluster's thread count: the blocks, and with them the
#: order of every sum, are then the same on any cluster and on any scheduler.
CACHE_MIN_BLOCKS = 16
#: Seconds to wait for a worker when caching on a cluster that has none at the moment.
WAIT_FOR_WORKERS_S = 60


class ChunkingWarning(UserWarning):
    """X was chunked along features and has been rechunked to whole rows."""


def open_zarr(path: str | os.PathLike) -> Any:
    """Open a Zarr store as an ``xarray.Dataset`` backed by dask arrays.

    Parameters
    ----------
    path : str or path-like
        A Zarr (v3 or v2) store holding at least ``X`` with dims
        ``(sample, feature)``, as written by :mod:`dmlkit.datasets`.

    Returns
    -------
    xarray.Dataset
        Lazily loaded, one dask chunk per Zarr chunk; nothing is read but metadata.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the store is not a Zarr group or holds no ``X``.
    """
    import xarray as xr

    path = os.fspath(path)
    if "://" not in path and not os.path.exists(path):
        raise FileNotFoundError(f"path={path!r}: no Zarr store at this path")
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks={})
    except Exception as exc:  # zarr raises several types for "not a group"
        raise ValueError(f"path={path!r} is not a readable Zarr group: {exc}") from exc
    if "X" not in ds:
        raise ValueError(
            f"path={path!r} holds no array 'X' (it has {sorted(ds.data_vars)}); "
            "expected a store written by dmlkit.datasets"
        )
    _tag_source(ds["X"], path, "X")
    return ds


def _tag_source(var: Any, path: str, name: str) -> None:
    """Mark ``var``'s dask array with where its chunks lie on disk, when passes can read
    them directly (:mod:`dmlkit._store`): uncompressed, local, and the same values as
    xarray's (no scale, offset or fill-value mask decoded on the way)."""
    arr = var.data
    if "://" in path or not isinstance(arr, da.Array) or any(k in var.encoding for k in
                                            ("scale_factor", "add_offset", "_FillValue")):
        return
    try:
        import zarr

        z = zarr.open_array(os.path.join(path, name), mode="r")
    except Exception:  # not a local v3 array this reader knows: the path through zarr
        return
    _mark_source(arr, _store.source_of(z))


def _mark_source(arr: da.Array, source: _store.ZarrSource | None) -> None:
    """Tag ``arr`` with ``source`` when it holds the same rows (any chunking reads)."""
    if source is not None and source.shape == arr.shape and np.dtype(source.dtype) == arr.dtype:
        arr._dmlkit_source = source


def _row_chunks(n_rows: int, row_bytes: int) -> int:
    return max(1, min(n_rows, DEFAULT_CHUNK_BYTES // max(row_bytes, 1)))


def _to_dask(X: Any, name: str) -> da.Array:
    """Any supported container to a dask array (no validation of shape or dtype)."""
    if isinstance(X, (str, os.PathLike)):
        X = open_zarr(X)
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        xr = None
    if xr is not None and isinstance(X, xr.Dataset):
        if name not in X:
            raise ValueError(f"{name}: the Dataset has no variable {name!r} "
                             f"(it has {sorted(X.data_vars)})")
        X = X[name]
    if xr is not None and isinstance(X, xr.DataArray):
        X = X.data
    if isinstance(X, da.Array):
        return X
    if hasattr(X, "shape") and hasattr(X, "dtype") and not isinstance(X, np.ndarray):
        # zarr arrays and other lazily indexable arrays: wrap without reading
        if getattr(X, "ndim", 0) >= 1:
            arr = da.from_array(X, chunks=getattr(X, "chunks", "auto"))
            if type(X).__module__.startswith("zarr"):
                _mark_source(arr, _store.source_of(X))
            return arr
    arr = np.asarray(X)
    if arr.ndim == 0:
        return da.from_array(arr)
    row_bytes = arr.dtype.itemsize * int(np.prod(arr.shape[1:], dtype=np.int64))
    chunks = (_row_chunks(arr.shape[0], row_bytes),) + arr.shape[1:]
    return da.from_array(arr, chunks=chunks, inline_array=True)


def is_lazy(X: Any) -> bool:
    """True for inputs whose results should stay lazy (dask, xarray, Zarr paths)."""
    if isinstance(X, (da.Array, str, os.PathLike)):
        return True
    mod = type(X).__module__
    return mod.startswith("xarray") or mod.startswith("zarr")


def as_matrix(X: Any, name: str = "X") -> da.Array:
    """Validate ``X`` from its metadata and return it as a row-chunked dask array.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), dask array, xarray object or Zarr path

    Returns
    -------
    dask.array.Array of shape (n_samples, n_features)
        One chunk along features. Float32 and float64 keep their dtype; integer
        and boolean data are converted to float64 block by block inside the
        kernels (the array returned here keeps the stored dtype).

    Raises
    ------
    ValueError
        If ``X`` is not 2-D or has no rows or no features.
    TypeError
        If ``X`` is not numeric.
    """
    arr = _to_dask(X, name)
    if arr.ndim != 2:
        raise ValueError(
            f"{name} should be 2-D of shape (n_samples, n_features); got shape {arr.shape}"
            + (" (use X.reshape(-1, 1) for a single feature)" if arr.ndim == 1 else "")
        )
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}.dtype={arr.dtype} is not numeric; expected a float, "
                        "integer or boolean dtype")
    if any(math.isnan(s) for s in arr.shape):
        raise ValueError(f"{name} has unknown chunk sizes; call {name}.compute_chunk_sizes() first")
    n, d = arr.shape
    if n < 1 or d < 1:
        raise ValueError(f"{name} has shape {arr.shape}; expected at least 1 sample and 1 feature")
    if arr.numblocks[1] != 1:
        warnings.warn(
            f"{name} is chunked along features ({arr.numblocks[1]} chunks); rechunking "
            f"once to whole rows ({arr.chunks[0][0]} rows per chunk). Store the data "
            "with one chunk along features to avoid this.",
            ChunkingWarning,
            stacklevel=3,
        )
        arr = arr.rechunk({1: -1})
    return arr


def as_fitted_matrix(estimator: Any, X: Any, fitted_attr: str) -> da.Array:
    """``X`` for a fitted estimator's ``predict``/``transform``: fitted, same feature count.

    Raises ``NotFittedError`` when ``fitted_attr`` is missing and ValueError when
    ``X`` has another number of features than ``estimator.n_features_in_``.
    """
    name = type(estimator).__name__
    if not hasattr(estimator, fitted_attr):
        from sklearn.exceptions import NotFittedError

        raise NotFittedError(f"This {name} instance is not fitted yet; call fit first")
    Xd = as_matrix(X)
    if Xd.shape[1] != estimator.n_features_in_:
        raise ValueError(f"X has {Xd.shape[1]} features; {name} was fitted with "
                         f"n_features_in_={estimator.n_features_in_}")
    return Xd


def as_rows(v: Any, X: da.Array, name: str) -> da.Array | None:
    """Validate a per-row vector (``y``, ``sample_weight``) against ``X``'s rows.

    Returns None for None, else a 1-D dask array with ``X``'s row chunks.
    """
    if v is None:
        return None
    arr = _to_dask(v, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} should be 1-D of shape (n_samples,); got shape {arr.shape}")
    if arr.shape[0] != X.shape[0]:
        raise ValueError(
            f"{name} has {arr.shape[0]} rows but X has {X.shape[0]}; they must be aligned"
        )
    if arr.chunks[0] != X.chunks[0]:
        arr = arr.rechunk((X.chunks[0],))
    return arr


def as_targets(y: Any, X: Any, X_in: da.Array) -> da.Array:
    """``y`` as rows aligned with ``X_in``; when None, the ``y`` of the store or
    xarray Dataset ``X`` (an error if it holds none)."""
    if y is None:
        source = open_zarr(X) if isinstance(X, (str, os.PathLike)) else X
        if not (hasattr(source, "data_vars") and "y" in source):
            raise ValueError("y is None: pass the targets, or a Zarr store or xarray "
                             "Dataset that holds 'y'")
        y = source["y"]
    return as_rows(y, X_in, "y")


def check_sample_weight(sample_weight: Any, X: da.Array) -> da.Array | None:
    """Validate ``sample_weight``; eager checks for in-memory weights.

    Weights given as NumPy are checked here (finite, >= 0, not all zero); weights
    given lazily are checked in the first pass of the fit.
    """
    if sample_weight is None:
        return None
    if np.isscalar(sample_weight):
        raise TypeError(f"sample_weight={sample_weight!r} should be an array of shape "
                        "(n_samples,) or None")
    if not is_lazy(sample_weight):
        w = np.asarray(sample_weight)
        if w.dtype.kind not in "fiub":
            raise TypeError(f"sample_weight.dtype={w.dtype} is not numeric")
        if w.ndim == 1 and w.shape[0] == X.shape[0]:
            if not np.isfinite(w).all():
                raise ValueError("sample_weight contains NaN or inf")
            if (w < 0).any():
                i = int(np.flatnonzero(w < 0)[0])
                raise ValueError(f"sample_weight should be >= 0; sample_weight[{i}]={w[i]}")
            if not (w > 0).any():
                raise ValueError("sample_weight is zero everywhere; at least one sample "
                                 "needs a positive weight")
        sample_weight = da.from_array(w.astype(np.float64, copy=False), chunks=(X.chunks[0],)) \
            if w.ndim == 1 and w.shape[0] == X.shape[0] else w
    return as_rows(sample_weight, X, "sample_weight")


def _client():
    """The distributed client that computes, or None (no client, or another scheduler set)."""
    try:
        from distributed import default_client
        client = default_client()
    except (ImportError, ValueError):
        return None
    # a scheduler chosen in dask's config (say "sync") computes instead of the client
    return client if dask.base.get_scheduler() == client.get else None


def _total_threads() -> int:
    client = _client()
    if client is not None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        n = sum(w.get("nthreads", 1) for w in workers)
        if n:
            return n
    return int(dask.system.CPU_COUNT)


def cache_block_rows(X: da.Array, *, per_thread: int | None = None,
                     threads: int | None = None) -> int:
    """Rows per block of a cached copy of ``X``: always a whole number of ``X``'s chunks.

    By default ``X``'s own chunks, joined up to :data:`CACHE_MIN_BLOCK_BYTES`
    where they are smaller, but to no more than ``n / CACHE_MIN_BLOCKS``
    rows rounded up to whole chunks (:data:`CACHE_MIN_BLOCKS` blocks, or
    down to about half as many when the rounding is coarse): a pass maps
    one task per worker thread over the blocks that thread holds (see
    :func:`persist_placed`), so block size only sets the kernels'
    granularity, and keeping the chunks spares a copy when loading.
    These blocks depend on ``X`` alone, never on the cluster: the kernels sum
    over blocks and the reduction tree is over blocks, so a fit on one
    worker, on sixteen or on the synchronous scheduler adds the same numbers
    in the same order and gives the same bits.

    With ``per_thread``, about that many blocks per worker thread (``threads``
    of them) instead, at most :data:`CACHE_BLOCK_BYTES` each: for searches,
    whose tasks are per block and whose results do not depend on the blocks.
    """
    n = X.shape[0]
    row_bytes = max(1, X.dtype.itemsize * X.shape[1])
    base = max(X.chunks[0])
    if per_thread is None:
        target = min(max(1, CACHE_MIN_BLOCK_BYTES // row_bytes), -(-n // CACHE_MIN_BLOCKS))
    else:
        if threads is None:
            raise ValueError(f"per_thread={per_thread} needs threads= (the worker threads)")
        target = -(-n // (per_thread * max(threads, 1)))
    rows = -(-target // base) * base  # whole chunks, rounded up: no small tail block
    cap = max(base, CACHE_BLOCK_BYTES // row_bytes // base * base)
    return min(rows, cap)


def memory_budget() -> int:
    """Bytes of data that may be cached: half the cluster's (or this machine's) memory."""
    client = _client()
    if client is not None:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        total = sum(w.get("memory_limit", 0) or 0 for w in workers)
        if total:
            return total // 2
    import psutil

    return psutil.virtual_memory().available // 2


def cache(
    X: da.Array, rows: Sequence[da.Array | None], cache: bool | str, source: Any,
    block_rows: int | None = None, per_thread: int | None = None, vectors: bool = True,
    feature_major: bool = False,
) -> tuple[da.Array, tuple[da.Array | None, ...], bool]:
    """Apply an estimator's ``cache`` rule to ``X`` and its row-aligned vectors.

    ``rows`` holds ``y``, ``sample_weight`` and the like (None entries pass
    through); they are kept aligned with ``X``. Returns ``(X, rows, cached)``.

    ``cache="auto"`` keeps in-memory inputs in memory (on the workers when a
    distributed client is active) and persists lazy inputs when they take at
    most half of the cluster's memory (:func:`memory_budget`); otherwise every
    pass streams the data from its store. ``True`` always persists ``X``,
    ``False`` never does. A persisted copy keeps ``X``'s chunks, or joins small ones
    (:func:`cache_block_rows`; ``per_thread`` asks for about that many blocks
    per worker thread instead). On a distributed cluster the blocks are spread
    evenly over the workers, each next to its rows of ``y`` and the weights
    (:func:`persist_placed`).

    While ``X`` streams (``False`` included), its row-aligned vectors (``y``,
    the weights: one value per row) are held in memory all the same when they
    fit (:func:`keep_vectors`): a pass then reads only ``X`` from the store.
    ``vectors=False`` leaves them lazy too (for a fitted estimator that keeps
    them: it would hold cluster memory for as long as it lives).

    ``block_rows`` fixes the blocks instead, cached or not: every block but the
    last has exactly ``block_rows`` rows, whatever the input's chunking
    (estimators whose arithmetic follows the blocks, like SGD, need that to give
    the same answer for every chunking).

    ``feature_major=True`` keeps each block of a persisted copy of ``X`` in Fortran
    order (:func:`dmlkit._kernels.kmeans.to_feature_major`; K-means' Lloyd
    kernel runs about twice as fast on it). A caller's ``X`` already in the
    workers' memory is then copied too, when it is small enough to be held twice
    (:data:`REBALANCE_BUDGET_FRACTION`); a larger one is used as it is. An
    in-memory ``X`` without a distributed client is never copied.
    """
    if cache not in ("auto", True, False):
        raise ValueError(f"cache={cache!r} should be 'auto', True or False")
    rows = tuple(rows)
    in_memory = not is_lazy(source)
    if block_rows is not None:
        if X.chunks[0][:-1] != (block_rows,) * (len(X.chunks[0]) - 1) or X.chunks[0][-1] > block_rows:
            X = X.rechunk({0: block_rows})
            rows = tuple(None if v is None else v.rechunk({0: block_rows}) for v in rows)
    if cache is False or cache == "auto" and not in_memory and X.nbytes > memory_budget():
        return X, keep_vectors(rows) if vectors else rows, False
    if in_memory and _client() is None:
        return X, rows, True  # already in this process's memory
    feature_major = feature_major and X.ndim == 2 and X.shape[1] > 1
    block = (cache_block_rows(X, per_thread=per_thread,
                              threads=None if per_thread is None else _total_threads())
             if block_rows is None else 0)
    joined = block > max(X.chunks[0])
    # read straight into Fortran order where the chunks are the blocks (one copy, not two)
    direct = _read_directly(X, feature_major=feature_major and not joined)
    feature_major = feature_major and (joined or direct is X)  # still to be done
    X = direct
    if joined:
        X = X.rechunk({0: block})
        rows = tuple(None if v is None else v.rechunk({0: block}) for v in rows)
    client = _client()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*large graph.*")
        if client is None:
            if feature_major:
                X = _to_feature_major(X)
            X, *rows = dask.persist(X, *rows)
        else:
            X, *rows = persist_placed([X, *rows], client, feature_major=feature_major)
    return X, tuple(rows), True


def _to_feature_major(X: da.Array) -> da.Array:
    """``X`` with every block in Fortran order (a copy; same values)."""
    return X.map_blocks(to_feature_major, dtype=X.dtype, name=f"feature-major-{X.name}")


def _read_directly(X: da.Array, feature_major: bool = False) -> da.Array:
    """``X`` with its blocks read by :mod:`dmlkit._store` (the same values, without zarr's
    codec pipeline) when it is an uncompressed local Zarr array as :func:`open_zarr`
    opens it, in Fortran order if ``feature_major``; else ``X`` itself."""
    source = getattr(X, "_dmlkit_source", None)
    if source is None:
        return X
    convert = to_feature_major if feature_major else None
    return da.map_blocks(_store.read_block, source=source, convert=convert, chunks=X.chunks,
                         dtype=X.dtype, meta=X._meta,
                         name=f"read-{dask.base.tokenize(X.name, source, feature_major)}")


#: While ``X`` streams, its row-aligned vectors stay in memory when together they take at
#: most this fraction of the cache budget (:func:`memory_budget`).
VECTORS_BUDGET_FRACTION = 0.25


def keep_vectors(rows: Sequence[da.Array | None]) -> tuple[da.Array | None, ...]:
    """``rows`` with its 1-D arrays (``y``, weights) persisted, when together they take at
    most :data:`VECTORS_BUDGET_FRACTION` of :func:`memory_budget`.

    Each is ``1 / n_features`` of ``X``'s size or less, and read, parsed or
    converted (labels to class indices) on every pass otherwise. On a
    distributed cluster the blocks are spread evenly over the workers
    (:func:`persist_placed`), so that the tasks of a streamed pass, placed
    next to them, share out ``X``'s chunks evenly too.
    """
    rows = tuple(rows)
    vectors = [v for v in rows if v is not None and v.ndim == 1]
    if not vectors or sum(v.nbytes for v in vectors) > VECTORS_BUDGET_FRACTION * memory_budget():
        return rows
    client = _client()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*large graph.*")
        kept = (dask.persist(*vectors) if client is None
                else persist_placed(vectors, client))
    it = iter(kept)
    return tuple(next(it) if v is not None and v.ndim == 1 else v for v in rows)


def block_slots(n_blocks: int, client) -> list[tuple[str, int]]:
    """The worker thread ``(address, thread)`` for each of ``n_blocks`` row blocks.

    Contiguous runs balanced by threads: worker ``j`` with ``t_j`` threads gets
    about ``n_blocks * t_j / sum(t)`` consecutive blocks, so every thread has
    the same number of rows to work on and neighbouring blocks (combined first
    by the tree) share a worker.
    """
    workers = client.scheduler_info(n_workers=-1)["workers"]
    if not workers:  # between a worker's restart and its return, say
        client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        workers = client.scheduler_info(n_workers=-1)["workers"]
    slots = [(addr, t) for addr in sorted(workers)
             for t in range(max(1, workers[addr].get("nthreads", 1)))]
    return [slots[i * len(slots) // n_blocks] for i in range(n_blocks)]


def _held_where(futures: list, client) -> tuple[list[str], dict[str, int]]:
    """The worker that holds each of the blocks already in the cluster's memory, and the
    threads of every worker."""
    from distributed import wait

    wait(futures)
    holders = client.who_has(futures)
    nthreads = {addr: max(1, info.get("nthreads", 1)) for addr, info in
                client.scheduler_info(n_workers=-1)["workers"].items()}
    return [sorted(holders.get(f.key) or ["?"])[0] for f in futures], nthreads


def _thread_slots(where: Sequence[str], nthreads: dict[str, int]) -> list[tuple[str, int]]:
    """``(worker, thread)`` of each block: each worker's blocks shared out in order among its
    threads."""
    total = Counter(where)
    slots, seen = [], Counter()
    for addr in where:
        slots.append((addr, seen[addr] * nthreads.get(addr, 1) // total[addr]))
        seen[addr] += 1
    return slots


def _thread_loads(where: Sequence[str], rows: Sequence[int],
                  nthreads: dict[str, int]) -> list[float]:
    """Rows per worker thread (as :func:`_thread_slots` shares them out), largest first."""
    load: Counter = Counter()
    for slot, r in zip(_thread_slots(where, nthreads), rows):
        load[slot] += r
    return sorted(load.values(), reverse=True)


def rebalanced(where: Sequence[str], rows: Sequence[int],
               nthreads: dict[str, int]) -> list[str]:
    """Holders for the blocks that even out the rows of the worker threads, moving few
    blocks.

    A block moves, from the end of a busy worker's blocks, to the worker
    with the fewest rows per thread, when that lowers the load of the
    busiest threads (their rows, largest first, compared in turn); a block is
    always worked by one thread, so a move that does not shorten the longest
    runs is not made. Dask's ``persist`` of a caller's array can leave one of
    two workers twice the blocks of the other (11 of 16 here), and every pass
    of an iterative fit then waits for it.
    """
    live = list(nthreads)
    if len(live) < 2 or any(a not in nthreads for a in where):
        return list(where)
    new = list(where)
    for b in reversed(range(len(new))):
        per_thread = {a: 0.0 for a in live}
        for i, a in enumerate(new):
            per_thread[a] += rows[i] / nthreads[a]
        dst = min(live, key=lambda a: (per_thread[a], a))
        if dst == new[b]:
            continue
        moved = new[:b] + [dst] + new[b + 1 :]
        if _thread_loads(moved, rows, nthreads) < _thread_loads(new, rows, nthreads):
            new = moved
    return new


#: A caller's persisted ``X`` is evened out (:func:`rebalanced`) only when it takes at most
#: this fraction of the cache budget: a worker counts a block it keeps under both the
#: caller's key and the cache's, and twice the memory of a large ``X`` could make it spill.
REBALANCE_BUDGET_FRACTION = 0.25


def persist_placed(arrays: Sequence[da.Array | None], client,
                   feature_major: bool = False) -> list[da.Array | None]:
    """Persist row-aligned arrays on a distributed cluster, placing the blocks.

    Block ``i`` of every array is computed and kept on the same worker
    (:func:`block_slots`): a pass over ``X`` then runs the same number of rows
    on every thread, and a kernel that also reads ``y`` or the weights finds
    them next to ``X``'s block instead of fetching them from another worker.
    Blocks are read where they are kept, so loading moves no data between
    workers either. The placement is a preference, lifted once the blocks are
    computed (:func:`_unrestrict_when_placed`): if a worker dies, its blocks
    are recomputed on another one, or on the worker that replaces it (from
    the source; data scattered from the client cannot be). If ``X`` itself
    is already persisted it stays where it is (no copy), and so do the other
    arrays that are; the others are
    computed next to ``X``'s blocks (a resident pass's actors fetch the few
    blocks of ``y`` or the weights held elsewhere once, when they start). Unless
    its workers hold uneven shares of its rows (:func:`rebalanced`) and it is
    small enough (:data:`REBALANCE_BUDGET_FRACTION`): then the blocks that
    even them out are copied to the workers short of rows (the others are
    referenced under the cache's keys too), and the other arrays join ``X``'s
    blocks where they end up. The returned
    arrays carry which worker thread holds each block (``_dmlkit_slots``), so
    that passes map one task per thread (:class:`dmlkit._graph.RowBlocks`),
    and whether ``X`` was in the workers' memory already (``_dmlkit_in_memory``:
    its blocks are there at once, or as soon as the few moved ones arrive).

    ``feature_major=True`` keeps ``X``'s blocks in Fortran order (see
    :func:`cache`): a caller's ``X`` held already is then copied block by block
    where it is placed (when small enough, as for moves), else computed so.
    """
    from dask.delayed import Delayed
    from dask.optimization import cull
    from distributed import futures_of

    live = [a for a in arrays if a is not None]
    X = live[0]
    n_blocks = X.numblocks[0]
    keys = [[(a.name, i) + (0,) * (a.ndim - 1) for i in range(n_blocks)] for a in live]
    held = [{f.key: f for f in futures_of(a)} for a in live]
    x_held = in_memory = all(key in held[0] for key in keys[0])
    if x_held:
        found, nthreads = _held_where([held[0][key] for key in keys[0]], client)
        small = X.nbytes <= REBALANCE_BUDGET_FRACTION * memory_budget()
        where = rebalanced(found, X.chunks[0], nthreads) if small else found
        feature_major = feature_major and small  # a copy of every block
        # else the blocks that move (all, for feature-major copies) are copied, the
        # others referenced
        x_held = where == found and not feature_major
        slots = _thread_slots(where, nthreads)
    else:
        if feature_major:  # each block computed in Fortran order where it is placed
            live[0] = X = _to_feature_major(X)
            keys[0] = [(X.name, i) + (0,) * (X.ndim - 1) for i in range(n_blocks)]
        slots = block_slots(n_blocks, client)
        where = [addr for addr, _ in slots]
    names, sources = [], []
    for j, a in enumerate(live):
        if x_held and all(key in held[j] for key in keys[j]):  # all persisted by the caller
            names.append(a.name)
            sources.append(None)
        elif all(key in held[j] for key in keys[j]):  # persisted by the caller, elsewhere
            copy = feature_major and j == 0
            name = f"placed-{dask.base.tokenize(a.name, where, copy)}"
            same = dask.delayed(to_feature_major if copy else _same_block, pure=True)
            names.append(name)
            sources.append([same(held[j][key], dask_key_name=(name,) + key[1:])
                            for key in keys[j]])
        else:  # the block keeps its key in the array's graph, optimised as arrays are
            # (a key computed elsewhere under another fusion would confuse the scheduler)
            optimized = dict(dask.optimize(a)[0].__dask_graph__())
            names.append(a.name)
            sources.append([Delayed(key, optimized) for key in keys[j]])
    futures = [[held[j].get(key) if sources[j] is None else None for key in keys[j]]
               for j in range(len(live))]
    placed_keys, placed_futures = set(), []
    # per worker, one persist of every block it is to hold: the row vectors' blocks
    # first (a higher priority), so that none waits behind a long read of X's block,
    # where the scheduler's work stealing could move it away from X's block
    for addr in sorted(set(where)):
        mine = [i for i in range(n_blocks) if where[i] == addr]
        every = [(j, i) for j in range(len(live)) if sources[j] is not None for i in mine]
        if not every:
            continue
        whole, merged = {}, set()  # one graph for both calls: one definition per key
        for j, i in every:
            part = sources[j][i].__dask_graph__()
            if id(part) not in merged:
                merged.add(id(part))
                whole.update(part)
        first = [(j, i) for j, i in every if j > 0]
        if first:  # X's blocks that the vectors' blocks need go with them
            _, deps = cull(whole, [sources[j][i].key for j, i in first])
            first += [(j, i) for j, i in every if j == 0 and sources[j][i].key in deps]
        rest = [t for t in every if t not in first]
        for todo, priority in ((first, 1), (rest, 0)):
            if not todo:
                continue
            wanted = [sources[j][i].key for j, i in todo]
            graph, _ = cull(whole, wanted)
            done = client.persist([Delayed(key, graph) for key in wanted], workers=[addr],
                                  allow_other_workers=True, optimize_graph=False,
                                  priority=priority)
            placed_keys.update(k for k in graph if not any(k in h for h in held))
            for (j, i), value in zip(todo, done):
                (futures[j][i],) = futures_of(value)
                placed_futures.append(futures[j][i])
    _unrestrict_when_placed(client, placed_futures, placed_keys)
    out = []
    for j, (a, name) in enumerate(zip(live, names)):
        layer = {f.key: f for f in futures[j]}
        graph = HighLevelGraph.from_collections(name, layer, dependencies=())
        placed = da.Array(graph, name, a.chunks, dtype=a.dtype, meta=a._meta)
        placed._dmlkit_slots = slots  # which worker thread holds each block
        if x_held:  # slots read from the scheduler just now (not a placement preference)
            placed._dmlkit_held = True
        placed._dmlkit_in_memory = in_memory  # X was held already (moved, maybe, not read)
        out.append(placed)
    it = iter(out)
    return [None if a is None else next(it) for a in arrays]


def _unrestrict_when_placed(client, futures: Sequence, keys: set) -> None:
    """Lift the worker restrictions of the placed tasks ``keys`` once all of ``futures`` are
    done (a callback; this returns at once).

    The placement only matters when the blocks are first computed. Afterwards
    a block lost with its worker is recomputed wherever the scheduler likes,
    as loose restrictions to a worker that has gone allow. Except when no
    worker is running at that moment (a one-worker cluster whose worker
    restarts, or every worker replaced): the tasks then wait in the
    scheduler's ``no-worker`` state, and distributed only hands such a task
    to a worker that joins if its restrictions allow that worker. Without
    restrictions any worker does; with them to a departed worker, the task
    would wait for ever.
    """
    if not futures or getattr(client, "asynchronous", False):
        return
    lock, pending = threading.Lock(), [len(futures)]
    names = list(keys)

    def done(_):
        with lock:
            pending[0] -= 1
            if pending[0]:
                return
        try:
            client.run_on_scheduler(_unrestrict, names)
        except Exception as error:  # a closed client, say: the restrictions stay
            logger.debug("placed tasks keep their worker restrictions: %r", error)

    for future in futures:
        future.add_done_callback(done)


def _unrestrict(keys: Sequence, dask_scheduler=None) -> int:
    """On the scheduler: drop the worker restrictions of the tasks ``keys`` that it still
    knows; returns how many it changed."""
    changed = 0
    for key in keys:
        ts = dask_scheduler.tasks.get(key)
        if ts is not None and ts.worker_restrictions is not None:
            ts.worker_restrictions = None
            ts.loose_restrictions = False
            changed += 1
    return changed


def _same_block(block):
    """The block itself, aligned (a block copied from another worker may not be)."""
    from dmlkit._graph import aligned

    return aligned(block)



def check_stats(stats, row_chunks: tuple, weighted: bool, supervised: bool = False) -> None:
    """Raise a clear error for what the first pass found in the values.

    ``stats`` is a reduced :class:`dmlkit._kernels.stats.DataStats`;
    ``row_chunks`` is the chunking of the data as given (not of a re-blocked
    cached copy), so the error names the user's chunk.
    """
    if stats.bad_rows:
        starts = np.concatenate([[0], np.cumsum(row_chunks)])
        first = min(f for f, _ in stats.bad_rows)
        total = sum(n for _, n in stats.bad_rows)
        chunk = int(np.searchsorted(starts, first, side="right") - 1)
        names = ["X"] + ["y"] * supervised + ["sample_weight"] * weighted
        what = " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "X"
        more = f" and {total - 1} more row(s)" if total > 1 else ""
        raise ValueError(
            f"{what} contains NaN or inf in chunk {chunk} (rows {starts[chunk]} to "
            f"{starts[chunk + 1] - 1}) at row {first}{more}; clean or impute the data first"
        )
    if weighted and stats.weight_min < 0:
        raise ValueError(f"sample_weight should be >= 0; its minimum is {stats.weight_min}")
    if weighted and stats.weight_sum <= 0:
        raise ValueError("sample_weight is zero everywhere; at least one sample needs "
                         "a positive weight")
