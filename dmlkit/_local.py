"""A LocalCluster sized to this machine (or to DMLKIT_N_WORKERS, DMLKIT_THREADS_PER_WORKER,
DMLKIT_MEMORY_LIMIT), with its dashboard on 127.0.0.1, and a Client that owns it.

Private: used by :func:`dmlkit.connect.connect`.
"""
from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Mapping
from typing import Any

from distributed import Client

from dmlkit._client import ClusterClient, _unknown_hints

_DEFAULT_DASHBOARD_PORT = 8787

#: glibc malloc settings for the worker processes. Dask sets MALLOC_TRIM_THRESHOLD_
#: to 64 KiB, which also fixes the mmap threshold at 128 KiB: every temporary array
#: of more than 128 KiB is then a fresh mmap, page-faulted in and unmapped again, and a
#: kernel's float64 temporaries ran up to 5x slower in workers than in one process.
#: Here blocks under 16 MiB come from the heap, which keeps up to 32 MiB free per
#: worker; larger arrays (data chunks) are still returned to the system when freed.
WORKER_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(32 * 2**20),
                 "MALLOC_MMAP_THRESHOLD_": str(16 * 2**20)}


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


def _malloc_configured(environ: Mapping[str, Any]) -> bool:
    """Whether the user set the malloc variables (in dask's pre-spawn ``environ`` or this
    process's environment)."""
    return str(environ.get("MALLOC_TRIM_THRESHOLD_", "65536")) != "65536" or \
        "MALLOC_MMAP_THRESHOLD_" in environ or \
        any(name in os.environ for name in WORKER_MALLOC)


def _worker_environ() -> dict:
    """Dask's environment for new worker processes with :data:`WORKER_MALLOC`, unless the
    malloc variables were configured by the user (in dask's config or this process's
    environment)."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    return environ if _malloc_configured(environ) else {**environ, **WORKER_MALLOC}


def _local_cluster(cluster_kwargs: Mapping[str, Any]):
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.nanny.pre-spawn-environ": _worker_environ()}):
        return LocalCluster(**cluster_kwargs)


def _start_local(*, timeout: float, security: Any, kwargs: Mapping[str, Any]) -> Client:
    """A LocalCluster with machine-sized defaults, and a Client that owns it."""
    accepted = _local_cluster_parameters(kwargs.get("worker_class"))
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hints = _unknown_hints(unknown, accepted)
        raise TypeError(
            f"connect() got unexpected keyword argument(s) {', '.join(hints)}: keyword arguments "
            "are passed to distributed.LocalCluster and its workers (e.g. n_workers, "
            "threads_per_worker, memory_limit, processes)"
        )

    cluster_kwargs = {**_local_cluster_defaults(kwargs), **kwargs}
    if security is not None:
        cluster_kwargs["security"] = security
    cluster = _local_cluster(cluster_kwargs)
    try:
        # No security here: the Client inherits the cluster's (security=True
        # would otherwise make a second, different temporary certificate).
        # Its workers listen on this machine: results and actor calls (every
        # resident pass) go to them directly, not through the scheduler.
        client = ClusterClient(cluster, timeout=timeout, direct_to_workers=True)
    except BaseException:
        cluster.close()
        raise
    try:
        client.wait_for_workers(cluster_kwargs["n_workers"], timeout=timeout)
    except BaseException:
        client.close()
        raise
    return client
