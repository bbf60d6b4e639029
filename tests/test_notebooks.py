"""Execute the course notebooks top to bottom, and check they are committed clean.

Each notebook runs in a fresh python3 kernel of this interpreter, in ``notebooks/``,
on the ``tiny`` datasets (written once per session to a temporary ``DMLKIT_DATA``)
and on the LocalCluster the notebook starts itself: scheduler variables are unset.
A failing cell fails the test with the notebook's name, the cell's index and its
traceback. After the last cell the kernel must have no child processes left (the
notebook closes its client, which shuts down its cluster).
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
psutil = pytest.importorskip("psutil")
pytest.importorskip("ipykernel")

from _processes import SCHEDULER_VARIABLES  # noqa: E402
from _processes import notebook_env as _notebook_env  # noqa: E402

pytestmark = [pytest.mark.notebooks, pytest.mark.cluster]

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")  # colours in IPython's tracebacks


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOKS_DIR}"


@pytest.fixture(scope="session")
def notebook_env(tmp_path_factory):
    """Environment of the kernels: a data folder shared by the session, a python3 kernel spec."""
    return _notebook_env(tmp_path_factory.mktemp("notebooks"))


def _child_processes(pid: int) -> list:
    """Live descendants of ``pid``, except multiprocessing's resource tracker."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    alive = []
    for child in children:
        try:
            if child.is_running() and "resource_tracker" not in " ".join(child.cmdline()):
                alive.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return alive


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, notebook_env, monkeypatch):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in notebook_env.items():
        monkeypatch.setenv(name, value)

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    t0 = time.perf_counter()
    with client.setup_kernel():
        kernel_pid = client.km.provisioner.pid
        for index, cell in enumerate(nb.cells):
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as exc:
                failure = f"{path.name}, cell {index} failed:\n{ANSI_ESCAPE.sub('', str(exc))}"
                break
        else:
            failure = None
        if failure:
            pytest.fail(failure, pytrace=False)
        # the notebook closed its client: its cluster's worker processes must be gone
        deadline = time.monotonic() + 10
        while (leaked := _child_processes(kernel_pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not leaked, (f"{path.name} left processes behind: "
                            f"{[(p.pid, p.name()) for p in leaked]}")
    print(f"{path.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_clean(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    dirty = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} have outputs or execution counts; "
                       "clear them before committing (JupyterLab: Edit > Clear Outputs of All Cells)")


def test_readme_lists_every_notebook():
    readme = (NOTEBOOKS_DIR / "README.md").read_text()
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"notebooks/README.md does not mention {missing}"
