"""The one place that turns per-chunk kernels into Dask graphs.

A :class:`RowBlocks` holds the aligned row blocks of ``X`` (and optionally its
sample weights) of one fit. :meth:`RowBlocks.reduce` maps a kernel over
every block with parameters shipped once (one literal key in the graph, sent
to each worker once) and combines the partial results by a tree of fan-in
``split_every``. The tree's shape and the order inside every combine are fixed
by the block order, so the floating point result does not depend on the
scheduler, the number of workers or which worker ran what.

Kernels have the signature ``kernel(X, w, offset, **params)`` (``X`` a NumPy
block, ``w`` its weights or None, ``offset`` the global index of its first row)
and combines ``combine(a, b)``; both are plain NumPy functions from
``dmlkit._kernels``.
"""
from __future__ import annotations

from functools import reduce as _fold
from typing import Any, Callable, Sequence

import dask
import dask.array as da
import numpy as np

from dmlkit._kernels.stats import combine_stats, data_stats

DEFAULT_SPLIT_EVERY = 8


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


def _call(kernel: Callable, X, w, offset: int, params: dict, y=None) -> Any:
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


def _map_block(x, *rest, kernel, offsets, has_w, block_id=None):
    """Blockwise body: ``kernel(X_block, w_block, offset, [y=y_block,] **params)``."""
    params, columns = rest[-1], list(rest[:-1])
    w = columns.pop(0)[:, 0] if has_w else None
    y = columns.pop(0)[:, 0] if columns else None
    return _call(kernel, x, w, int(offsets[block_id[0]]), params, y)


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
        self._args = [X] + [v[:, None] for v in (sample_weight, y) if v is not None]

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
        """The per-block partial results, one ``Delayed`` per row block, in row order."""
        shipped = dask.delayed(params if params is not None else {}, traverse=False, pure=True)
        token = dask.base.tokenize(kernel, shipped.key, *self._args)
        parts = da.map_blocks(
            _map_block, *self._args, shipped, kernel=kernel, offsets=self.offsets,
            has_w=self.sample_weight is not None,
            name=f"{name}-map-{token}", dtype=object, chunks=((1,) * self.n_blocks, (1,)),
            meta=np.empty((0, 0), dtype=object),
        )
        return list(parts.to_delayed(optimize_graph=True).ravel()), token

    def reduce(
        self,
        kernel: Callable,
        combine: Callable,
        params: dict | Sequence[dict] | None = None,
        split_every: int | None = None,
        name: str = "partial",
    ):
        """Map ``kernel`` over the blocks and tree-reduce with ``combine``.

        Returns a ``dask.delayed.Delayed`` of the combined record; nothing is
        computed. ``params`` enters the graph once, as one literal key.
        """
        fan_in = check_split_every(split_every)
        parts, token = self.partials(kernel, params, name)
        # the tree's keys depend on everything that shapes it
        token = dask.base.tokenize(token, combine, fan_in)
        level = 0
        fold = dask.delayed(_fold_all, pure=True)
        while len(parts) > 1:
            parts = [
                group[0] if len(group) == 1 else
                fold(combine, *group, dask_key_name=(f"{name}-combine-{token}", level, i))
                for i, group in enumerate(parts[j : j + fan_in] for j in range(0, len(parts), fan_in))
            ]
            level += 1
        return parts[0]


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
    """The one synchronisation point: compute delayed results together."""
    return dask.compute(*results)
