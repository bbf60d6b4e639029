"""The one place that turns per-chunk kernels into Dask graphs.

A :class:`RowBlocks` holds the aligned row blocks of ``X`` (and optionally its
sample weights) of one fit. :meth:`RowBlocks.reduce` maps a kernel over
every block with its parameters and combines the partial results by a tree of
fan-in ``split_every``. Small parameters (centres, coefficients) travel inside
each task; large ones enter the graph once, as one literal key sent to each
worker once. The tree's levels are tasks, except the last combine (of at most
``split_every`` records), which runs where the result is computed: that saves
one task and one transfer between workers per pass. The tree's shape and the
order inside every combine are fixed by the block order, so the floating point
result does not depend on the scheduler, the number of workers or which worker
ran what. Passes over blocks that a distributed cluster holds (a placed cache),
or streams from an uncompressed local Zarr store that the workers read
directly (:mod:`dmlkit._store`), go to resident actors next to the blocks
instead (:mod:`dmlkit._resident`), which run the same kernels and folds
without a graph.

Kernels have the signature ``kernel(X, w, offset, **params)`` (``X`` a NumPy
block, ``w`` its weights or None, ``offset`` the global index of its first row)
and combines ``combine(a, b)``; both are plain NumPy functions from
``dmlkit._kernels``.

Searches (nearest neighbours) use :func:`tiles` instead: a kernel over every
(data block, query block) pair, and per query block the same fixed tree;
:func:`stack` turns the per-query-block records into lazy arrays.

Kernels run with BLAS on one thread (:data:`one_blas_thread`, held around
every kernel call, and by :func:`compute` around a local scheduler's work): a
multi-threaded BLAS may split a product's sum among its threads (OpenBLAS
does, for a matrix-vector product along many rows), and the bits would then
depend on the thread count of the process that ran it. Distributed's workers
start with one BLAS thread anyway (``distributed.nanny.pre-spawn-environ``,
unless the environment says otherwise). Each worker thread runs one kernel at
a time, so the cores are busy all the same.
"""
from __future__ import annotations

import threading
from functools import reduce as _fold
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np
from dask.base import DaskMethodsMixin
from dask.delayed import optimize as _optimize_delayed
from dask.threaded import get as _threaded_get
from dask.highlevelgraph import HighLevelGraph

from dmlkit import _store
from dmlkit._kernels.stats import combine_stats, data_stats

DEFAULT_SPLIT_EVERY = 8
#: Parameters up to this size travel inside every task; larger ones as one key.
INLINE_PARAMS_BYTES = 64 * 2**10


def check_split_every(split_every: int | None) -> int:
    """Validate ``split_every`` (None means the default fan-in, 8)."""
    if split_every is None:
        return DEFAULT_SPLIT_EVERY
    if isinstance(split_every, bool) or not isinstance(split_every, (int, np.integer)) or split_every < 2:
        raise ValueError(f"split_every={split_every!r} should be an integer >= 2 or None")
    return int(split_every)


def _fold_all(combine: Callable, *parts: Any) -> Any:
    """Left fold of ``parts`` with ``combine``: a fixed order, hence reproducible."""
    return _fold(combine, parts)


def _fold_results(results: Sequence, combine: Callable) -> Any:
    return _fold(combine, results)


def tree_levels(n: int, fan_in: int) -> list[int]:
    """Records per level of the tree over ``n`` blocks: ``[n, ceil(n / fan_in), ...]``, down
    to the level of at most ``fan_in`` records that the root folds."""
    counts = [n]
    while counts[-1] > fan_in:
        counts.append(-(-counts[-1] // fan_in))
    return counts


def _node(nodes: dict, level: int, i: int, counts: list, combine: Callable, fan_in: int):
    """Tree node ``(level, i)`` from its children, which it removes from ``nodes``."""
    children = [nodes.pop((level - 1, j))
                for j in range(i * fan_in, min((i + 1) * fan_in, counts[level - 1]))]
    return children[0] if len(children) == 1 else _fold(combine, children)


def fold_held(records: dict, members: Sequence[int], n: int, combine: Callable,
              fan_in: int) -> dict:
    """The largest subtrees of the tree over ``n`` blocks that ``members`` hold entirely.

    ``records`` maps each member block to its record. Returns ``{(level, index):
    record}`` for the highest tree nodes whose blocks are all members (single
    blocks at level 0 where no larger subtree is held), computed with the
    tree's own operations: node ``(L, i)`` is the left fold of its children
    ``(L - 1, i * fan_in ...)``, a single child passed up as it is.
    """
    held = set(members)
    nodes = {(0, b): records[b] for b in members}
    counts = tree_levels(n, fan_in)
    span = 1
    for level in range(1, len(counts)):
        span *= fan_in
        for i in sorted({b // span for b in members}):
            if all(b in held for b in range(i * span, min((i + 1) * span, n))):
                nodes[(level, i)] = _node(nodes, level, i, counts, combine, fan_in)
    return nodes


def _fold_groups(results: Sequence[dict], combine: Callable, fan_in: int, n: int) -> Any:
    """The root from the groups' subtrees: the nodes no group held, then the root's fold."""
    nodes: dict = {}
    for part in results:
        nodes.update(part)
    counts = tree_levels(n, fan_in)
    top = len(counts) - 1
    sent = set(nodes)

    def under_sent(level: int, i: int) -> bool:  # folded into a subtree a group sent
        return any((up, i // fan_in ** (up - level)) in sent for up in range(level + 1, top + 1))

    for level in range(1, top + 1):
        for i in range(counts[level]):
            if (level, i) not in nodes and not under_sent(level, i):
                nodes[(level, i)] = _node(nodes, level, i, counts, combine, fan_in)
    return _fold(combine, [nodes[(top, i)] for i in range(counts[top])])


def groups_of(slots: Sequence | None) -> list[list[int]] | None:
    """The blocks of each worker thread (in block order), or None when each holds one block."""
    if not slots:
        return None
    groups: dict = {}
    for i, slot in enumerate(slots):
        groups.setdefault(slot, []).append(i)
    out = sorted(groups.values())
    return out if len(out) < len(slots) else None


def _nbytes(value: Any) -> int:
    """Rough size of a parameter structure: its arrays' bytes plus a little per item."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values()) + 64 * len(value)
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value) + 64 * len(value)
    return 64


def ship(params: Any) -> Any:
    """``params`` as a task argument: the value itself when small, else one literal key.

    A small value inside each task costs less than fetching a key from the
    worker that holds it; a large one is sent to each worker once.
    """
    if _nbytes(params) <= INLINE_PARAMS_BYTES:
        return params
    return dask.delayed(params, traverse=False, pure=True)


class Reduction(DaskMethodsMixin):
    """The top of a tree reduction, combined when computed.

    A dask collection: ``dask.compute`` (or :func:`compute`) computes its
    parts on the cluster, together with anything computed alongside, and
    folds them with ``combine`` in the calling process. The parts are the at
    most ``split_every`` records under the root, or (with ``fan_in`` set) one
    set of subtrees per group of blocks, whose missing nodes are folded here
    too, each from at most ``split_every`` records.

    ``build`` returns ``(parts, name)``; it is called when the graph is first
    needed, which a pass run by resident actors never does.
    """

    __slots__ = ("_build", "_built", "combine", "fan_in", "n_blocks", "resident", "job")

    def __init__(self, build: Callable[[], tuple[list, str]], combine: Callable,
                 fan_in: int | None = None, n_blocks: int | None = None, resident: Any = None,
                 job: tuple | None = None):
        self._build = build
        self._built: tuple[list, str] | None = None
        self.combine = combine
        #: set when each part is a group's subtrees ({(level, index): record}); the tree's
        #: missing nodes and its root are then folded here
        self.fan_in = fan_in
        self.n_blocks = n_blocks
        #: the blocks' resident actors (:mod:`dmlkit._resident`) and this pass's
        #: ``(kernel, params, combine, fan_in)``: :func:`compute` may run it there
        self.resident = resident
        self.job = job

    def _graph_parts(self) -> tuple[list, str]:
        if self._built is None:
            parts, name = self._build()
            self._built = (list(parts), name)
        return self._built

    @property
    def parts(self) -> list:
        """The delayed records the caller folds."""
        return self._graph_parts()[0]

    @property
    def name(self) -> str:
        return self._graph_parts()[1]

    def __dask_graph__(self):
        return HighLevelGraph.merge(*[p.__dask_graph__() for p in self.parts])

    @property
    def dask(self):
        """The graph of the records (as ``Delayed.dask``)."""
        return self.__dask_graph__()

    def __dask_keys__(self):
        return [p.key for p in self.parts]

    def __dask_layers__(self):
        return tuple(layer for p in self.parts for layer in p.__dask_layers__())

    def __dask_tokenize__(self):
        return self.name

    def __dask_postcompute__(self):
        if self.fan_in is not None:
            return _fold_groups, (self.combine, self.fan_in, self.n_blocks)
        return _fold_results, (self.combine,)

    def __dask_postpersist__(self):
        raise NotImplementedError("a Reduction is computed, not persisted")

    __dask_optimize__ = staticmethod(_optimize_delayed)
    __dask_scheduler__ = staticmethod(_threaded_get)


class _OneBlasThread:
    """Context: this process's BLAS on one thread while it lasts (nested uses counted).

    The first to enter sets every BLAS library loaded at the first use (NumPy's,
    the one the kernels call) that has more threads to one; the last to leave
    restores them. Best effort: without threadpoolctl, or where a library
    refuses, nothing changes (OpenBLAS may ignore a setting made from another
    thread than the main one once the main thread has made one).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._active = 0
        self._saved: list = []
        self._libs: list | None = None

    def _blas(self) -> list:
        if self._libs is None:
            try:
                from threadpoolctl import ThreadpoolController

                controller = ThreadpoolController().select(user_api="blas")
                self._libs = list(controller.lib_controllers)
            except Exception:  # no threadpoolctl, or an unknown library: leave BLAS be
                self._libs = []
        return self._libs

    def __enter__(self):
        with self._lock:
            if self._active == 0:
                self._saved = []
                for lib in self._blas():
                    try:
                        n = lib.get_num_threads()
                        if n is not None and n != 1:
                            lib.set_num_threads(1)
                            self._saved.append((lib, n))
                    except Exception:  # best effort: this library keeps its threads
                        pass
            self._active += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            self._active -= 1
            if self._active == 0:
                for lib, n in self._saved:
                    try:
                        lib.set_num_threads(n)
                    except Exception:
                        pass
                self._saved = []
        return False


#: Held around every kernel (:func:`_map_block`, :func:`_map_group`, the tiles, the
#: row-wise maps), by :func:`compute` around a local scheduler's work, and by the
#: estimators around their steps on the client: see the module's docstring.
one_blas_thread = _OneBlasThread()


def _call(kernel: Callable, X, w, offset: int, params: dict, y=None) -> Any:
    with one_blas_thread:  # wherever it runs: a worker, an actor, this process
        if y is None:
            return kernel(X, w, offset, **params)
        return kernel(X, w, offset, y=y, **params)


class _Fused:
    """A kernel that runs several kernels on the same block in one task."""

    def __init__(self, kernels: Sequence[Callable]):
        self.kernels = tuple(kernels)

    def __call__(self, X, w, offset, *, params: Sequence[dict], y=None):
        # the first pass may meet NaN/inf; the stats kernel reports them, quietly
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return tuple(_call(k, X, w, offset, p, y) for k, p in zip(self.kernels, params))


class _FusedCombine:
    def __init__(self, combines: Sequence[Callable]):
        self.combines = tuple(combines)

    def __call__(self, a, b):
        return tuple(c(x, y) for c, x, y in zip(self.combines, a, b))


def fuse(*pairs: tuple[Callable, Callable]) -> tuple[Callable, Callable]:
    """Fuse ``(kernel, combine)`` pairs into one kernel and one combine over tuples.

    The fused kernel takes ``params`` as a sequence of per-kernel dicts and reads
    each block once for all of them.
    """
    return _Fused([p[0] for p in pairs]), _FusedCombine([p[1] for p in pairs])


def aligned(a):
    """``a``, or an aligned copy of it where its data are not aligned to its item size.

    Arrays received from another worker can be views at any byte offset of
    the message that carried them; NumPy runs ufuncs on unaligned data
    through a slow buffered path (about 10x slower here).
    """
    if isinstance(a, np.ndarray) and not a.flags.aligned:
        return np.array(a, order="K")  # a feature-major block stays so
    return a


def _map_group(kernel: Callable, params: dict, members: Sequence[int], offsets: Sequence[int],
               xs: Sequence | None, ws: Sequence | None, ys: Sequence | None, *,
               combine: Callable, fan_in: int, n_blocks: int,
               source: _store.ZarrSource | None = None, stops: Sequence[int] | None = None) -> dict:
    """The kernel on each block of a group (the blocks one worker thread holds, or reads
    from ``source``: rows ``offsets[i] .. stops[i]``, when ``xs`` is None), and the
    subtrees of the reduction tree that the group holds entirely (:func:`fold_held`)."""
    records = {}
    for i, (b, offset) in enumerate(zip(members, offsets)):
        w = None if ws is None else aligned(ws[i])
        y = None if ys is None else aligned(ys[i])
        if xs is None:
            records[b] = _store.with_rows(
                source, int(offset), int(stops[i]),
                lambda x: _call(kernel, x, w, int(offset), params, y))
        else:
            records[b] = _call(kernel, aligned(xs[i]), w, int(offset), params, y)
    return fold_held(records, members, n_blocks, combine, fan_in)


def _stream_slots(n_blocks: int, vectors: Sequence[da.Array]) -> list | None:
    """The worker thread that reads each block of a streamed ``X`` (see
    :class:`RowBlocks`): the one holding the block's weights and ``y`` when they are
    cached placed, else contiguous runs over the cluster's threads (when nothing
    else is read); None without a distributed client."""
    from dmlkit import data

    if vectors:
        slots = [getattr(v, "_dmlkit_slots", None) for v in vectors]
        if any(s is None for s in slots) or any(list(s) != list(slots[0]) for s in slots):
            return None
        return list(slots[0])
    client = data._client()
    return None if client is None else data.block_slots(n_blocks, client)


def _column(v):
    return v[:, None]


def _block_args(rest: tuple, has_w: bool) -> tuple:
    """``(params, w, y)`` from a blockwise body's trailing arguments: the weights' and
    targets' column blocks (as present), then the parameters."""
    params, columns = rest[-1], [aligned(c) for c in rest[:-1]]
    w = columns.pop(0)[:, 0] if has_w else None
    y = columns.pop(0)[:, 0] if columns else None
    return params, w, y


def _map_block(x, *rest, kernel, offsets, has_w, block_id=None):
    """Blockwise body: ``kernel(X_block, w_block, offset, [y=y_block,] **params)``."""
    params, w, y = _block_args(rest, has_w)
    return _call(kernel, aligned(x), w, int(offsets[block_id[0]]), params, y)


def _map_read(*rest, kernel, source, bounds, has_w, block_id=None):
    """:func:`_map_block` for a block the task reads itself, straight from the store's
    chunk files (:mod:`dmlkit._store`)."""
    params, w, y = _block_args(rest, has_w)
    start, stop = (int(b) for b in bounds[block_id[0]])
    return _store.with_rows(source, start, stop, lambda x: _call(kernel, x, w, start, params, y))


#: Seconds :meth:`RowBlocks.held` waits to hear that blocks a caller holds are in memory.
HELD_WAIT_S = 1.0


class RowBlocks:
    """Aligned row blocks of validated arrays, prepared once per fit.

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
        One chunk along features (``dmlkit.data`` guarantees it).
    sample_weight : dask.array.Array of shape (n_samples,) or None
        Same row chunks as ``X``.
    y : dask.array.Array of shape (n_samples,) or None
        Same row chunks as ``X``; when given, kernels also receive ``y=`` its block.

    Notes
    -----
    The per-block kernel is a blockwise operation on ``X``, so Dask fuses it
    with the task that reads the block (from Zarr, or from memory when
    persisted): a block is read and reduced to its partial result in one task
    and never travels between workers.

    When ``X`` is a copy cached by :func:`dmlkit.data.persist_placed`, which
    knows the worker thread that holds each block, the blocks of one thread
    are mapped by one task (fewer tasks per pass), which also folds the
    subtrees of the reduction tree it holds entirely (:func:`fold_held`); the
    calling process folds the rest of the tree and its root. These are the
    same operations in the same order as the tree of tasks, hence the same
    result.

    When ``X`` is an uncompressed local Zarr array as :mod:`dmlkit.data` opens
    it (its ``_dmlkit_source``), the pass's own tasks read its blocks from the
    chunk files (:meth:`partials`), and on a distributed cluster the passes go
    to resident actors that read them (:mod:`dmlkit._resident`): the same rows,
    kernels and folds, so the same bits as a pass through zarr.
    """

    def __init__(self, X: da.Array, sample_weight: da.Array | None = None,
                 y: da.Array | None = None, offsets: Sequence[int] | None = None):
        if X.numblocks[1] != 1:
            raise ValueError(f"X has {X.numblocks[1]} chunks along features; expected 1")
        for name, v in (("sample_weight", sample_weight), ("y", y)):
            if v is not None and v.chunks[0] != X.chunks[0]:
                raise ValueError(f"{name} must have the same row chunks as X")
        self.X = X
        self.sample_weight = sample_weight
        self.y = y
        self.row_chunks = X.chunks[0]
        self.offsets = (np.concatenate([[0], np.cumsum(self.row_chunks)[:-1]]).astype(np.int64)
                        if offsets is None else np.asarray(offsets, dtype=np.int64))
        if self.offsets.shape != (self.n_blocks,):
            raise ValueError(f"offsets has shape {self.offsets.shape}; expected ({self.n_blocks},)")
        # vectors as columns, by a blockwise step that fuses into each pass's task (a slice
        # with None would be a task of its own per block and pass)
        self._args = [X] + [v.map_blocks(_column, new_axis=1, chunks=(v.chunks[0], (1,)))
                            for v in (sample_weight, y) if v is not None]
        #: where the blocks of X lie in an uncompressed local Zarr store (dmlkit.data tags
        #: the arrays it opens): a pass then reads them itself, see :meth:`partials`
        source = getattr(X, "_dmlkit_source", None)
        self.source = (source if source is not None and offsets is None
                       and source.shape == X.shape and np.dtype(source.dtype) == X.dtype
                       else None)
        #: which worker thread holds each block, when known (a placed copy), or reads it in
        #: resident passes (a streamed X with a source, on a distributed cluster)
        self.slots = getattr(X, "_dmlkit_slots", None)
        if self.source is not None and self.slots is None:
            self.slots = _stream_slots(self.n_blocks, [v for v in (sample_weight, y)
                                                       if v is not None])
        # the groups of a placed copy map one task per thread; a streamed X's tasks, when
        # its passes run as tasks, are the tree's (one per block)
        self.groups = groups_of(self.slots) if self.source is None else None
        self._holders: Any = False  # not created yet

    @property
    def n_blocks(self) -> int:
        return len(self.row_chunks)

    def select(self, indices: Sequence[int], transform: Callable | None = None,
               params: dict | None = None) -> "RowBlocks":
        """The blocks ``indices`` (in that order), each optionally transformed, held in memory.

        ``transform(block, offset, **params)`` must keep the rows' number (e.g. a
        permutation seeded by the block's global ``offset``); it is applied to
        ``X``, the weights and ``y`` alike. The selected blocks keep their global
        offsets, and are persisted: later passes over them read memory, not the
        store. Drop the returned object to release them.
        """
        indices = [int(i) for i in indices]
        offsets = self.offsets[indices]
        columns = [self.X, self.sample_weight, self.y]
        picked = []
        for v in columns:
            if v is None:
                picked.append(None)
                continue
            part = da.concatenate([v.blocks[i] for i in indices], axis=0)
            if transform is not None:
                part = part.map_blocks(_transform_block, transform, offsets,
                                       dask.delayed(params or {}, traverse=False, pure=True),
                                       dtype=part.dtype)
            picked.append(part)
        picked = list(dask.persist(*[v for v in picked if v is not None]))
        X, w, y = (picked.pop(0) if v is not None else None for v in columns)
        return RowBlocks(X, w, y, offsets=offsets)

    def partials(self, kernel: Callable, params: dict | None = None, name: str = "partial"):
        """The per-block partial results, one ``Delayed`` per row block, in row order.

        Blocks of an array read from an uncompressed local Zarr store
        (:attr:`source`) are read by the pass's own tasks, each into its
        thread's reused buffer (:func:`dmlkit._store.with_rows`); the kernel
        sees the same rows as through zarr, so the results are the same bits.
        """
        shipped = ship(params if params is not None else {})
        token = dask.base.tokenize(kernel, shipped, *self._args)
        if self.source is not None:
            bounds = np.stack([self.offsets, self.offsets + np.asarray(self.row_chunks)], axis=1)
            if len(self._args) == 1:  # nothing else to read through dask
                task = dask.delayed(_map_read, pure=True)
                parts = [task(shipped, kernel=kernel, source=self.source, bounds=bounds[i : i + 1],
                              has_w=False, block_id=(0, 0),
                              dask_key_name=(f"{name}-map-{token}", i, 0))
                         for i in range(self.n_blocks)]
                return parts, token
            parts = da.map_blocks(
                _map_read, *self._args[1:], shipped, kernel=kernel, source=self.source,
                bounds=bounds, has_w=self.sample_weight is not None,
                name=f"{name}-map-{token}", dtype=object, chunks=((1,) * self.n_blocks, (1,)),
                meta=np.empty((0, 0), dtype=object),
            )
            return list(parts.to_delayed(optimize_graph=True).ravel()), token
        parts = da.map_blocks(
            _map_block, *self._args, shipped, kernel=kernel, offsets=self.offsets,
            has_w=self.sample_weight is not None,
            name=f"{name}-map-{token}", dtype=object, chunks=((1,) * self.n_blocks, (1,)),
            meta=np.empty((0, 0), dtype=object),
        )
        return list(parts.to_delayed(optimize_graph=True).ravel()), token

    def _grouped_parts(self, kernel, combine, params, fan_in: int, name: str):
        """One task per group of blocks; the tree folded where the result is computed."""
        shipped = ship(params if params is not None else {})
        token = dask.base.tokenize(kernel, shipped, combine, fan_in, self.groups,
                                   *[a.name for a in self._args])
        columns = [None if v is None else v.to_delayed(optimize_graph=False).ravel()
                   for v in (self.X, self.sample_weight, self.y)]
        task = dask.delayed(_map_group, pure=True)
        parts = []
        for g, members in enumerate(self.groups):
            xs, ws, ys = (None if c is None else [c[i] for i in members] for c in columns)
            parts.append(task(kernel, shipped, members, [int(self.offsets[i]) for i in members],
                              xs, ws, ys, combine=combine, fan_in=fan_in, n_blocks=self.n_blocks,
                              dask_key_name=(f"{name}-map-{token}", g)))
        return parts, f"{name}-reduce-{token}"

    def _tree_parts(self, kernel, combine, params, fan_in: int, name: str):
        """The tree of tasks up to the at most ``fan_in`` records under the root."""
        parts, token = self.partials(kernel, params, name)
        # the tree's keys depend on everything that shapes it
        token = dask.base.tokenize(token, combine, fan_in)
        level = 0
        fold = dask.delayed(_fold_all, pure=True)
        while len(parts) > fan_in:
            parts = [
                group[0] if len(group) == 1 else
                fold(combine, *group, dask_key_name=(f"{name}-combine-{token}", level, i))
                for i, group in enumerate(parts[j : j + fan_in] for j in range(0, len(parts), fan_in))
            ]
            level += 1
        return parts, f"{name}-reduce-{token}"

    def _resident(self):
        """The blocks' resident actors (created at the first pass), or None."""
        if self._holders is False:
            from dmlkit import _resident

            self._holders = _resident.create(self)
        return self._holders

    def held(self) -> bool:
        """Whether a pass would now run on the workers' resident actors: ``X``'s blocks are
        in their memory (the actors start at that pass if they have not yet)."""
        resident = self._resident()
        if (self.source is not None or resident is None or resident.closed
                or dask.base.get_scheduler() != resident.client.get):
            return False
        futures = resident.futures[0]
        if getattr(self.X, "_dmlkit_in_memory", False) and not all(f.status == "finished"
                                                                    for f in futures):
            # held by the caller already (a few blocks moved, maybe): a moment
            from distributed import wait

            try:
                wait(futures, timeout=HELD_WAIT_S)
            except Exception:  # timed out
                return False
        return all(f.status == "finished" for f in futures)

    def reduce(
        self,
        kernel: Callable,
        combine: Callable,
        params: dict | Sequence[dict] | None = None,
        split_every: int | None = None,
        name: str = "partial",
    ):
        """Map ``kernel`` over the blocks and tree-reduce with ``combine``.

        Returns a :class:`Reduction` of the combined record; nothing is
        computed. ``params`` travels inside each task when small, else enters
        the graph once as one literal key (:func:`ship`). On blocks a
        distributed cluster holds (a placed cache), :func:`compute` sends the
        pass to the workers' resident actors instead (:mod:`dmlkit._resident`),
        with the same result.
        """
        fan_in = check_split_every(split_every)
        job = (kernel, params if params is not None else {}, combine, fan_in)
        if self.groups is not None:
            return Reduction(lambda: self._grouped_parts(kernel, combine, params, fan_in, name),
                             combine, fan_in=fan_in, n_blocks=self.n_blocks,
                             resident=self._resident(), job=job)
        return Reduction(lambda: self._tree_parts(kernel, combine, params, fan_in, name),
                         combine, n_blocks=self.n_blocks, resident=self._resident(), job=job)


def _transform_block(block, transform, offsets, params, block_id=None):
    return transform(block, int(offsets[block_id[0]]), **params)


def map_rows(X: da.Array, func: Callable, params: dict, dtype, n_columns: int | None = None) -> da.Array:
    """Lazy blockwise ``func(X_block, **params)`` over the row blocks of ``X``.

    The result has ``X``'s row chunks and either no second axis
    (``n_columns=None``, e.g. labels) or ``n_columns`` columns in one chunk.
    """
    shipped = dask.delayed(params, traverse=False, pure=True)
    if n_columns is None:
        return X.map_blocks(_apply, func, shipped, dtype=dtype, drop_axis=1, chunks=(X.chunks[0],))
    return X.map_blocks(_apply, func, shipped, dtype=dtype, chunks=(X.chunks[0], (n_columns,)))


def _apply(block, func, params):
    with one_blas_thread:
        return func(block, **params)


class Passes:
    """Runs passes over a :class:`RowBlocks`, one ``compute`` each, and counts them.

    The first pass of a fit also computes :func:`dmlkit._kernels.stats.data_stats`
    fused into the same tasks; ``check`` (a callable taking the reduced stats) is
    called on it before the pass's own result is returned, so values are
    validated without an extra read.
    """

    def __init__(self, blocks: RowBlocks, split_every: int | None, check: Callable | None = None):
        self.blocks = blocks
        self.split_every = check_split_every(split_every)
        self.check = check
        self.stats = None
        self.count = 0

    def run(self, kernel: Callable, combine: Callable, params: dict, name: str = "pass"):
        """One pass: map ``kernel``, tree-reduce with ``combine``, compute, return the record."""
        if self.stats is None:
            k, c = fuse((kernel, combine), (data_stats, combine_stats))
            graph = self.blocks.reduce(k, c, {"params": [params, {}]}, self.split_every, name)
            (result, stats), = compute(graph)
            if self.check is not None:
                self.check(stats)
            self.stats = stats
        else:
            graph = self.blocks.reduce(kernel, combine, params, self.split_every, name)
            (result,) = compute(graph)
        self.count += 1
        return result


def compute(*results):
    """The one synchronisation point: compute delayed results together.

    Passes over blocks the workers hold (:class:`Reduction` records with
    resident actors) are sent to those actors directly when they are all
    passes over the same blocks and the actors' client is the scheduler in
    use (see :mod:`dmlkit._resident`); anything else, or a failure there,
    goes through ``dask.compute``.
    """
    resident = _common_resident(results)
    if resident is not None:
        parts = resident.run([r.job for r in results])
        if parts is not None:
            return tuple(_fold_groups(p, r.combine, r.job[3], r.n_blocks)
                         for p, r in zip(parts, results))
    from dmlkit.data import _client

    if _client() is not None:  # distributed: the kernels run on the workers
        return dask.compute(*results)
    # a local scheduler's kernels run in this process, on threads of its pool: set here,
    # in the calling thread (OpenBLAS may ignore a pool thread's setting)
    with one_blas_thread:
        return dask.compute(*results)


def _common_resident(results: Sequence):
    if not results or not all(isinstance(r, Reduction) and r.resident is not None
                              for r in results):
        return None
    resident = results[0].resident
    if any(r.resident is not resident for r in results):
        return None
    return resident if dask.base.get_scheduler() == resident.client.get else None


def _joined(v):
    """An argument that blockwise passes as lists of blocks (one level per index that the
    output does not have), as one array: a lone block as it is (not copied), several
    joined along rows (columns come in one block)."""
    if not isinstance(v, list):
        return v
    if len(v) == 1:
        return _joined(v[0])
    return np.concatenate([_joined(b) for b in v], axis=0)


def _tile_block(x, offset, *rest, kernel, n_queries, row_names):
    """Blockwise body of :func:`tiles`: one (data block, query block) pair."""
    params, x = rest[-1], aligned(_joined(x))
    queries = [aligned(_joined(q)) for q in rest[:n_queries]]
    row_blocks = [aligned(_joined(r)) for r in rest[n_queries:-1]]
    rows = dict(zip(row_names, row_blocks))
    with one_blas_thread:
        return kernel(x, int(offset[0]), *queries, **rows, **params)


def tiles(
    X: da.Array,
    queries: Sequence[da.Array],
    kernel: Callable,
    combine: Callable,
    params: dict | None = None,
    rows: dict[str, da.Array] | None = None,
    split_every: int | None = None,
    name: str = "tile",
    whole: Sequence[da.Array] = (),
) -> list:
    """Map ``kernel`` over every (data block, query block) pair, tree-combine per query block.

    Parameters
    ----------
    X : dask.array.Array of shape (n_samples, n_features)
        One chunk along features.
    queries : sequence of dask arrays
        Query-side arrays with the same row chunks (e.g. the queries and
        precomputed per-query parameters); 1-D or 2-D with one column chunk.
    kernel : callable
        ``kernel(X_block, offset, *query_blocks, **row_blocks, **params)``,
        ``offset`` the global index of the block's first row.
    combine : callable
        Associative ``combine(a, b)`` of two partial results for the same queries.
    params : dict, optional
        Broadcast parameters, one literal key in the graph.
    rows : dict of str to dask arrays, optional
        Arrays aligned with the rows of ``X`` (same row chunks; 1-D, or 2-D
        with one column chunk), passed to ``kernel`` by keyword, block by block.
    split_every : int or None
        Fan-in of each query block's tree (None: 8).
    whole : sequence of dask arrays, optional
        Query-side arrays in other row chunks, for queries in a single block:
        each tile gets them whole (their blocks joined inside the tile task,
        no task of its own), after the ``queries``.

    Returns
    -------
    list of dask.delayed.Delayed
        One combined record per query block, in query order; nothing is computed.

    Notes
    -----
    The kernel gets the blocks themselves, not copies (a persisted block is
    the worker's own array; on a local scheduler, maybe a view of the
    caller's): it must not write into them.

    Each data block is read once per call (one task; with a single query
    block the read fuses into the tile) and all its tiles depend on it, so
    the scheduler runs them where the block is: data blocks stay put, only
    query blocks and the small partial results travel. Every query block's
    tree has the shape of :meth:`RowBlocks.reduce`, so the result does not
    depend on the schedule.
    """
    fan_in = check_split_every(split_every)
    rows = dict(rows or {})
    if X.numblocks[1] != 1:
        raise ValueError(f"X has {X.numblocks[1]} chunks along features; expected 1")
    for key, v in rows.items():
        if v.chunks[0] != X.chunks[0] or (v.ndim == 2 and v.numblocks[1] != 1):
            raise ValueError(f"rows[{key!r}] must have the same row chunks as X and one "
                             "column chunk")
    q_chunks = queries[0].chunks[0]
    for q in queries:
        if q.chunks[0] != q_chunks or (q.ndim == 2 and q.numblocks[1] != 1):
            raise ValueError("query arrays must share their row chunks and have one column chunk")
    if whole and len(q_chunks) != 1:
        raise ValueError(f"whole= needs the queries in one block; they have {len(q_chunks)}")
    for w in whole:
        if w.shape[0] != sum(q_chunks) or (w.ndim == 2 and w.numblocks[1] != 1):
            raise ValueError("whole= arrays must have the queries' rows and one column chunk")
    offsets = np.concatenate([[0], np.cumsum(X.chunks[0])[:-1]]).astype(np.int64)
    offs = da.from_array(offsets, chunks=1)
    shipped = dask.delayed(params if params is not None else {}, traverse=False, pure=True)
    args = [X, "af", offs, "a"]
    for i, q in enumerate(queries):
        args += [q, "b" if q.ndim == 1 else ("b", f"q{i}")]
    for i, w in enumerate(whole):  # an index of their own, not in the output: concatenated
        args += [w, (f"c{i}",) if w.ndim == 1 else (f"c{i}", f"w{i}")]
    for i, v in enumerate(rows.values()):
        args += [v, "a" if v.ndim == 1 else ("a", f"r{i}")]
    args += [shipped, None]
    token = dask.base.tokenize(kernel, combine, fan_in, shipped.key, X, *queries, *whole,
                               *rows.values(), sorted(rows))
    parts = da.blockwise(
        _tile_block, "ab", *args, kernel=kernel, n_queries=len(queries) + len(whole),
        row_names=list(rows),
        # concatenate=False: the blocks of the indices the output lacks come as lists,
        # joined in _tile_block (dask's concatenation would copy even a lone block: each
        # tile would copy its whole data block)
        name=f"{name}-tile-{token}", dtype=object, concatenate=False, align_arrays=False,
        adjust_chunks={"a": 1, "b": 1}, meta=np.empty((0, 0), dtype=object),
    )
    grid = parts.to_delayed(optimize_graph=True)
    fold = dask.delayed(_fold_all, pure=True)
    out = []
    for b in range(grid.shape[1]):
        level, column = 0, list(grid[:, b])
        while len(column) > 1:
            groups = [column[j : j + fan_in] for j in range(0, len(column), fan_in)]
            column = [
                group[0] if len(group) == 1 else
                fold(combine, *group, dask_key_name=(f"{name}-combine-{token}", b, level, i))
                for i, group in enumerate(groups)
            ]
            level += 1
        out.append(column[0])
    return out


def _finish_block(part, func, params):
    return func(part, **params)


def stack(parts: Sequence, func: Callable, n_rows: Sequence[int], dtype,
          n_columns: int | None = None, params: Sequence[dict] | None = None) -> da.Array:
    """A lazy array from per-block records: ``func(part, **params[i])`` for each part, stacked.

    Block ``i`` has ``n_rows[i]`` rows and either no second axis
    (``n_columns=None``) or ``n_columns`` columns.
    """
    params = params if params is not None else [{}] * len(parts)
    fin = dask.delayed(_finish_block, pure=True)
    blocks = []
    for part, n, p in zip(parts, n_rows, params):
        shape = (n,) if n_columns is None else (n, n_columns)
        blocks.append(da.from_delayed(fin(part, func, p), shape=shape, dtype=dtype))
    return da.concatenate(blocks, axis=0) if len(blocks) > 1 else blocks[0]


def _apply_offset(block, func, params, offsets, block_id=None):
    with one_blas_thread:
        return func(block, int(offsets[block_id[0]]), **params)


def map_row_blocks(X: da.Array, func: Callable, params: dict, dtype,
                   n_columns: int | None = None) -> da.Array:
    """Like :func:`map_rows`, with the global index of each block's first row:
    ``func(X_block, offset, **params)``."""
    shipped = dask.delayed(params, traverse=False, pure=True)
    offsets = np.concatenate([[0], np.cumsum(X.chunks[0])[:-1]]).astype(np.int64)
    kw = dict(dtype=dtype, offsets=offsets)
    if X.ndim == 1 or n_columns is None:
        if X.ndim == 2:
            kw.update(drop_axis=1)
        return X.map_blocks(_apply_offset, func, shipped, chunks=(X.chunks[0],), **kw)
    return X.map_blocks(_apply_offset, func, shipped, chunks=(X.chunks[0], (n_columns,)), **kw)


def compute_with_progress(results: Sequence[da.Array], bar) -> tuple:
    """Like :func:`compute`, advancing ``bar`` by the rows of each block as it finishes.

    ``results`` are dask arrays with one chunk along every axis but the
    first, whose blocks finish independently (one per query block, say).
    The bar follows the blocks of the first array: as futures on a
    distributed client, by a scheduler callback on the local schedulers.
    Returns NumPy arrays.
    """
    blocks = [list(r.to_delayed().ravel()) for r in results]
    rows = results[0].chunks[0]
    from dmlkit.data import _client

    client = _client()  # None under a scheduler set in dask's config, say "sync"
    if client is not None:
        from distributed import as_completed

        futures = client.compute([b for group in blocks for b in group])
        firsts = {f.key: n for f, n in zip(futures, rows)}
        for f in as_completed(futures):
            bar.update(firsts.get(f.key, 0))
        values = client.gather(futures)
        out, i = [], 0
        for group in blocks:
            out.append(np.concatenate(values[i : i + len(group)], axis=0))
            i += len(group)
        return tuple(out)
    from dask.callbacks import Callback

    keys = {b.key: n for b, n in zip(blocks[0], rows)}

    class _Advance(Callback):
        def _posttask(self, key, result, dsk, state, worker_id):
            if key in keys:
                bar.update(keys[key])

    with _Advance():
        return compute(*results)
