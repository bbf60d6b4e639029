"""Helpers shared by the benchmarks: timing, machine description, tables."""
from __future__ import annotations

import os
import platform
import time
from typing import Callable, Sequence


def timed(fn: Callable):
    """Run ``fn()`` once; return ``(seconds, result)``."""
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
