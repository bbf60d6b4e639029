"""binder/start and binder/postBuild, run as repo2docker runs them, on fake cgroups.

``binder/start`` reads the cgroup limits under ``DMLKIT_CGROUP_ROOT`` and the host's
memory from ``DMLKIT_MEMINFO``; here both point into a temporary folder, and the
script execs ``env`` (or python) so the test reads what it exported.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
START = ROOT / "binder" / "start"
POSTBUILD = ROOT / "binder" / "postBuild"
GIB = 1024**3
MIB = 1024**2
SIZING = ("DMLKIT_N_WORKERS", "DMLKIT_THREADS_PER_WORKER", "DMLKIT_MEMORY_LIMIT")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="binder/start needs bash")


def _host_cpus() -> int:
    """What ``nproc`` prints with OMP_* unset: the CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cgroup(tmp_path: Path, files: dict[str, str], host_memory: int = 16 * GIB) -> dict[str, str]:
    """A fake cgroup tree and /proc/meminfo; returns the environment pointing at them."""
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    root.mkdir(exist_ok=True)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal:       {host_memory // 1024} kB\nMemFree:        1024 kB\n")
    return {"DMLKIT_CGROUP_ROOT": str(root), "DMLKIT_MEMINFO": str(meminfo)}


def _start(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([str(START), *(command or ["env"])], env={**base, **env},
                          capture_output=True, text=True, timeout=60)


def _exported(env: dict[str, str]) -> dict[str, str]:
    result = _start(env)
    assert result.returncode == 0, result.stderr
    assert not result.stderr, result.stderr  # no arithmetic or test errors on the way
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_start_is_an_executable_bash_script_ending_in_exec():
    assert os.access(START, os.X_OK), "binder/start must be executable (chmod +x)"
    assert os.access(POSTBUILD, os.X_OK), "binder/postBuild must be executable (chmod +x)"
    lines = [line for line in START.read_text().splitlines() if line.strip()]
    assert lines[0] == "#!/usr/bin/env bash"
    assert lines[-1] == 'exec "$@"'


def test_cgroup_v2_pod_one_cpu_two_gib_behind_jupyterhub(tmp_path):
    env = _cgroup(tmp_path, {"cpu.max": "100000 100000", "memory.max": str(2 * GIB)})
    out = _exported({**env, "JUPYTERHUB_SERVICE_PREFIX": "/user/alice-abc123/"})
    assert out["DASK_DISTRIBUTED__DASHBOARD__LINK"] == "/user/alice-abc123/proxy/{port}/status"
    # 1 CPU; workers get 3/4 of the 2 GiB pod (the rest is for JupyterLab and the kernel)
    assert out["DMLKIT_N_WORKERS"] == "1"
    assert out["DMLKIT_THREADS_PER_WORKER"] == "1"
    assert int(out["DMLKIT_MEMORY_LIMIT"]) == 3 * GIB // 2
    # the Dask panel's own clusters get the same size, and the baked tiny datasets are used
    assert out["DASK_LABEXTENSION__FACTORY__KWARGS__N_WORKERS"] == "1"
    assert out["DASK_LABEXTENSION__FACTORY__KWARGS__THREADS_PER_WORKER"] == "1"
    assert int(out["DASK_LABEXTENSION__FACTORY__KWARGS__MEMORY_LIMIT"]) == 3 * GIB // 2
    assert out["DMLKIT_SIZE"] == "tiny"


def test_cgroup_v2_fractional_quota_rounds_up_and_prefix_gets_its_slash(tmp_path):
    # 0.5 CPU, 1 GiB: one single-threaded worker with all but 256 MiB
    env = _cgroup(tmp_path, {"cpu.max": "50000 100000", "memory.max": str(GIB)})
    out = _exported({**env, "JUPYTERHUB_SERVICE_PREFIX": "/user/bob"})
    assert out["DASK_DISTRIBUTED__DASHBOARD__LINK"] == "/user/bob/proxy/{port}/status"
    assert (out["DMLKIT_N_WORKERS"], out["DMLKIT_THREADS_PER_WORKER"]) == ("1", "1")
    assert int(out["DMLKIT_MEMORY_LIMIT"]) == GIB - 256 * MIB


def test_cgroup_v1_limits(tmp_path):
    env = _cgroup(tmp_path, {"cpu,cpuacct/cpu.cfs_quota_us": "200000",
                             "cpu,cpuacct/cpu.cfs_period_us": "100000",
                             "memory/memory.limit_in_bytes": str(8 * GIB)})
    out = _exported(env)
    cpus = min(2, _host_cpus())
    # 6 GiB for workers allows 2 processes of >= 1 GiB: one per CPU
    assert int(out["DMLKIT_N_WORKERS"]) == cpus
    assert out["DMLKIT_THREADS_PER_WORKER"] == "1"
    assert int(out["DMLKIT_MEMORY_LIMIT"]) == 6 * GIB // cpus


def test_memory_decides_processes_versus_threads(tmp_path):
    # 2 CPUs in a 2 GiB pod: one process with two threads rather than two 768 MiB workers
    if _host_cpus() < 2:
        pytest.skip("needs 2 CPUs for a 2-CPU quota to count")
    env = _cgroup(tmp_path, {"cpu.max": "200000 100000", "memory.max": str(2 * GIB)})
    out = _exported(env)
    assert (out["DMLKIT_N_WORKERS"], out["DMLKIT_THREADS_PER_WORKER"]) == ("1", "2")
    assert int(out["DMLKIT_MEMORY_LIMIT"]) == 3 * GIB // 2


def test_no_limits_fall_back_to_host_memory_and_capped_cpus(tmp_path):
    env = _cgroup(tmp_path, {"cpu.max": "max 100000", "memory.max": "max"}, host_memory=4 * GIB)
    out = _exported(env)
    assert "DASK_DISTRIBUTED__DASHBOARD__LINK" not in out  # not under JupyterHub: left alone
    cpus = min(4, _host_cpus())
    n_workers, threads = int(out["DMLKIT_N_WORKERS"]), int(out["DMLKIT_THREADS_PER_WORKER"])
    assert n_workers * threads == cpus and n_workers <= 3  # 3 GiB for workers, >= 1 GiB each
    assert int(out["DMLKIT_MEMORY_LIMIT"]) == 3 * GIB // n_workers
    # an absurd host CPU count is capped too
    out = _exported({**env, "DMLKIT_BINDER_MAX_CPUS": "1"})
    assert (out["DMLKIT_N_WORKERS"], out["DMLKIT_THREADS_PER_WORKER"]) == ("1", "1")


def test_cgroup_v1_unlimited_memory_is_ignored(tmp_path):
    env = _cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000",
                             "memory/memory.limit_in_bytes": "9223372036854771712"},
                  host_memory=2 * GIB)
    out = _exported(env)
    assert int(out["DMLKIT_MEMORY_LIMIT"]) * int(out["DMLKIT_N_WORKERS"]) == 3 * GIB // 2


def test_values_already_set_are_kept(tmp_path):
    env = _cgroup(tmp_path, {"cpu.max": "100000 100000", "memory.max": str(2 * GIB)})
    out = _exported({**env, "DMLKIT_N_WORKERS": "3", "DMLKIT_SIZE": "small",
                     "DASK_DISTRIBUTED__DASHBOARD__LINK": "http://example.invalid/{port}"})
    assert out["DMLKIT_N_WORKERS"] == "3"
    assert out["DMLKIT_THREADS_PER_WORKER"] == "1"
    assert int(out["DMLKIT_MEMORY_LIMIT"]) == 3 * GIB // 2 // 3  # the workers share the memory
    assert out["DMLKIT_SIZE"] == "small"
    assert out["DASK_DISTRIBUTED__DASHBOARD__LINK"] == "http://example.invalid/{port}"


def test_start_execs_the_command_with_its_arguments(tmp_path):
    env = _cgroup(tmp_path, {})
    proc = subprocess.Popen([str(START), "sh", "-c", 'echo "$$ $1"; exit 7', "sh", "a b"],
                            env={"PATH": os.environ["PATH"], **env},
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7
    pid, arg = out.strip().split(" ", 1)
    assert int(pid) == proc.pid, "binder/start must exec the command, not run it as a child"
    assert arg == "a b"


def test_dask_reads_the_exported_settings(tmp_path):
    """The exported strings become the dashboard link and the panel's LocalCluster kwargs."""
    env = _cgroup(tmp_path, {"cpu.max": "100000 100000", "memory.max": str(2 * GIB)})
    code = (
        "import json, dask.config, distributed\n"
        "from distributed.utils import format_dashboard_link\n"
        "dask.config.refresh()\n"
        "print(json.dumps({'link': format_dashboard_link('127.0.0.1', 8787),\n"
        "                  'factory': dask.config.get('labextension.factory.kwargs', {})}))\n"
    )
    result = _start({**env, "JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["link"] == "/user/alice/proxy/8787/status"
    assert seen["factory"] == {"n_workers": 1, "threads_per_worker": 1,
                               "memory_limit": 3 * GIB // 2}


def test_postbuild_bakes_the_tiny_datasets_and_the_lab_settings(tmp_path):
    """Run binder/postBuild in a copy of binder/, with pip stubbed out (it would reinstall dmlkit)."""
    pytest.importorskip("jupyterlab")
    shutil.copytree(ROOT / "binder", tmp_path / "binder")
    shim = tmp_path / "bin"
    shim.mkdir()
    calls = tmp_path / "pip-calls"
    (shim / "python").write_text(
        "#!/usr/bin/env bash\n"
        f'if [ "$1 $2" = "-m pip" ]; then echo "$@" >> {calls}; exit 0; fi\n'
        f'exec {sys.executable} "$@"\n')
    (shim / "python").chmod(0o755)
    env = {"PATH": f"{shim}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
           "JUPYTERLAB_DIR": str(tmp_path / "lab")}
    result = subprocess.run([str(tmp_path / "binder" / "postBuild")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert calls.read_text().split() == ["-m", "pip", "install", "--no-deps", "-e", "."]
    # the stores the notebooks open with DMLKIT_SIZE=tiny and the default data folder
    for name in ("blobs", "classification", "regression"):
        assert (tmp_path / "data" / f"{name}-tiny.zarr" / "X" / "zarr.json").is_file(), name
    settings = tmp_path / "lab" / "settings" / "overrides.d" / "dmlkit.json"
    assert json.loads(settings.read_text()) == json.loads(
        (ROOT / "binder" / "jupyterlab-overrides.json").read_text())
