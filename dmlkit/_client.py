"""What every way of connecting shares: the exceptions, the Client that owns its cluster,
and the check that a cluster runs this client's versions.

Private: :mod:`dmlkit.connect` re-exports the public names. This module imports none of
``connect``, ``_local`` and ``_jobqueue``, so that all three can import it.
"""
from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

from distributed import Client

#: Packages whose versions must agree between client, scheduler and workers
#: (python: major.minor); dmlkit must agree between client and workers.
CHECKED_PACKAGES = ("python", "dask", "distributed")


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


def _unknown_hints(unknown, accepted) -> list[str]:
    """``'name'`` for each unknown keyword, with a "did you mean" where one is close."""
    import difflib

    return [f"{name!r} (did you mean {match[0]!r}?)"
            if (match := difflib.get_close_matches(name, accepted, 1)) else repr(name)
            for name in unknown]
