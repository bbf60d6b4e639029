"""Helpers shared by the benchmarks: timing, machine description, tables."""
from __future__ import annotations

import gc
import os
import platform
import time
from typing import Callable, Sequence


def _lingering(dask_scheduler) -> int:
    """Tasks no client wants any more, not forgotten yet (run on the scheduler)."""
    return sum(1 for ts in dask_scheduler.tasks.values() if not ts.who_wants)


def settle(timeout: float = 2.0) -> None:
    """Wait until the active cluster (if any) has forgotten the results no client holds.

    The scheduler forgets a released result a few milliseconds after the
    client lets it go: a run of the same computation started before that
    finds it still in memory and takes no time (dask-ml's seeded fits did).
    """
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):
        return
    gc.collect()
    deadline = time.monotonic() + timeout
    while client.run_on_scheduler(_lingering) and time.monotonic() < deadline:
        time.sleep(0.01)


def timed(fn: Callable):
    """Run ``fn()`` once, after :func:`settle`; return ``(seconds, result)``."""
    settle()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def machine() -> dict:
    """The machine and library versions a result was measured with."""
    import dask
    import numpy
    import psutil
    import sklearn

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 1e9,
            "python": platform.python_version(), "numpy": numpy.__version__,
            "dask": dask.__version__, "sklearn": sklearn.__version__}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)
