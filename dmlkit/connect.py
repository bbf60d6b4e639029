"""The Dask client: an existing scheduler, a batch-system cluster, or a LocalCluster.

:func:`connect` is the one entry point. It resolves where the scheduler is
(argument, environment variable, scheduler file, a dask-jobqueue cluster on
SLURM / PBS / SGE, or a new local cluster sized to the machine), fails fast with
a message that says what to check, and prints one line saying where it
connected and where the dashboard is.

This module holds the resolution and the connection to an existing scheduler.
A LocalCluster is started by :mod:`dmlkit._local`, a dask-jobqueue cluster by
:mod:`dmlkit._jobqueue`; what they share (the exceptions, ClusterClient, the
version check) is in :mod:`dmlkit._client`, and re-exported here.
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import warnings
from collections.abc import Mapping
from typing import Any

from distributed import Client

from dmlkit._client import (  # noqa: F401  (CHECKED_PACKAGES, ClusterClient: re-exported)
    CHECKED_PACKAGES,
    ClusterClient,
    ClusterStartError,
    SchedulerConnectionError,
    SchedulerVersionError,
    _call_with_deadline,
    _check_versions,
)
from dmlkit._jobqueue import (  # noqa: F401  (JOBS_ENV_VAR: re-exported)
    BATCH_SYSTEMS,
    JOBS_ENV_VAR,
    _start_batch,
)
from dmlkit._local import _start_local

__all__ = ["ClusterStartError", "SchedulerConnectionError", "SchedulerVersionError", "connect"]

#: Environment variables holding a scheduler address, first match wins.
ADDRESS_ENV_VARS = ("DMLKIT_SCHEDULER", "DASK_SCHEDULER_ADDRESS")
#: Environment variables holding the path of a scheduler file, first match wins.
SCHEDULER_FILE_ENV_VARS = ("DMLKIT_SCHEDULER_FILE", "DASK_SCHEDULER_FILE")
#: Environment variable naming a batch system ("slurm", "pbs", "sge") or "local".
CLUSTER_ENV_VAR = "DMLKIT_CLUSTER"
# Also public here, defined next to their users: JOBS_ENV_VAR and BATCH_SYSTEMS
# (dmlkit._jobqueue), CHECKED_PACKAGES (dmlkit._client).

_TCP_SCHEMES = ("tcp", "tls", "ws", "wss", "ucx")

# Tracebacks and reprs name the public module, where users import these from.
for _cls in (ClusterClient, ClusterStartError, SchedulerConnectionError, SchedulerVersionError):
    _cls.__module__ = __name__
del _cls


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
    7. a new :class:`distributed.LocalCluster` sized to this machine, whose
       worker processes get malloc settings that keep kernels' temporaries off
       fresh mmaps (``dmlkit._local.WORKER_MALLOC``; not where you set
       ``MALLOC_TRIM_THRESHOLD_`` or ``MALLOC_MMAP_THRESHOLD_`` yourself).

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
        script is printed unless ``quiet``; it exports the LocalCluster's
        malloc settings before starting the workers (added after your
        ``job_script_prologue``, unless you configured malloc yourself).
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
