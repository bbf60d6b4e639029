"""The Dask client: an existing scheduler by address or scheduler file, or a LocalCluster.

:func:`connect` is the one entry point. It resolves where the scheduler is
(argument, environment variable, scheduler file, or a new local cluster sized to
the machine), fails fast with a message that says what to check, and prints one
line saying where it connected and where the dashboard is.
"""
from __future__ import annotations

import asyncio
import difflib
import inspect
import json
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from distributed import Client

__all__ = ["SchedulerConnectionError", "connect"]

#: Environment variables holding a scheduler address, first match wins.
ADDRESS_ENV_VARS = ("DMLKIT_SCHEDULER", "DASK_SCHEDULER_ADDRESS")
#: Environment variables holding the path of a scheduler file, first match wins.
SCHEDULER_FILE_ENV_VARS = ("DMLKIT_SCHEDULER_FILE", "DASK_SCHEDULER_FILE")

_DEFAULT_DASHBOARD_PORT = 8787
_TCP_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


class SchedulerConnectionError(ConnectionError):
    """No Dask scheduler answered at the resolved address within the timeout."""


class LocalClusterClient(Client):
    """A Client that owns its LocalCluster: closing the client closes the cluster."""

    @property
    def dashboard_link(self) -> str | None:
        link = super().dashboard_link
        cluster = self.cluster
        # distributed builds an in-process (inproc://) cluster's link from the
        # machine's IP, where a dashboard bound to 127.0.0.1 is not listening.
        http = getattr(getattr(cluster, "scheduler", None), "http_server", None)
        if not link or http is None or not cluster.scheduler_address.startswith("inproc://"):
            return link
        host = getattr(http, "address", None)
        if host in (None, "", "0.0.0.0", "::"):
            return link
        from distributed.utils import format_dashboard_link

        return format_dashboard_link(f"[{host}]" if ":" in host else host, http.port)

    def close(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().close(*args, **kwargs)
        finally:
            cluster = self.cluster
            # At interpreter exit the cluster's own finalizer shuts it down.
            if cluster is not None and not self.asynchronous and not sys.is_finalizing():
                cluster.close()


def connect(
    address: str | None = None,
    *,
    scheduler_file: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
    security: Any = None,
    quiet: bool = False,
    **local_cluster_kwargs: Any,
) -> Client:
    """Connect to a Dask scheduler, or start a LocalCluster, and return its Client.

    Resolution order, first match wins:

    1. ``address``: a scheduler address such as ``"tcp://10.0.0.5:8786"``, or
       ``"local"`` to start a LocalCluster whatever the environment says;
    2. ``scheduler_file``: the JSON file a scheduler writes with
       ``--scheduler-file``;
    3. the environment variable ``DMLKIT_SCHEDULER``, then
       ``DASK_SCHEDULER_ADDRESS`` (an address, or ``"local"``);
    4. the environment variable ``DMLKIT_SCHEDULER_FILE``, then
       ``DASK_SCHEDULER_FILE`` (a scheduler file);
    5. a new :class:`distributed.LocalCluster` sized to this machine.

    Explicit arguments come before the environment; empty environment
    variables are ignored.

    Parameters
    ----------
    address : str, optional
        Scheduler address (``scheme://host:port``; ``host:port`` means tcp),
        or ``"local"``.
    scheduler_file : str or path-like, optional
        Path of a scheduler file. If it does not exist yet, it is waited for
        up to ``timeout`` seconds (a batch job may start the client before the
        scheduler has written it).
    timeout : float, default 10.0
        Seconds to wait for the scheduler to answer (and for a scheduler file
        to appear). Also the Client's connection timeout afterwards.
    security : distributed.Security, dict or bool, optional
        TLS settings, passed to :class:`distributed.Client`; for a new local
        cluster, passed to the LocalCluster (the Client inherits them).
    quiet : bool, default False
        If False, print one line saying where the client connected and the
        dashboard link.
    **local_cluster_kwargs
        Passed to :class:`distributed.LocalCluster` (and through it to the
        workers), overriding the defaults: ``n_workers`` and
        ``threads_per_worker`` from the CPU count (cgroup and affinity
        limits honoured; 2 cores give 2 workers x 1 thread),
        ``memory_limit`` = the machine's memory limit split evenly between
        workers, ``processes=True``, ``host="127.0.0.1"`` and a dashboard on
        127.0.0.1 (port 8787 when free, else a free port). Only valid when a
        LocalCluster is started.

    Returns
    -------
    distributed.Client
        The client, set as the default scheduler for dask. When connect
        started a LocalCluster, ``client.cluster`` is that cluster and
        ``client.close()`` also shuts it down; a remote scheduler is left
        running.

    Raises
    ------
    ValueError
        If the address is malformed, a scheduler file is not valid JSON with an
        ``"address"``, both ``address`` and ``scheduler_file`` are given, or
        ``timeout`` is not positive.
    FileNotFoundError
        If the scheduler file (argument or environment variable) does not
        appear within ``timeout`` seconds.
    SchedulerConnectionError
        A :class:`ConnectionError`: nothing answered as a Dask scheduler at
        the address within ``timeout`` seconds.
    TypeError
        If ``address`` is not a string, a keyword argument is not a
        LocalCluster, Worker or Nanny parameter, or LocalCluster keyword
        arguments are given together with an explicit address or scheduler
        file. (Given while the address comes
        from the environment, they are ignored with a UserWarning.)

    Notes
    -----
    With ``processes=True`` the workers are started with ``spawn``: a script
    must call :func:`connect` under ``if __name__ == "__main__":``.

    Examples
    --------
    >>> import dmlkit
    >>> client = dmlkit.connect()  # doctest: +SKIP
    dmlkit: connected to tcp://127.0.0.1:40915 (LocalCluster, 2 workers, 2 threads, 7.63 GiB), dashboard: http://127.0.0.1:8787/status
    >>> client.close()  # doctest: +SKIP

    >>> client = dmlkit.connect(processes=False, n_workers=1, quiet=True)  # doctest: +SKIP
    >>> client = dmlkit.connect("tcp://10.0.0.5:8786")  # doctest: +SKIP
    >>> client = dmlkit.connect(scheduler_file="~/scheduler.json")  # doctest: +SKIP

    From the shell, the same code reaches a shared cluster::

        DMLKIT_SCHEDULER=tcp://10.0.0.5:8786 python train.py
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout={timeout!r} should be a number of seconds > 0")
    if address is not None and not isinstance(address, str):
        raise TypeError(
            f"address={address!r} should be a string such as 'tcp://host:8786' or 'local', "
            f"got {type(address).__name__}"
        )
    if address is not None and scheduler_file is not None:
        raise ValueError(
            f"address={address!r} and scheduler_file={os.fspath(scheduler_file)!r} were both "
            "given; pass only one"
        )

    kind, target, source = _resolve(address, scheduler_file)

    if kind == "local":
        client = _start_local(timeout=timeout, security=security, kwargs=local_cluster_kwargs)
    else:
        if local_cluster_kwargs:
            message = (
                f"keyword arguments {sorted(local_cluster_kwargs)} configure a new LocalCluster, "
                f"but connect() is connecting to an existing scheduler ({source})"
            )
            if source in ("address", "scheduler_file"):
                raise TypeError(message + "; drop them, or pass address='local'")
            warnings.warn(
                message + f"; they are ignored (unset {source} to start a LocalCluster)",
                UserWarning,
                stacklevel=2,
            )
        if kind == "file":
            path = target
            target = _read_scheduler_file(path, source, timeout)
            source = f"scheduler file {path!r} given by {source}"
        client = _connect_remote(target, source=source, timeout=timeout, security=security)

    if not quiet:
        print(_describe(client), flush=True)
    return client


def _resolve(
    address: str | None, scheduler_file: str | os.PathLike[str] | None
) -> tuple[str, str, str]:
    """``(kind, target, source)``: kind is "local", "address" or "file"; source names the origin."""
    if address is not None:
        address = address.strip()
        return ("local" if address == "local" else "address"), address, "address"
    if scheduler_file is not None:
        return "file", os.path.expanduser(os.fspath(scheduler_file)), "scheduler_file"
    for name in ADDRESS_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return ("local" if value == "local" else "address"), value, name
    for name in SCHEDULER_FILE_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return "file", os.path.expanduser(value), name
    return "local", "local", "default"


def _validate_address(address: str, source: str) -> str:
    """Check the form of an address without connecting; returns it stripped."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    expected = "expected 'scheme://host:port' such as 'tcp://127.0.0.1:8786', or 'local'"
    where = "" if source == "address" else f" (from {source})"
    try:
        scheme, loc = parse_address(address, strict=False)
    except ValueError as exc:
        raise ValueError(f"malformed scheduler address {address!r}{where}: {exc}; {expected}") from None
    if scheme not in registry.backends:
        raise ValueError(
            f"malformed scheduler address {address!r}{where}: unknown scheme {scheme!r} "
            f"(known: {sorted(registry.backends)}); {expected}"
        )
    if scheme in _TCP_SCHEMES:
        try:
            host, port = parse_host_port(loc)
        except ValueError as exc:
            raise ValueError(
                f"malformed scheduler address {address!r}{where}: {exc}; {expected}"
            ) from None
        if not host or any(ch.isspace() or ch == "/" for ch in host) or not 0 < port < 65536:
            raise ValueError(
                f"malformed scheduler address {address!r}{where}: host={host!r}, port={port}; "
                f"{expected}"
            )
    return address


def _read_scheduler_file(path: str, source: str, timeout: float) -> str:
    """The address in a scheduler file, waiting up to ``timeout`` s for it to appear."""
    origin = "the scheduler_file argument" if source == "scheduler_file" else f"environment variable {source}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                info = json.load(f)
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise FileNotFoundError(
                    f"scheduler file {path!r} (from {origin}) does not exist after waiting "
                    f"{timeout:g} s; check the path, and that the scheduler was started with "
                    f"--scheduler-file {path}"
                ) from None
        except json.JSONDecodeError as exc:  # may be half written: retry until the deadline
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"scheduler file {path!r} (from {origin}) is not valid JSON: {exc}"
                ) from None
        time.sleep(0.05)
    if not isinstance(info, Mapping) or not isinstance(info.get("address"), str):
        raise ValueError(
            f"scheduler file {path!r} (from {origin}) has no 'address' entry; "
            "expected the JSON a Dask scheduler writes with --scheduler-file"
        )
    return info["address"]


def _connect_remote(address: str, *, source: str, timeout: float, security: Any) -> Client:
    """A Client on an existing scheduler, or SchedulerConnectionError within ~timeout s."""
    address = _validate_address(address, source)

    def failure(reason: BaseException | str) -> SchedulerConnectionError:
        where = "" if source == "address" else f" (from {source})"
        env = os.environ.get("DMLKIT_SCHEDULER")
        env = "DMLKIT_SCHEDULER (unset)" if env is None else f"DMLKIT_SCHEDULER={env!r}"
        return SchedulerConnectionError(
            f"could not connect to a Dask scheduler at {address!r}{where} within "
            f"timeout={timeout:g} s: {reason}. Check that the scheduler is running and "
            f"reachable from this machine at that host and port (firewall, VPN, TLS "
            f"settings), and that {env}, DASK_SCHEDULER_ADDRESS or the scheduler file point "
            f"to it; unset them or pass address='local' to start a LocalCluster instead."
        )

    # distributed bounds the TCP connect by `timeout` but not the handshake read
    # that follows: a server that accepts and never answers (a wrong port, a
    # proxy) would hang Client() forever. Probe with a hard deadline first.
    connection_args = _probe_connection_args(security)
    if connection_args is not None:
        try:
            _run_with_deadline(lambda: _handshake(address, timeout, connection_args), timeout + 2)
        except Exception as exc:
            raise failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc

    try:
        return Client(address, timeout=timeout, security=security)
    except OSError as exc:  # includes TimeoutError and ConnectionError
        raise failure(exc) from exc


def _probe_connection_args(security: Any) -> dict[str, Any] | None:
    """Connection arguments for the probe, or None where only Client can build them."""
    import dask
    from distributed.security import Security

    if isinstance(security, Security):
        return security.get_connection_args("client")
    if isinstance(security, Mapping):
        return Security(**security).get_connection_args("client")
    if security is None and not dask.config.get("distributed.client.security-loader", None):
        return Security().get_connection_args("client")
    return None


async def _handshake(address: str, timeout: float, connection_args: dict[str, Any]) -> None:
    """Connect and exchange the Dask handshake, all within ``timeout`` seconds."""
    from distributed.comm import connect as comm_connect

    async def attempt() -> None:
        comm = await comm_connect(address, timeout=timeout, **connection_args)
        comm.abort()

    try:
        await asyncio.wait_for(attempt(), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"no Dask handshake within {timeout:g} s") from None


def _run_with_deadline(make_coro: Any, deadline: float) -> Any:
    """Run a coroutine on a fresh event loop in a daemon thread (works under Jupyter too)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = asyncio.run(make_coro())
        except BaseException as exc:  # re-raised in the calling thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="dmlkit-connect-probe", daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        raise TimeoutError(f"no answer within {deadline:g} s")
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def _local_cluster_parameters(worker_class: Any) -> set[str]:
    """Keyword arguments LocalCluster accepts, directly or passed on to its workers."""
    from distributed import LocalCluster, Nanny, Worker
    from distributed.core import Server

    names: set[str] = set()
    classes = [LocalCluster, Nanny, Worker, Server]
    if isinstance(worker_class, type):
        classes.append(worker_class)
    for cls in classes:
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and name != "self":
                names.add(name)
    return names


def _local_cluster_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults for a LocalCluster on this machine; ``kwargs`` are the user's overrides."""
    from dask.system import CPU_COUNT
    from distributed.deploy.utils import nprocesses_nthreads
    from distributed.system import MEMORY_LIMIT

    processes = kwargs.get("processes", True)
    n_workers = kwargs.get("n_workers")
    threads = kwargs.get("threads_per_worker")
    if n_workers is None and threads is None:
        # In one process, several workers only compete for the GIL and the memory.
        n_workers, threads = nprocesses_nthreads(CPU_COUNT) if processes else (1, CPU_COUNT)
    elif n_workers is None:
        n_workers = max(1, CPU_COUNT // max(int(threads), 1))
    elif threads is None:
        threads = max(1, CPU_COUNT // max(int(n_workers), 1))

    defaults: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": processes,
        "memory_limit": int(MEMORY_LIMIT // max(int(n_workers), 1)),
        "dashboard_address": _dashboard_address(),
    }
    # In one process LocalCluster talks over inproc:// unless told otherwise, and
    # then a host would be wrong; where it uses tcp it defaults to 127.0.0.1 too.
    if processes and not any(key in kwargs for key in ("host", "ip", "interface", "protocol")):
        defaults["host"] = "127.0.0.1"
    return defaults


def _dashboard_address() -> str:
    """127.0.0.1:8787 when that port is free, else any free port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", _DEFAULT_DASHBOARD_PORT))
        except OSError:
            return "127.0.0.1:0"
    # Still racy; distributed then falls back to a free port with a UserWarning.
    return f"127.0.0.1:{_DEFAULT_DASHBOARD_PORT}"


def _start_local(*, timeout: float, security: Any, kwargs: Mapping[str, Any]) -> Client:
    """A LocalCluster with machine-sized defaults, and a Client that owns it."""
    from distributed import LocalCluster

    accepted = _local_cluster_parameters(kwargs.get("worker_class"))
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hints = [
            f"{name!r} (did you mean {match[0]!r}?)" if (match := difflib.get_close_matches(name, accepted, 1))
            else repr(name)
            for name in unknown
        ]
        raise TypeError(
            f"connect() got unexpected keyword argument(s) {', '.join(hints)}: keyword arguments "
            "are passed to distributed.LocalCluster and its workers (e.g. n_workers, "
            "threads_per_worker, memory_limit, processes)"
        )

    cluster_kwargs = {**_local_cluster_defaults(kwargs), **kwargs}
    if security is not None:
        cluster_kwargs["security"] = security
    cluster = LocalCluster(**cluster_kwargs)
    try:
        # No security here: the Client inherits the cluster's (security=True
        # would otherwise make a second, different temporary certificate).
        client = LocalClusterClient(cluster, timeout=timeout)
    except BaseException:
        cluster.close()
        raise
    try:
        client.wait_for_workers(cluster_kwargs["n_workers"], timeout=timeout)
    except BaseException:
        client.close()
        raise
    return client


def _describe(client: Client) -> str:
    """One line: scheduler address, kind, workers, threads, memory and dashboard link."""
    from dask.utils import format_bytes

    info = client.scheduler_info()
    workers = info.get("workers", {})
    n_workers = info.get("n_workers", len(workers))
    threads = info.get("total_threads", sum(w.get("nthreads", 0) for w in workers.values()))
    memory = info.get("total_memory", sum(w.get("memory_limit", 0) or 0 for w in workers.values()))
    kind = f"{type(client.cluster).__name__}, " if client.cluster is not None else ""
    address = info.get("address") or client.scheduler.address
    return (
        f"dmlkit: connected to {address} ({kind}{n_workers} worker{'s' * (n_workers != 1)}, "
        f"{threads} thread{'s' * (threads != 1)}, {format_bytes(memory)}), "
        f"dashboard: {client.dashboard_link}"
    )
