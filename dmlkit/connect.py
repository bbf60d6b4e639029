"""The Dask client: an existing scheduler, a batch-system cluster, or a LocalCluster.

:func:`connect` is the one entry point. It resolves where the scheduler is
(argument, environment variable, scheduler file, a dask-jobqueue cluster on
SLURM / PBS / SGE, or a new local cluster sized to the machine), fails fast with
a message that says what to check, and prints one line saying where it
connected and where the dashboard is.
"""
from __future__ import annotations

import asyncio
import difflib
import inspect
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

from distributed import Client

__all__ = ["ClusterStartError", "SchedulerConnectionError", "SchedulerVersionError", "connect"]

#: Environment variables holding a scheduler address, first match wins.
ADDRESS_ENV_VARS = ("DMLKIT_SCHEDULER", "DASK_SCHEDULER_ADDRESS")
#: Environment variables holding the path of a scheduler file, first match wins.
SCHEDULER_FILE_ENV_VARS = ("DMLKIT_SCHEDULER_FILE", "DASK_SCHEDULER_FILE")
#: Environment variable naming a batch system ("slurm", "pbs", "sge") or "local".
CLUSTER_ENV_VAR = "DMLKIT_CLUSTER"
#: Environment variable with the number of batch jobs when ``jobs`` is not given.
JOBS_ENV_VAR = "DMLKIT_JOBS"
#: Batch systems reachable through ``cluster=``: the dask-jobqueue class of each.
BATCH_SYSTEMS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}
#: Packages whose versions must agree between client, scheduler and workers
#: (python: major.minor); dmlkit must agree between client and workers.
CHECKED_PACKAGES = ("python", "dask", "distributed")

_DEFAULT_DASHBOARD_PORT = 8787
_TCP_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")


class SchedulerConnectionError(ConnectionError):
    """No Dask scheduler answered at the resolved address within the timeout."""


class SchedulerVersionError(SchedulerConnectionError):
    """The scheduler or workers run other versions of python, dask, distributed or dmlkit."""


class ClusterStartError(RuntimeError):
    """A batch-system cluster could not submit its jobs, or their workers did not connect."""


class ClusterClient(Client):
    """A Client that owns its cluster (LocalCluster or dask-jobqueue): closing it closes both."""

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
    cluster: str | None = None,
    jobs: int | None = None,
    cores: int | None = None,
    memory: str | int | None = None,
    timeout: float = 10.0,
    worker_timeout: float = 300.0,
    security: Any = None,
    check_versions: bool = True,
    quiet: bool = False,
    **cluster_kwargs: Any,
) -> Client:
    """Connect to a Dask scheduler, or start a cluster, and return its Client.

    Resolution order, first match wins:

    1. ``address``: a scheduler address such as ``"tcp://10.0.0.5:8786"``, or
       ``"local"`` to start a LocalCluster whatever the environment says;
    2. ``scheduler_file``: the JSON file a scheduler writes with
       ``--scheduler-file``;
    3. ``cluster``: a batch system, ``"slurm"``, ``"pbs"`` or ``"sge"``
       (a dask-jobqueue cluster whose workers are batch jobs), or ``"local"``;
    4. the environment variable ``DMLKIT_SCHEDULER``, then
       ``DASK_SCHEDULER_ADDRESS`` (an address, or ``"local"``);
    5. the environment variable ``DMLKIT_SCHEDULER_FILE``, then
       ``DASK_SCHEDULER_FILE`` (a scheduler file);
    6. the environment variable ``DMLKIT_CLUSTER`` (as ``cluster``);
    7. a new :class:`distributed.LocalCluster` sized to this machine.

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
    cluster : {"slurm", "pbs", "sge", "local"}, optional
        Start the scheduler in this process and the workers as batch jobs
        (:class:`dask_jobqueue.SLURMCluster`, ``PBSCluster``, ``SGECluster``;
        needs ``pip install "dmlkit[hpc]"``). Every job option not given here
        comes from the dask config, i.e. the user's ``jobqueue.yaml``
        (``~/.config/dask/jobqueue.yaml``, section ``jobqueue.<system>``:
        queue, account, walltime, interface, log-directory, ...). The job
        script is printed unless ``quiet``.
    jobs : int, optional
        Number of batch jobs to submit (``cluster.scale(jobs=jobs)``), each
        running ``processes`` workers. Default: ``DMLKIT_JOBS`` if set, else 1.
        ``jobs=0`` submits nothing: call ``client.cluster.scale`` or
        ``client.cluster.adapt`` yourself.
    cores, memory : int and str, optional
        Cores and memory of one job (``memory="4GiB"``); default from
        ``jobqueue.<system>.cores`` / ``.memory`` in the dask config.
    timeout : float, default 10.0
        Seconds to wait for the scheduler to answer (and for a scheduler file
        to appear; for the workers of a LocalCluster to start). Also the
        Client's connection timeout afterwards.
    worker_timeout : float, default 300.0
        Batch systems only: seconds to wait for the workers of all ``jobs`` to
        connect (the jobs may queue). On expiry the jobs are cancelled and
        :class:`ClusterStartError` says what the queue reports.
    security : distributed.Security, dict or bool, optional
        TLS settings, passed to :class:`distributed.Client`; for a new local or
        batch cluster, passed to the cluster (the Client inherits them).
    check_versions : bool, default True
        For an existing scheduler or batch workers: raise
        :class:`SchedulerVersionError` if the scheduler or a worker runs
        another python (major.minor), dask or distributed than this client, or
        a worker lacks this client's dmlkit version.
    quiet : bool, default False
        If False, print one line saying where the client connected and the
        dashboard link (and, for a batch system, the job script first).
    **cluster_kwargs
        For a LocalCluster: passed to :class:`distributed.LocalCluster` (and
        through it to the workers), overriding the defaults: ``n_workers`` and
        ``threads_per_worker`` from the CPU count (cgroup and affinity
        limits honoured; 2 cores give 2 workers x 1 thread),
        ``memory_limit`` = the machine's memory limit split evenly between
        workers, ``processes=True``, ``host="127.0.0.1"`` and a dashboard on
        127.0.0.1 (port 8787 when free, else a free port). Where the arguments
        do not say, ``DMLKIT_N_WORKERS``, ``DMLKIT_THREADS_PER_WORKER`` and
        ``DMLKIT_MEMORY_LIMIT`` (bytes per worker, for ``DMLKIT_N_WORKERS``
        workers; the same total for another count) size the LocalCluster:
        ``binder/start`` exports them from a pod's cgroup limits. For a batch system:
        passed to the dask-jobqueue cluster (``processes``, ``walltime``,
        ``queue``, ``account``, ``job_extra_directives``,
        ``worker_extra_args``, ``scheduler_options``, ``log_directory``, ...),
        overriding ``jobqueue.yaml``. Not valid with an existing scheduler.

    Returns
    -------
    distributed.Client
        The client, set as the default scheduler for dask. When connect
        started a cluster, ``client.cluster`` is that cluster and
        ``client.close()`` also shuts it down (for a batch system: cancels the
        jobs); a remote scheduler is left running.

    Raises
    ------
    ValueError
        If the address is malformed, a scheduler file is not valid JSON with an
        ``"address"``, two of ``address``, ``scheduler_file`` and ``cluster``
        are given, ``cluster`` / ``DMLKIT_CLUSTER`` names no known batch
        system, ``jobs`` is negative, a batch job has no cores or memory, or
        ``timeout`` is not positive.
    FileNotFoundError
        If the scheduler file (argument or environment variable) does not
        appear within ``timeout`` seconds.
    SchedulerConnectionError
        A :class:`ConnectionError`: nothing answered as a Dask scheduler at
        the address within ``timeout`` seconds.
    SchedulerVersionError
        A :class:`SchedulerConnectionError`: the versions differ (see
        ``check_versions``); the client is closed.
    ClusterStartError
        A :class:`RuntimeError`: the batch system's submit command is missing
        or refused the jobs, or their workers did not connect within
        ``worker_timeout``; the cluster is closed and its jobs cancelled.
    ImportError
        ``cluster`` names a batch system and dask-jobqueue is not installed.
    TypeError
        If ``address`` is not a string, a keyword argument is not a parameter
        of the cluster being started, or cluster keyword arguments (or
        ``jobs`` / ``cores`` / ``memory`` without a batch system) are given
        together with an explicit address, scheduler file or LocalCluster.
        (Given while the address comes from the environment, they are ignored
        with a UserWarning.)

    Notes
    -----
    With ``processes=True`` the workers are started with ``spawn``: a script
    must call :func:`connect` under ``if __name__ == "__main__":``.

    A batch cluster's scheduler runs in this process: the compute nodes must
    reach it (``scheduler_options={"host": ...}`` or ``interface=`` in
    jobqueue.yaml), and the workers must see the data at the same paths.

    Examples
    --------
    >>> import dmlkit
    >>> client = dmlkit.connect()  # doctest: +SKIP
    dmlkit: connected to tcp://127.0.0.1:40915 (LocalCluster, 2 workers, 2 threads, 7.63 GiB), dashboard: http://127.0.0.1:8787/status
    >>> client.close()  # doctest: +SKIP

    >>> client = dmlkit.connect(processes=False, n_workers=1, quiet=True)  # doctest: +SKIP
    >>> client = dmlkit.connect("tcp://10.0.0.5:8786")  # doctest: +SKIP
    >>> client = dmlkit.connect(scheduler_file="~/scheduler.json")  # doctest: +SKIP
    >>> client = dmlkit.connect(cluster="slurm", jobs=4, cores=8, memory="32GiB",
    ...                         walltime="01:00:00")  # doctest: +SKIP

    From the shell, the same code reaches a shared cluster or a batch system::

        DMLKIT_SCHEDULER=tcp://10.0.0.5:8786 python train.py
        DMLKIT_CLUSTER=slurm DMLKIT_JOBS=4 python train.py   # cores, memory: jobqueue.yaml
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout={timeout!r} should be a number of seconds > 0")
    if address is not None and not isinstance(address, str):
        raise TypeError(
            f"address={address!r} should be a string such as 'tcp://host:8786' or 'local', "
            f"got {type(address).__name__}"
        )
    given = {name: value for name, value in [
        ("address", address),
        ("scheduler_file", None if scheduler_file is None else os.fspath(scheduler_file)),
        ("cluster", cluster)] if value is not None}
    if len(given) > 1:
        raise ValueError(
            f"{' and '.join(f'{k}={v!r}' for k, v in given.items())} were given; pass only one "
            "of address, scheduler_file and cluster"
        )

    kind, target, source = _resolve(address, scheduler_file, cluster)
    job_args = {name: value for name, value in [("jobs", jobs), ("cores", cores),
                                                ("memory", memory)] if value is not None}

    if kind == "batch":
        client = _start_batch(
            target, source=source, jobs=jobs, cores=cores, memory=memory, timeout=timeout,
            worker_timeout=worker_timeout, security=security, check_versions=check_versions,
            quiet=quiet, kwargs=cluster_kwargs)
    elif kind == "local":
        if job_args:
            raise TypeError(
                f"{', '.join(f'{k}={v!r}' for k, v in job_args.items())} describe batch jobs, "
                f"but connect() is starting a LocalCluster ({source}); pass cluster='slurm' "
                f"(or 'pbs', 'sge'), or set {CLUSTER_ENV_VAR}"
            )
        client = _start_local(timeout=timeout, security=security, kwargs=cluster_kwargs)
    else:
        extra = {**job_args, **cluster_kwargs}
        if extra:
            message = (
                f"keyword arguments {sorted(extra)} configure a new cluster, "
                f"but connect() is connecting to an existing scheduler ({source})"
            )
            if source in ("address", "scheduler_file"):
                raise TypeError(message + "; drop them, or pass address='local'")
            warnings.warn(
                message + f"; they are ignored (unset {source} to start a cluster)",
                UserWarning,
                stacklevel=2,
            )
        if kind == "file":
            path = target
            target = _read_scheduler_file(path, source, timeout)
            source = f"scheduler file {path!r} given by {source}"
        client = _connect_remote(target, source=source, timeout=timeout, security=security)
        if check_versions:
            _check_versions(client, target, timeout)

    if not quiet:
        print(_describe(client), flush=True)
    return client


def _resolve(
    address: str | None, scheduler_file: str | os.PathLike[str] | None, cluster: str | None
) -> tuple[str, str, str]:
    """``(kind, target, source)``: kind is "local", "address", "file" or "batch"; source names the origin."""
    if address is not None:
        address = address.strip()
        return ("local" if address == "local" else "address"), address, "address"
    if scheduler_file is not None:
        return "file", os.path.expanduser(os.fspath(scheduler_file)), "scheduler_file"
    if cluster is not None:
        return (*_batch_system(cluster, "cluster"), "cluster")
    for name in ADDRESS_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return ("local" if value == "local" else "address"), value, name
    for name in SCHEDULER_FILE_ENV_VARS:
        value = os.environ.get(name, "").strip()
        if value:
            return "file", os.path.expanduser(value), name
    value = os.environ.get(CLUSTER_ENV_VAR, "").strip()
    if value:
        return (*_batch_system(value, CLUSTER_ENV_VAR), CLUSTER_ENV_VAR)
    return "local", "local", "default"


def _batch_system(value: Any, source: str) -> tuple[str, str]:
    """``("batch", name)`` or ``("local", "local")`` for a ``cluster`` value."""
    choices = ["local", *BATCH_SYSTEMS]
    name = value.strip().lower() if isinstance(value, str) else value
    if name == "local":
        return "local", "local"
    if name in BATCH_SYSTEMS:
        return "batch", name
    where = f"cluster={value!r}" if source == "cluster" else f"{source}={value!r}"
    raise ValueError(f"{where} should be one of {choices}")


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

    connection_args = _probe_connection_args(security)

    def failure(reason: BaseException | str) -> SchedulerConnectionError:
        where = "" if source == "address" else f" (from {source})"
        env = os.environ.get("DMLKIT_SCHEDULER")
        env = "DMLKIT_SCHEDULER (unset)" if env is None else f"DMLKIT_SCHEDULER={env!r}"
        return SchedulerConnectionError(
            f"could not connect to a Dask scheduler at {address!r}{where} within "
            f"timeout={timeout:g} s: {reason}.{_tls_hint(address, connection_args, reason)} "
            "Check that the scheduler is running and "
            f"reachable from this machine at that host and port (firewall, VPN, TLS "
            f"settings), and that {env}, DASK_SCHEDULER_ADDRESS or the scheduler file point "
            f"to it; unset them or pass address='local' to start a LocalCluster instead."
        )

    # distributed bounds the TCP connect by `timeout` but not the handshake read
    # that follows: a server that accepts and never answers (a wrong port, a
    # proxy) would hang Client() forever. Probe with a hard deadline first.
    if connection_args is not None:
        try:
            _run_with_deadline(lambda: _handshake(address, timeout, connection_args), timeout + 2)
        except Exception as exc:
            raise failure(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__) from exc

    try:
        return Client(address, timeout=timeout, security=security)
    except OSError as exc:  # includes TimeoutError and ConnectionError
        raise failure(exc) from exc


def _tls_hint(address: str, connection_args: Mapping[str, Any] | None,
              reason: BaseException | str) -> str:
    """A sentence on TLS when the failure looks like a TLS mismatch, else ""."""
    scheme = address.split("://", 1)[0] if "://" in address else "tcp"
    text = str(reason).lower()
    if scheme in ("tls", "wss"):
        if connection_args is not None and connection_args.get("ssl_context") is None:
            return (f" The address is {scheme}:// but no TLS settings were given: pass "
                    "security=distributed.Security(tls_ca_file=..., tls_client_cert=..., "
                    "tls_client_key=..., require_encryption=True), or set "
                    "distributed.comm.tls.* in the dask config.")
        if any(word in text for word in ("ssl", "certificate", "tls", "reset", "closed", "eof")):
            return (" The TLS handshake failed: check that tls_ca_file is the CA that signed the "
                    "scheduler's certificate, and that the scheduler's CA signed this client's "
                    "certificate (tls_client_cert, tls_client_key).")
    elif scheme in ("tcp", "ws") and any(word in text for word in ("reset", "closed", "eof")):
        return (" The connection was closed during the Dask handshake: if the scheduler is "
                "TLS-secured, use its tls:// address with security=distributed.Security(...).")
    return ""


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
    return _call_with_deadline(lambda: asyncio.run(make_coro()), deadline)


def _call_with_deadline(func: Any, deadline: float) -> Any:
    """``func()`` in a daemon thread; TimeoutError if it has not returned after ``deadline`` s."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = func()
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


def _env_int(name: str) -> int | None:
    """A positive integer from environment variable ``name``; None where unset or empty."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"environment variable {name}={value!r} should be an integer >= 1")
    return int(value)


def _env_bytes(name: str) -> int | None:
    """A byte count (``"1610612736"``, ``"1.5 GiB"``) from ``name``; None where unset or empty."""
    from dask.utils import parse_bytes

    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        count = parse_bytes(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"environment variable {name}={value!r} should be a byte count such as "
                         "'1610612736' or '1.5 GiB'")
    return count


def _local_cluster_defaults(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults for a LocalCluster on this machine; ``kwargs`` are the user's overrides."""
    from dask.system import CPU_COUNT
    from distributed.deploy.utils import nprocesses_nthreads
    from distributed.system import MEMORY_LIMIT

    processes = kwargs.get("processes", True)
    # binder/start exports these from the pod's cgroup limits; arguments come first
    n_workers = kwargs.get("n_workers", _env_int("DMLKIT_N_WORKERS"))
    threads = kwargs.get("threads_per_worker", _env_int("DMLKIT_THREADS_PER_WORKER"))
    if n_workers is None and threads is None:
        # In one process, several workers only compete for the GIL and the memory.
        n_workers, threads = nprocesses_nthreads(CPU_COUNT) if processes else (1, CPU_COUNT)
    elif n_workers is None:
        n_workers = max(1, CPU_COUNT // max(int(threads), 1))
    elif threads is None:
        threads = max(1, CPU_COUNT // max(int(n_workers), 1))

    memory_limit = int(MEMORY_LIMIT // max(int(n_workers), 1))
    env_limit = _env_bytes("DMLKIT_MEMORY_LIMIT")
    if env_limit:
        # a per-worker limit for DMLKIT_N_WORKERS workers: the same total for another count
        env_workers = _env_int("DMLKIT_N_WORKERS") or int(n_workers)
        memory_limit = int(env_limit * env_workers // max(int(n_workers), 1))
    defaults: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": threads,
        "processes": processes,
        "memory_limit": memory_limit,
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
        client = ClusterClient(cluster, timeout=timeout)
    except BaseException:
        cluster.close()
        raise
    try:
        client.wait_for_workers(cluster_kwargs["n_workers"], timeout=timeout)
    except BaseException:
        client.close()
        raise
    return client


def _check_versions(client: Client, where: str, timeout: float) -> None:
    """Raise SchedulerVersionError (closing the client) if the cluster's versions differ from ours."""
    try:
        versions = _call_with_deadline(lambda: client.get_versions(packages=["dmlkit"]), timeout + 2)
    except Exception as exc:
        client.close()
        raise SchedulerConnectionError(
            f"could not read the versions of the Dask cluster at {where} within {timeout:g} s "
            f"({type(exc).__name__}: {exc}); pass check_versions=False to connect without checking"
        ) from exc

    def version(info: Any, package: str) -> str | None:
        packages = info.get("packages") if isinstance(info, Mapping) else None
        value = packages.get(package) if isinstance(packages, Mapping) else None
        if package == "python" and value:
            value = ".".join(str(value).split(".")[:2])
        return value

    mine = versions["client"]
    workers = versions.get("workers") or {}
    problems = []
    for package in (*CHECKED_PACKAGES, "dmlkit"):
        here = version(mine, package)
        elsewhere = []
        if package != "dmlkit":  # the scheduler runs no tasks: it needs no dmlkit
            there = version(versions.get("scheduler"), package)
            if there != here:
                elsewhere.append(f"{there or 'missing'} on the scheduler")
        by_version: dict[str | None, list[str]] = {}
        for address, info in sorted(workers.items()):
            by_version.setdefault(version(info, package), []).append(address)
        for there, addresses in by_version.items():
            if there != here:
                shown = ", ".join(addresses[:3]) + (f" and {len(addresses) - 3} more" if len(addresses) > 3 else "")
                elsewhere.append(f"{there or 'missing'} on worker{'s' * (len(addresses) > 1)} {shown}")
        if elsewhere:
            problems.append(f"{package} {here or 'missing'} here, {', '.join(elsewhere)}")
    if problems:
        client.close()
        raise SchedulerVersionError(
            f"the Dask cluster at {where} runs other versions than this client: "
            f"{'; '.join(problems)}. Mixed versions fail in obscure ways or hang mid-computation: "
            "install the same python (major.minor), dask, distributed and dmlkit for the client, "
            "the scheduler and the workers (e.g. from the same environment.yml), or pass "
            "check_versions=False to connect anyway"
        )


def _import_dask_jobqueue(system: str) -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ImportError(
            f"connect(cluster={system!r}) starts Dask workers as batch jobs through dask-jobqueue, "
            "which is not installed: pip install 'dmlkit[hpc]' (or: pip install dask-jobqueue; "
            "conda install -c conda-forge dask-jobqueue)"
        ) from exc
    return dask_jobqueue


def _batch_cluster_parameters(cls: Any) -> set[str]:
    """Keyword arguments a dask-jobqueue cluster accepts, directly or passed on to its jobs."""
    names: set[str] = set()
    classes = [c for c in (*cls.__mro__, *cls.job_cls.__mro__)
               if c.__module__.startswith("dask_jobqueue") and "__init__" in vars(c)]
    for c in classes:
        for name, param in inspect.signature(c.__init__).parameters.items():
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and name != "self":
                names.add(name)
    return names - {"n_workers", "job_cls", "scheduler", "cores", "memory"}


def _n_jobs(jobs: Any) -> int:
    source = "jobs"
    if jobs is None:
        value = os.environ.get(JOBS_ENV_VAR, "").strip()
        if not value:
            return 1
        source = JOBS_ENV_VAR
        try:
            jobs = int(value)
        except ValueError:
            raise ValueError(f"{JOBS_ENV_VAR}={value!r} should be a whole number of jobs >= 0") from None
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise ValueError(f"{source}={jobs!r} should be a whole number of jobs >= 0")
    return jobs


def _start_batch(system: str, *, source: str, jobs: int | None, cores: Any, memory: Any,
                 timeout: float, worker_timeout: float, security: Any, check_versions: bool,
                 quiet: bool, kwargs: Mapping[str, Any]) -> Client:
    """A dask-jobqueue cluster with ``jobs`` jobs submitted and their workers connected."""
    import dask

    jobs = _n_jobs(jobs)
    if (isinstance(worker_timeout, bool) or not isinstance(worker_timeout, (int, float))
            or not worker_timeout > 0):
        raise ValueError(f"worker_timeout={worker_timeout!r} should be a number of seconds > 0")
    cls = getattr(_import_dask_jobqueue(system), BATCH_SYSTEMS[system])
    if "n_workers" in kwargs:
        raise TypeError(
            f"n_workers={kwargs['n_workers']!r}: connect(cluster={system!r}) scales by batch jobs; "
            f"pass jobs= (each job runs `processes` workers)"
        )
    accepted = _batch_cluster_parameters(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hints = [
            f"{name!r} (did you mean {match[0]!r}?)" if (match := difflib.get_close_matches(name, accepted, 1))
            else repr(name)
            for name in unknown
        ]
        raise TypeError(
            f"connect() got unexpected keyword argument(s) {', '.join(hints)}: with "
            f"cluster={system!r} keyword arguments are passed to dask_jobqueue.{cls.__name__} "
            "(e.g. processes, walltime, queue, account, job_extra_directives, worker_extra_args, "
            "scheduler_options, log_directory)"
        )
    section = f"jobqueue.{kwargs.get('config_name') or cls.job_cls.default_config_name()}"
    cores = dask.config.get(f"{section}.cores", None) if cores is None else cores
    memory = dask.config.get(f"{section}.memory", None) if memory is None else memory
    missing = [name for name, value in (("cores", cores), ("memory", memory)) if value is None]
    if missing:
        raise ValueError(
            f"cluster={system!r} needs the cores and memory of one job, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} neither given nor set in the dask config "
            f"({', '.join(f'{section}.{m}' for m in missing)}): pass e.g. "
            f"connect(cluster={system!r}, cores=1, memory='4GiB'), or set them in "
            f"~/.config/dask/jobqueue.yaml (or DASK_{section.upper().replace('.', '__')}__CORES=1 "
            f"and ...__MEMORY=4GiB)"
        )

    job_kwargs = {**kwargs, "cores": cores, "memory": memory}
    if security is not None:
        job_kwargs["security"] = security
    cluster = cls(**job_kwargs)  # starts the scheduler in this process; submits nothing yet
    try:
        if not quiet:
            print(f"dmlkit: {cls.__name__} ({source}={system!r}), {jobs} job{'s' * (jobs != 1)} "
                  f"of this script:\n{cluster.job_script()}", flush=True)
        command = shlex.split(cls.job_cls.submit_command)[0]
        if jobs and shutil.which(command) is None:
            raise ClusterStartError(
                f"cluster={system!r} submits its jobs with {command!r}, which is not on PATH: run "
                f"this on a login node of the {system.upper()} cluster (or where its client "
                "commands are installed)"
            )
        client = ClusterClient(cluster, timeout=timeout)
    except BaseException:
        cluster.close()
        raise
    try:
        if jobs:
            _submit_jobs(cluster, system, jobs)
            _wait_for_batch_workers(client, cluster, system, jobs, worker_timeout,
                                    cores=cores, memory=memory)
            if check_versions:
                _check_versions(client, f"{cluster.scheduler_address} ({cls.__name__})", timeout)
    except BaseException:
        client.close()  # also closes the cluster: cancels the jobs
        raise
    return client


class _DropReported(logging.Filter):
    """Drops tornado's log of an exception that connect() re-raises with a clearer message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, "_dmlkit_reported", False)


def _submit_jobs(cluster: Any, system: str, jobs: int) -> None:
    """Scale to ``jobs`` and wait until the batch system accepted (or refused) every job."""

    async def scale_and_submit() -> None:
        # On the cluster's event loop, so that the submission the scale schedules is
        # the one awaited here: a refused job then raises instead of only being logged.
        cluster.scale(jobs=jobs)
        correct_state = getattr(cluster, "_correct_state", None)
        if correct_state is not None:
            try:
                await correct_state()
            except Exception as exc:
                # The scale's own callback awaits the same submission after us and would
                # log its traceback next to the ClusterStartError: mark it as reported.
                exc._dmlkit_reported = True  # type: ignore[attr-defined]
                raise

    logger = logging.getLogger("tornado.application")
    if not any(isinstance(f, _DropReported) for f in logger.filters):
        logger.addFilter(_DropReported())
    try:
        cluster.sync(scale_and_submit)
    except Exception as exc:
        from distributed.core import Status

        for job in cluster.workers.values():  # refused: never started, so closing must skip it
            if getattr(job, "job_id", "") is None and job.status == Status.created:
                job.status = Status.failed
        text = str(exc)
        reason = text.split("stderr:", 1)[1] if "stderr:" in text else text
        reason = "; ".join(line.strip() for line in reason.splitlines() if line.strip())
        raise ClusterStartError(
            f"cluster={system!r}: the batch system refused the worker jobs: {reason or repr(exc)}. "
            "Check the job script printed above against what the queue allows (cores, memory, "
            "walltime, queue/partition, account): a job asking more than any node has is refused"
        ) from exc


def _job_ids(cluster: Any) -> list[str]:
    return [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]


def _slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """``{job id: "STATE (reason)"}`` for the jobs still in SLURM's queue; None if squeue fails."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # all the jobs have left the queue: "Invalid job id specified"
        return {} if "invalid job id" in out.stderr.lower() else None
    states = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split(maxsplit=2) + ["", ""])[:3]
        states[job_id] = f"{state} ({reason})" if reason and reason != "None" else state
    return states


#: SLURM job states in which a job may still start a worker.
_SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _job_log_tail(log_directory: str | None, job_ids: list[str], lines: int = 3) -> str:
    """`` Job <id> wrote: ...`` from the first job's error log, or ""."""
    if not log_directory or not job_ids:
        return ""
    import glob

    folder = os.path.expanduser(log_directory)
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), f"*{job_ids[0]}.err"))):
        try:
            with open(path, errors="replace") as f:
                tail = [line.strip() for line in f.read().splitlines() if line.strip()][-lines:]
        except OSError:
            continue
        if tail:
            return f" Job {job_ids[0]} wrote ({path}): {' | '.join(tail)}."
    return ""


def _wait_for_batch_workers(client: Client, cluster: Any, system: str, jobs: int,
                            worker_timeout: float, *, cores: Any, memory: Any) -> None:
    """Wait for the workers of all jobs; ClusterStartError saying why if they do not come."""
    expected = jobs * cluster._dummy_job.worker_processes
    start = time.monotonic()
    next_check = start + 2
    while (n := len(client.nthreads())) < expected:
        now = time.monotonic()
        if now - start > worker_timeout:
            reason = f"only {n} of {expected} workers connected within worker_timeout={worker_timeout:g} s"
            break
        if system == "slurm" and now >= next_check:
            next_check = now + 2
            states = _slurm_states(_job_ids(cluster))
            if states is not None and not any(s.split()[0] in _SLURM_ACTIVE for s in states.values()):
                reason = (f"the jobs ended after {now - start:.0f} s with only {n} of "
                          f"{expected} workers connected")
                break
        time.sleep(0.2)
    else:
        return
    ids = _job_ids(cluster)
    states = _slurm_states(ids) if system == "slurm" else None
    queue = (", ".join(f"{i} {states.get(i, 'gone')}" for i in ids) if states is not None
             else ", ".join(ids) or "none")
    log_directory = getattr(cluster._dummy_job, "log_directory", None)
    logs = log_directory or f"{os.getcwd()} (the submission folder)"
    said = _job_log_tail(log_directory, ids)
    raise ClusterStartError(
        f"cluster={system!r}: {reason}; jobs: {queue}.{said} Check that the jobs start (squeue / "
        f"qstat), their output in {logs}, that one job fits a node (cores={cores!r}, memory={memory!r}), "
        f"and that the compute nodes reach the scheduler at {cluster.scheduler_address} "
        "(scheduler_options={'host': ...} or interface= in jobqueue.yaml). The jobs are cancelled"
    )


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
