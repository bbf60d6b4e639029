"""Scratch buffers reused across kernel calls, one set per thread.

A kernel runs on many blocks per pass, and on every pass. Temporaries of a
few hundred KiB allocated afresh on each call are costly where large
allocations are memory-mapped each time: Dask's nanny starts workers with
``MALLOC_TRIM_THRESHOLD_`` set, which keeps glibc from raising its mmap
threshold, so each such buffer is mapped, faulted in page by page and
unmapped again. A kernel takes its temporaries from here instead; they stay
the thread's until it asks for a larger one under the same name.
"""
from __future__ import annotations

import threading

import numpy as np

_local = threading.local()


def scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array of ``shape`` and ``dtype``, this thread's buffer
    ``name`` (grown when too small). Valid until the thread's next request for ``name``:
    only for temporaries a kernel does not return."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
    buf = pool.get(name)
    if buf is None or buf.size < nbytes:
        buf = pool[name] = np.empty(max(nbytes, 64), dtype=np.uint8)
    return buf[:nbytes].view(dtype).reshape(shape)
