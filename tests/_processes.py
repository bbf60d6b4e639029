"""Helpers for the remote-scheduler and SLURM tests: Dask as separate processes, notebooks.

Every process is started in its own session (process group) and stopped by killing that
group, so a nanny's worker processes go with it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
DASK = str(Path(sys.executable).with_name("dask"))
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
SCHEDULER_VARIABLES = ("DMLKIT_SCHEDULER", "DASK_SCHEDULER_ADDRESS", "DMLKIT_SCHEDULER_FILE",
                       "DASK_SCHEDULER_FILE", "DMLKIT_CLUSTER", "DMLKIT_JOBS")


def python_with(prelude: str, module: str) -> list[str]:
    """A command running ``prelude`` and then the click CLI in ``module`` (args follow)."""
    return [sys.executable, "-c", f"{prelude}\nfrom {module} import main\nmain()"]


def start(command: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, **(env or {})}, cwd=str(log.parent))


def stop(*procs: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the processes' groups, SIGKILL whatever is left of them after ``grace`` s."""

    def alive(proc: subprocess.Popen) -> bool:
        proc.poll()  # reap the leader
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for proc in procs:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not any(alive(p) for p in procs):
            break
    for proc in procs:
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def log_tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@contextmanager
def dask_scheduler(folder: Path, *, args: tuple[str, ...] = (), prelude: str | None = None,
                   timeout: float = 60) -> Iterator[SimpleNamespace]:
    """``dask scheduler`` on 127.0.0.1 (random ports), with a scheduler file; yields its address."""
    scheduler_file = folder / "scheduler.json"
    command = (python_with(prelude, "distributed.cli.dask_scheduler") if prelude
               else [DASK, "scheduler"])
    command += ["--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0",
                "--scheduler-file", str(scheduler_file), *args]
    log = folder / "scheduler.log"
    proc = start(command, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                address = json.loads(scheduler_file.read_text())["address"]
                break
            except (OSError, ValueError, KeyError):
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{log_tail(log)}")
            time.sleep(0.1)
        yield SimpleNamespace(address=address, scheduler_file=str(scheduler_file), proc=proc,
                              log=log)
    finally:
        stop(proc)


@contextmanager
def dask_workers(address: str, folder: Path, n: int = 1, *, args: tuple[str, ...] = (),
                 prelude: str | None = None, wait: bool = True,
                 security=None) -> Iterator[list[subprocess.Popen]]:
    """``n`` single-threaded ``dask worker`` processes on 127.0.0.1 for ``address``."""
    from distributed import Client

    procs = []
    try:
        for i in range(n):
            command = (python_with(prelude, "distributed.cli.dask_worker") if prelude
                       else [DASK, "worker"])
            command += [address, "--host", "127.0.0.1", "--nthreads", "1", "--memory-limit",
                        "1GiB", "--no-dashboard", "--name", f"w{i}", "--death-timeout", "30",
                        *args]
            procs.append(start(command, folder / f"worker-{i}.log"))
        if wait:
            with Client(address, security=security, timeout=30) as client:
                try:
                    client.wait_for_workers(n, timeout=60)
                except TimeoutError:
                    logs = "\n".join(log_tail(folder / f"worker-{i}.log") for i in range(n))
                    raise RuntimeError(f"dask workers did not connect:\n{logs}") from None
        yield procs
    finally:
        stop(*procs)


def execute_notebook(path: Path, env: dict[str, str]) -> list[str]:
    """Run a notebook top to bottom in a fresh python3 kernel with ``env``; its text outputs.

    Fails the test with the notebook's name, the cell's index and the traceback.
    """
    import nbformat
    import pytest
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    mp = pytest.MonkeyPatch()
    try:
        for name in SCHEDULER_VARIABLES:
            mp.delenv(name, raising=False)
        for name, value in env.items():
            mp.setenv(name, value)
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        try:
            client.execute()
        except CellExecutionError as exc:
            pytest.fail(f"{path.name} failed:\n{ANSI_ESCAPE.sub('', str(exc))}", pytrace=False)
    finally:
        mp.undo()
    texts = []
    for cell in nb.cells:
        text = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                text.append(output.get("text", ""))
            elif "data" in output:
                text.append(output["data"].get("text/plain", ""))
        texts.append("".join(text))
    return texts


def notebook_env(base: Path) -> dict[str, str]:
    """The environment tests/test_notebooks.py gives kernels: tiny data, a python3 kernel spec."""
    from ipykernel.kernelspec import write_kernel_spec

    kernels = base / "jupyter" / "kernels" / "python3"
    if not kernels.exists():
        write_kernel_spec(str(kernels))
    return {
        "DMLKIT_SIZE": "tiny",
        "DMLKIT_DATA": str(base / "data"),
        "MPLBACKEND": "Agg",
        "JUPYTER_PATH": os.pathsep.join(
            [str(base / "jupyter"), *filter(None, [os.environ.get("JUPYTER_PATH")])]),
    }
