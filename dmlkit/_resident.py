"""Resident passes: the kernels of a pass run next to the blocks, without a task graph.

When the blocks of a fit are held in the workers' memory (a copy cached by
:func:`dmlkit.data.persist_placed`), or streamed from an uncompressed local
Zarr store whose chunk files the workers read themselves (:mod:`dmlkit._store`),
every pass maps the same kind of kernel over the same blocks; only the
parameters change. Going through the
scheduler costs each pass a graph (built, tokenised, sent), the scheduler's
work, and the batching delays of its messages: 10-30 ms on a small machine,
as much as the kernels themselves take on a few million rows.

A :class:`BlockHolder` is a Dask actor created on each worker that holds
blocks, with those blocks as its arguments (so it references the very arrays
the worker holds, no copy; a block's weights or ``y`` kept elsewhere are
copied to it). For a streamed ``X`` it holds the rows it reads instead (the
worker threads of :func:`dmlkit._graph._stream_slots`: those holding the
cached weights and ``y``, else even runs of blocks) and reads them from the
store's files at every pass, into its threads' reused buffers. A pass sends it the kernel, the parameters and the
combine directly; it maps the kernel over each group of blocks (one group per
worker thread, in parallel) and folds the subtrees of the reduction tree each
group holds (:func:`dmlkit._graph.fold_held`). The caller folds the rest, as
for the tasks of :meth:`dmlkit._graph.RowBlocks.reduce`: the same operations
in the same order, hence the same bits.

Where a worker listens on a loopback address (a local cluster), each pass
goes to its actor over a line of its own (:class:`_Line`): a socket the actor
opens for this client, with a random token, on which its thread waits for the
pass and answers, without the worker's event loop: one hop each way, where a
call through Dask's actor machinery takes several threads and event loops. Any trouble on
a line (a closed socket, an error) closes the lines, and that pass and the
later ones are sent through the actors as before;
``dask.config.set({"dmlkit.resident-line": False})`` never opens them.

If a call fails (a worker lost, say), :class:`Resident` lets its actors go
(and logs why, at INFO level, on the ``dmlkit._resident`` logger) and the
pass, and every later pass of the fit, runs as tasks, which recompute lost
blocks from their source or raise the kernel's error. The actors live as
long as the fit's blocks. Resident passes do not show in the
dashboard's task stream; ``dask.config.set({"dmlkit.resident-passes":
False})`` turns them off.
"""
from __future__ import annotations

import hmac
import ipaddress
import logging
import pickle
import secrets
import socket
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import cloudpickle
import dask
import numpy as np

logger = logging.getLogger(__name__)

#: dask config key: run passes over cached blocks through resident actors (default True).
CONFIG_KEY = "dmlkit.resident-passes"
#: dask config key: send resident passes over each actor's own line, where workers listen
#: on a loopback address (default True).
LINE_CONFIG_KEY = "dmlkit.resident-line"
#: Seconds a pass waits for the actors to start (once).
CREATE_TIMEOUT_S = 10.0
#: Seconds an actor's line waits for its client to connect and authenticate, and the
#: client for the line to answer its token.
LINE_CONNECT_TIMEOUT_S = 5.0


def enabled() -> bool:
    """Whether resident passes are on (``dmlkit.resident-passes`` in dask's config)."""
    return bool(dask.config.get(CONFIG_KEY, True))


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(struct.pack("!Q", len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError("the line was closed")
        got += k
    return bytes(buf)


def _recv(sock: socket.socket) -> bytes:
    (n,) = struct.unpack("!Q", _recv_exact(sock, 8))
    return _recv_exact(sock, n)


def loopback(address: str) -> bool:
    """Whether a Dask address (``tcp://host:port``) is a plain TCP one on a loopback host."""
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class _Line:
    """The worker's end of an actor's line: a socket on 127.0.0.1 that one client (holding
    ``token``) connects to; a thread then serves its passes until the client closes it.

    The thread refers to the actor weakly, and only for the time of a pass, so the actor
    (and the blocks it references) goes when Dask releases it; the thread ends when the
    client closes the line, or after :data:`LINE_CONNECT_TIMEOUT_S` without a client.
    """

    def __init__(self, holder: "BlockHolder"):
        self.token = secrets.token_bytes(32)
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(1)
        self.server.settimeout(LINE_CONNECT_TIMEOUT_S)
        self.address = self.server.getsockname()
        threading.Thread(target=_Line._serve, args=(self.server, self.token, weakref.ref(holder)),
                         name="dmlkit-resident-line", daemon=True).start()

    @staticmethod
    def _serve(server: socket.socket, token: bytes, holder_ref) -> None:
        try:
            conn, _ = server.accept()
        except OSError:  # no client in time
            return
        finally:
            server.close()
        with conn:
            try:
                conn.settimeout(LINE_CONNECT_TIMEOUT_S)
                if not hmac.compare_digest(_recv(conn), token):
                    return
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _send(conn, b"ok")
                while True:
                    jobs = pickle.loads(_recv(conn))
                    holder = holder_ref()
                    if holder is None:
                        return
                    try:
                        answer = ("ok", holder.run(jobs))
                    except Exception as exc:  # the client sends the pass to the actor instead
                        answer = ("error", repr(exc))
                    del holder
                    _send(conn, pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
            except (OSError, EOFError):  # the client closed the line, or went away
                return


class BlockHolder:
    """A worker's blocks and the passes over them (runs on the worker, as a Dask actor).

    Parameters
    ----------
    groups : list of list of int
        The blocks of each worker thread on this worker, in block order.
    offsets : dict
        Global index of the first row of each block.
    n_blocks : int
        Blocks in the whole reduction tree.
    xs, ws, ys : dict
        Each block's ``X``, weights and targets (``ws``/``ys`` None when absent).
    """

    def __init__(self, groups: list, offsets: dict, n_blocks: int, xs: dict | None,
                 ws: dict | None, ys: dict | None, source: Any = None, stops: dict | None = None):
        from dmlkit._graph import aligned

        self.groups = groups
        self.offsets = offsets
        self.n_blocks = n_blocks
        self.xs, self.ws, self.ys = ({b: aligned(v) for b, v in d.items()} if d is not None
                                     else None for d in (xs, ws, ys))
        self.source, self.stops = source, stops
        self.pool = ThreadPoolExecutor(len(groups)) if len(groups) > 1 else None

    def line(self) -> tuple:
        """Open a line for one client (:class:`_Line`): ``(host, port, token)``."""
        line = _Line(self)
        return (*line.address, line.token)

    def _group(self, members: list, kernel: Callable, params: dict, combine: Callable,
               fan_in: int) -> dict:
        from dmlkit._graph import _map_group

        pick = (lambda d: None if d is None else [d[b] for b in members])
        return _map_group(kernel, params, members, [self.offsets[b] for b in members],
                          pick(self.xs), pick(self.ws), pick(self.ys), combine=combine,
                          fan_in=fan_in, n_blocks=self.n_blocks, source=self.source,
                          stops=None if self.stops is None else pick(self.stops))

    def run(self, jobs: Sequence[tuple]) -> list[list[dict]]:
        """For each job ``(kernel, params, combine, fan_in)``, each group's held subtrees."""
        out = []
        for job in jobs:
            if self.pool is None:
                out.append([self._group(g, *job) for g in self.groups])
            else:
                out.append(list(self.pool.map(lambda g: self._group(g, *job), self.groups)))
        return out


class Resident:
    """The :class:`BlockHolder` actors of one :class:`~dmlkit._graph.RowBlocks`, client side.

    Created with the blocks' futures (``futures[j][i]``: array ``j`` = X,
    weights, y; block ``i``). The actors are created at the first pass, on
    the workers that hold X's blocks (asked of the scheduler then, unless the
    cache found them already held and says where: ``slots``), each worker's
    blocks shared out in order among its threads; that pass waits for the
    actors to start, once the weights and ``y`` have joined X (a task's time,
    at most :data:`CREATE_TIMEOUT_S`; a pass that times out while they are
    still being computed runs as tasks, and the next one waits again).
    While the cache is still computing X's blocks (reading them, or copying a
    caller's blocks feature-major), the actors are created where it placed
    them (``planned``) and start as soon as their blocks are done; the first
    pass waits for the blocks as a pass of tasks would, then runs on the
    actors. Without a placement, passes run as tasks while X loads (the
    first of them loads it). After any failure :meth:`run` returns None for
    good and the caller runs tasks.
    """

    def __init__(self, futures: Sequence, offsets: Sequence[int], client,
                 slots: Sequence | None = None, source: Any = None,
                 stops: Sequence[int] | None = None, planned: Sequence | None = None):
        self.client = client
        self.futures = futures  # futures[0] is None when X is read from ``source``
        self.slots = slots  # the worker thread of each block, when known to hold (or read) it
        self.planned = planned  # where the cache places each block it is still computing
        self.offsets = [int(o) for o in offsets]
        self.source = source
        self.stops = None if stops is None else [int(s) for s in stops]
        self.actors: dict | None = None  # worker address -> actor future, once created
        self.handles: dict | None = None
        self.lines: dict | None = None  # worker address -> socket, in the order of handles
        self.closed = False

    def _create(self, loading: bool = False) -> None:
        """Submit one actor per worker holding blocks, next to them (next to where the
        cache is computing them, while X is ``loading``)."""
        X = self.futures[0]
        n_blocks = len(self.offsets)
        workers = self.client.scheduler_info(n_workers=-1)["workers"]
        if self.slots is not None:  # the holders the scheduler named when X was cached
            where = [addr for addr, _ in self.slots]
        elif loading:  # where the cache is computing the blocks (the scheduler's choice
            # prevails: a block that ends up elsewhere is copied to its actor)
            where = [addr for addr, _ in self.planned]
        else:
            holders = self.client.who_has(X)
            where = [sorted(holders.get(f.key) or ["?"])[0] for f in X]
        if any(addr not in workers for addr in where):  # tasks will recompute the block
            self.close(f"blocks without a live holder: {sorted(set(where) - set(workers))}")
            return
        nthreads = {addr: max(1, info.get("nthreads", 1)) for addr, info in workers.items()}
        mine: dict[str, list] = {}
        for b, addr in enumerate(where):
            mine.setdefault(addr, []).append(b)
        self.actors = {}
        for addr, blocks in mine.items():
            t = min(nthreads[addr], len(blocks))
            groups = [blocks[i * len(blocks) // t : (i + 1) * len(blocks) // t] for i in range(t)]
            xs, ws, ys = (None if f is None else {b: f[b] for b in blocks} for f in self.futures)
            stops = None if self.stops is None else {b: self.stops[b] for b in blocks}
            self.actors[addr] = self.client.submit(
                BlockHolder, groups, {b: self.offsets[b] for b in blocks}, n_blocks, xs, ws, ys,
                self.source, stops, workers=[addr], allow_other_workers=False, actor=True,
                pure=False)

    def ready(self) -> bool:
        """True once every actor exists; False (for good) after a failure."""
        if self.handles is not None:
            return True
        if self.closed:
            return False
        from distributed import wait

        if self.actors is None:
            X = self.futures[0]
            loading = X is not None and not all(f.status == "finished" for f in X)
            if loading and self.planned is None:
                return False  # X still loading: this pass runs as tasks (and loads it)
            # the actors start once the weights and y have joined X's blocks (a task would
            # wait for them too); while the cache is still computing X's blocks where it
            # placed them, they start next to them as soon as they are done, and this pass
            # waits for the blocks as a pass of tasks would
            self._create(loading)
            if self.closed:
                return False
            if loading:
                wait(X)

        try:
            wait(list(self.actors.values()), timeout=CREATE_TIMEOUT_S)
        except Exception:  # timed out
            rest = [f for v in self.futures[1:] if v is not None for f in v]
            if any(f.status == "pending" for f in rest):
                return False  # y or the weights still on their way: the next pass asks again
            self.close("the actors did not start in time")  # passes run as tasks
            return False
        status = [f.status for f in self.actors.values()]
        if any(s != "finished" for s in status):
            self.close(f"actor status {status}")
            return False
        try:
            self.handles = {addr: f.result() for addr, f in self.actors.items()}
        except Exception as exc:
            self.close(exc)
            return False
        self._open_lines()
        return True

    def _open_lines(self) -> None:
        """Connect to each actor's own line (:class:`_Line`) where every worker listens on a
        loopback address; else, or on any trouble, passes go through the actors."""
        if not dask.config.get(LINE_CONFIG_KEY, True) or not all(map(loopback, self.handles)):
            return
        lines = {}
        try:
            ends = {addr: h.line() for addr, h in self.handles.items()}
            for addr, end in ends.items():
                host, port, token = end.result()
                sock = lines[addr] = socket.create_connection(
                    (host, port), timeout=LINE_CONNECT_TIMEOUT_S)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _send(sock, token)
                if _recv(sock) != b"ok":
                    raise ConnectionError(f"the line to {addr} refused its token")
                sock.settimeout(None)
        except Exception as exc:
            _close_all(lines)
            logger.info("resident passes through the actors, no lines: %r", exc)
            return
        self.lines = lines
        weakref.finalize(self, _close_all, lines)

    def _drop_lines(self, why: Any) -> None:
        if self.lines is not None:
            if why is not None:
                logger.info("resident lines closed, passes through the actors: %s", why)
            _close_all(self.lines)
            self.lines = None

    def _run_lines(self, jobs: list) -> list | None:
        """Each actor's answer over its line, or None (the lines closed) on any trouble."""
        try:
            payload = cloudpickle.dumps(jobs, protocol=pickle.HIGHEST_PROTOCOL)
            for sock in self.lines.values():
                _send(sock, payload)
            answers = [pickle.loads(_recv(sock)) for sock in self.lines.values()]
        except Exception as exc:  # a worker gone, say: the actors' own calls tell
            self._drop_lines(repr(exc))
            return None
        failed = [a[1] for a in answers if a[0] != "ok"]
        if failed:  # a kernel's error: the actors' calls raise it as before
            self._drop_lines(failed[0])
            return None
        return [a[1] for a in answers]

    def close(self, why: Any = None) -> None:
        """Let the actors go; later passes run as tasks."""
        if why is not None and not self.closed:
            logger.info("resident passes off, passes run as tasks: %s", why)
        self._drop_lines(None)
        self.actors, self.handles, self.closed = None, None, True

    def run(self, jobs: Sequence[tuple]) -> list[list[dict]] | None:
        """Per job, every group's held subtrees; None when the actors cannot serve it."""
        if not self.ready():
            return None
        answers = self._run_lines(list(jobs)) if self.lines is not None else None
        try:
            if answers is None:
                calls = [actor.run(list(jobs)) for actor in self.handles.values()]
                answers = [c.result() for c in calls]
        except Exception as exc:  # a worker lost, an actor gone, a kernel's error: tasks decide
            self.close(exc)
            return None
        return [[part for answer in answers for part in answer[j]] for j in range(len(jobs))]


def _close_all(lines: dict) -> None:
    for sock in lines.values():
        try:
            sock.close()
        except OSError:
            pass
    lines.clear()


def create(blocks: Any) -> Resident | None:
    """The :class:`Resident` of a :class:`~dmlkit._graph.RowBlocks`, or None when its blocks
    are not all held by a distributed cluster (or resident passes are off)."""
    if not enabled() or blocks.slots is None:
        return None
    from distributed import futures_of

    read = blocks.source is not None  # X streamed: the actors read their blocks themselves
    futures = []
    for v in (blocks.X, blocks.sample_weight, blocks.y):
        if v is None or (read and v is blocks.X):
            futures.append(None)
            continue
        held = {f.key: f for f in futures_of(v)}
        keys = [(v.name, i) + (0,) * (v.ndim - 1) for i in range(blocks.n_blocks)]
        if not all(k in held for k in keys):
            return None  # derived from held data, not held itself
        futures.append([held[k] for k in keys])
    if read:
        from dmlkit.data import _client

        client = _client()
        if client is None:
            return None
        stops = blocks.offsets + np.asarray(blocks.row_chunks)
        return Resident(futures, blocks.offsets, client, blocks.slots, blocks.source, stops)
    held = blocks.slots if getattr(blocks.X, "_dmlkit_held", False) else None
    return Resident(futures, blocks.offsets, futures[0][0].client, held,
                    planned=None if held is not None else blocks.slots)
