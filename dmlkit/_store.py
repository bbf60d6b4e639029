"""Direct reads of uncompressed Zarr chunks from a local store.

A Zarr v3 array on a local file system whose only codec is ``bytes`` in the
machine's byte order stores each chunk as a file of raw C-ordered rows. When
its chunks span every column, any range of rows is a few contiguous byte
ranges of a few files: a pass over the data can read them with one
``preadv`` per file into a buffer it reuses, instead of going through the
codec pipeline and a fresh array for every chunk (``python -m benchmarks
kmeans`` reports a pass that only reads the store both ways).

:func:`source_of` decides from the metadata whether an array qualifies
(anything else, compressed, sharded, remote, byte-swapped, keeps the usual
path through zarr); :func:`with_rows` runs a function on a range of rows
read into this thread's buffer.
"""
from __future__ import annotations

import os
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

#: Largest buffer a worker thread keeps between reads; a larger block gets a buffer of
#: its own, freed after use.
KEEP_BUFFER_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ZarrSource:
    """Where the rows of an uncompressed, row-chunked Zarr v3 array lie on disk.

    Small and picklable: it travels inside every task that reads through it.
    """

    root: str  #: absolute path of the array's folder
    shape: tuple
    dtype: str
    chunk_rows: int
    prefix: str  #: chunk ``i``'s file is ``prefix + str(i) + suffix`` under ``root``
    suffix: str
    fill_value: Any

    @property
    def row_bytes(self) -> int:
        return np.dtype(self.dtype).itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    def chunk_file(self, i: int) -> str:
        return os.path.join(self.root, f"{self.prefix}{i}{self.suffix}")

    def read_into(self, start: int, out: np.ndarray) -> None:
        """Rows ``start .. start + len(out)`` into ``out`` (C-contiguous, this dtype)."""
        stop = start + out.shape[0]
        if not (0 <= start <= stop <= self.shape[0]):
            raise IndexError(f"rows {start}..{stop} are outside the array's {self.shape[0]} rows")
        flat = memoryview(out.reshape(-1).view(np.uint8))
        row_bytes, at = self.row_bytes, 0
        while start < stop:
            i, first = divmod(start, self.chunk_rows)
            rows = min(stop - start, self.chunk_rows - first)
            size = rows * row_bytes
            try:
                fd = os.open(self.chunk_file(i), os.O_RDONLY | getattr(os, "O_BINARY", 0))
            except FileNotFoundError:  # a chunk never written holds the fill value...
                if not os.path.exists(os.path.join(self.root, "zarr.json")):
                    # ...but not when the array itself is missing (a worker that does not
                    # see the store, or sees it under another path): never made-up zeros
                    raise FileNotFoundError(
                        f"{self.root}: no Zarr array here; every worker must see the store "
                        "under the path the client opened") from None
                out[at // row_bytes : at // row_bytes + rows] = self.fill_value
            else:
                try:
                    got = 0
                    while got < size:
                        n = os.preadv(fd, [flat[at + got : at + size]], first * row_bytes + got)
                        if n == 0:
                            raise OSError(f"{self.chunk_file(i)}: chunk file is shorter than "
                                          f"its {self.chunk_rows} rows of {row_bytes} bytes")
                        got += n
                finally:
                    os.close(fd)
            at += size
            start += rows


def source_of(array: Any) -> ZarrSource | None:
    """A :class:`ZarrSource` for a ``zarr.Array`` whose chunks can be read directly, else None.

    It qualifies when it is Zarr v3 in a ``LocalStore``, 1-D or 2-D with chunks
    spanning all columns, numeric, with no compressor, filter or sharding and
    the ``bytes`` codec in this machine's byte order, and its chunk keys use
    the default encoding. The check reads metadata only.
    """
    if not hasattr(os, "preadv"):  # not on every platform (Windows)
        return None
    try:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        meta = array.metadata
        if (meta.zarr_format != 3 or not isinstance(array.store, LocalStore)
                or array.ndim not in (1, 2) or tuple(array.chunks[1:]) != tuple(array.shape[1:])
                or array.shards is not None or array.compressors or array.filters):
            return None
        serializer = array.serializer
        if not isinstance(serializer, BytesCodec):
            return None
        dtype = np.dtype(array.dtype)
        if dtype.kind not in "fiub":
            return None
        if dtype.itemsize > 1 and (serializer.endian is None
                                   or serializer.endian.value != sys.byteorder):
            return None
        encoding = meta.chunk_key_encoding
        if type(encoding).__name__ != "DefaultChunkKeyEncoding":
            return None
        sep = encoding.separator
        prefix, suffix = f"c{sep}", f"{sep}0" * (array.ndim - 1)
        n_chunks = -(-array.shape[0] // array.chunks[0])
        for i in {0, max(n_chunks - 1, 0)}:  # the key rule, checked against zarr's own
            if meta.encode_chunk_key((i,) + (0,) * (array.ndim - 1)) != f"{prefix}{i}{suffix}":
                return None
        root = os.path.abspath(os.path.join(str(array.store.root), array.path))
        fill = array.fill_value
        return ZarrSource(root, tuple(int(s) for s in array.shape), dtype.str,
                          int(array.chunks[0]), prefix, suffix,
                          0 if fill is None else dtype.type(fill).item())
    except Exception:  # any metadata this reader does not know: the path through zarr
        return None


def read_block(source: ZarrSource, block_info: dict | None = None,
               convert: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """A new array of the rows of one block of a ``dask.array.map_blocks`` over ``source``'s
    rows (``block_info`` gives them), for a copy that is kept (a cache). With ``convert``,
    the rows are read into this thread's buffer and ``convert(rows)`` (a new array, a
    copy in another layout, say) is returned."""
    (start, stop), *_ = block_info[None]["array-location"]
    if convert is not None:
        return with_rows(source, start, stop, convert)
    out = np.empty((stop - start,) + tuple(source.shape[1:]), dtype=source.dtype)
    source.read_into(start, out)
    return out


_local = threading.local()


def _buffer(nbytes: int) -> np.ndarray:
    buf = getattr(_local, "buffer", None)
    if buf is None or buf.nbytes < nbytes:
        _local.buffer = None  # let the old one go before the new one is allocated
        buf = np.empty(nbytes, dtype=np.uint8)
        if nbytes <= KEEP_BUFFER_BYTES:
            _local.buffer = buf
    return buf


def with_rows(source: ZarrSource, start: int, stop: int, func: Callable[[np.ndarray], Any]) -> Any:
    """``func(rows)`` with rows ``start .. stop`` of ``source`` read into this thread's buffer.

    The buffer is reused by the next read on the same thread unless ``func``'s
    result (or anything else) still holds a view of it: then it is left to
    its holder and the next read allocates a new one.
    """
    shape = (stop - start,) + tuple(source.shape[1:])
    nbytes = (stop - start) * source.row_bytes
    buf = _buffer(nbytes)
    baseline = sys.getrefcount(buf)
    rows = buf[:nbytes].view(source.dtype).reshape(shape)
    try:
        source.read_into(start, rows)
        result = func(rows)
    except BaseException:
        _local.buffer = None
        raise
    del rows
    if sys.getrefcount(buf) > baseline:  # a view of it lives on: not ours to reuse
        _local.buffer = None
    return result
