"""dmlkit.connect: LocalCluster defaults, address / env / scheduler file, fast clear errors."""
from __future__ import annotations

import json
import os
import socket
import time
from urllib.parse import urlparse
from urllib.request import urlopen

import psutil
import pytest
from dask.system import CPU_COUNT
from distributed import Client, LocalCluster, Worker
from distributed.deploy.utils import nprocesses_nthreads
from distributed.system import MEMORY_LIMIT

from dmlkit.connect import ClusterStartError, SchedulerConnectionError, connect

pytestmark = [pytest.mark.cluster, pytest.mark.usefixtures("no_scheduler_variables")]


@pytest.fixture
def running():
    """An already running scheduler (in-process, over tcp on 127.0.0.1) and its address."""
    with LocalCluster(processes=False, n_workers=1, threads_per_worker=1, protocol="tcp",
                      scheduler_port=0, dashboard_address="127.0.0.1:0") as cluster:
        yield cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_gone(pids, timeout=10.0) -> list[int]:
    """The pids still alive (not zombies) after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.slow
def test_local_default_is_sized_to_machine_on_localhost_and_closes_with_client(capsys):
    client = connect()
    try:
        cluster = client.cluster
        assert cluster is not None and cluster.processes
        assert client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"
        n_workers, threads = nprocesses_nthreads(CPU_COUNT)
        workers = client.scheduler_info()["workers"].values()
        assert len(workers) == n_workers
        assert {w["nthreads"] for w in workers} == {threads}
        assert {w["memory_limit"] for w in workers} == {MEMORY_LIMIT // n_workers}
        assert all(w["host"] == "127.0.0.1" for w in workers)
        assert client.submit(sum, [1, 2, 3]).result() == 6
        # results and actor calls go straight to the workers, which listen on this machine
        assert client.direct_to_workers is True
        from dmlkit._local import WORKER_MALLOC

        if not any(name in os.environ for name in WORKER_MALLOC):
            seen = client.run(lambda: {n: os.environ.get(n) for n in WORKER_MALLOC})
            assert all(env == WORKER_MALLOC for env in seen.values())
        with urlopen(client.dashboard_link, timeout=10) as page:
            assert page.status == 200
        pids = list(client.run(os.getpid).values())
        assert len(pids) == n_workers and os.getpid() not in pids
    finally:
        client.close()
    assert cluster.status.name == "closed"
    assert wait_gone(pids) == []
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and cluster.scheduler_address in line
    assert f"{n_workers} worker" in line


def test_local_kwargs_pass_through_and_printed_line(capsys):
    client = connect(processes=False, n_workers=1, threads_per_worker=1)
    try:
        assert not client.cluster.processes
        (worker,) = client.cluster.workers.values()
        assert isinstance(worker, Worker) and worker.state.nthreads == 1
        assert client.submit(sum, [1, 2]).result() == 3
        out = capsys.readouterr().out
        assert out.count("\n") == 1
        assert client.dashboard_link in out and "1 worker, 1 thread" in out
    finally:
        client.close()
    assert client.cluster.status.name == "closed"


def test_quiet_prints_nothing_and_context_manager_closes_cluster(capsys):
    with connect(processes=False, n_workers=1, quiet=True) as client:
        cluster = client.cluster
    assert cluster.status.name == "closed"
    assert capsys.readouterr().out == ""


def test_dashboard_port_taken_falls_back_to_a_free_one():
    with socket.socket() as blocker:
        try:  # hold 8787 (if someone else already does, the test is the same)
            blocker.bind(("127.0.0.1", 8787))
            blocker.listen()
        except OSError:
            pass
        with connect(processes=False, n_workers=1, quiet=True) as client:
            link = urlparse(client.dashboard_link)
            assert link.hostname == "127.0.0.1" and link.port != 8787
            with urlopen(client.dashboard_link, timeout=10) as page:  # the link works
                assert page.status == 200


@pytest.mark.parametrize("kwarg, hint", [("n_worker", "did you mean 'n_workers'?"),
                                         ("bogus_option", "LocalCluster")])
def test_unknown_kwarg_raises_type_error_before_starting_anything(kwarg, hint):
    before = set(psutil.Process().children(recursive=True))
    with pytest.raises(TypeError, match=f"'{kwarg}'.*{hint}"):
        connect(processes=False, **{kwarg: 2})
    assert set(psutil.Process().children(recursive=True)) <= before


@pytest.mark.parametrize("var", ["DMLKIT_SCHEDULER", "DASK_SCHEDULER_ADDRESS"])
def test_env_address_is_honoured_and_remote_cluster_left_running(running, monkeypatch, var,
                                                                capsys):
    monkeypatch.setenv(var, running.scheduler_address)
    with connect() as client:
        assert client.cluster is None
        assert client.scheduler.address == running.scheduler_address
        assert client.submit(sum, [2, 3]).result() == 5
    assert running.status.name == "running"
    assert running.scheduler_address in capsys.readouterr().out


def test_dmlkit_env_beats_dask_env_and_local_beats_env(running, monkeypatch):
    monkeypatch.setenv("DMLKIT_SCHEDULER", running.scheduler_address)
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://nowhere.invalid:1")
    with connect(quiet=True) as client:
        assert client.scheduler.address == running.scheduler_address
    with connect("local", processes=False, n_workers=1, quiet=True) as client:
        assert client.cluster is not None
        assert client.scheduler.address != running.scheduler_address


def test_kwargs_with_explicit_address_raise_with_env_address_warn(running, monkeypatch):
    with pytest.raises(TypeError, match="n_workers.*existing scheduler"):
        connect(running.scheduler_address, n_workers=2)
    monkeypatch.setenv("DMLKIT_SCHEDULER", running.scheduler_address)
    with pytest.warns(UserWarning, match="n_workers.*ignored"):
        client = connect(n_workers=2, quiet=True)
    with client:
        assert client.scheduler.address == running.scheduler_address


@pytest.mark.parametrize("how", ["argument", "DMLKIT_SCHEDULER_FILE", "DASK_SCHEDULER_FILE"])
def test_scheduler_file(running, tmp_path, monkeypatch, how):
    path = tmp_path / "scheduler.json"
    with Client(running) as writer:
        writer.write_scheduler_file(str(path))
    if how == "argument":
        client = connect(scheduler_file=path, quiet=True)
    else:
        monkeypatch.setenv(how, str(path))
        client = connect(quiet=True)
    with client:
        assert client.scheduler.address == running.scheduler_address
        assert client.cluster is None


@pytest.mark.parametrize("how", ["argument", "DMLKIT_SCHEDULER_FILE"])
def test_missing_scheduler_file_names_path_and_origin(tmp_path, monkeypatch, how):
    path = str(tmp_path / "nope.json")
    if how == "argument":
        with pytest.raises(FileNotFoundError, match="nope.json.*scheduler_file argument"):
            connect(scheduler_file=path, timeout=0.2)
    else:
        monkeypatch.setenv(how, path)
        with pytest.raises(FileNotFoundError, match=f"nope.json.*{how}"):
            connect(timeout=0.2)


def test_scheduler_file_without_address_is_a_value_error(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"type": "Scheduler"}))
    with pytest.raises(ValueError, match="bad.json.*'address'"):
        connect(scheduler_file=path, timeout=0.2)


def test_unreachable_address_fails_fast_naming_address_timeout_and_env(monkeypatch):
    address = f"tcp://127.0.0.1:{free_port()}"
    monkeypatch.setenv("DMLKIT_SCHEDULER", address)
    start = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        connect(timeout=1.0)
    elapsed = time.monotonic() - start
    assert elapsed < 1.0 + 3
    assert isinstance(info.value, SchedulerConnectionError)
    message = str(info.value)
    assert address in message and "timeout=1 s" in message
    assert "scheduler is running" in message and f"DMLKIT_SCHEDULER='{address}'" in message


def test_silent_server_does_not_hang():
    # Accepts the TCP connection (backlog) but never answers the Dask handshake;
    # distributed's Client alone would wait forever.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="handshake"):
            connect(address, timeout=1.0)
        assert time.monotonic() - start < 1.0 + 3


@pytest.mark.parametrize("address", ["tcp://", "no-port-here", "tcp://host:notaport",
                                     "http://host:8786", "tcp://a b:8786", "tcp://host:0"])
def test_malformed_address_is_a_value_error_naming_it(address):
    with pytest.raises(ValueError, match="malformed scheduler address") as info:
        connect(address)
    assert repr(address) in str(info.value)


def test_argument_errors():
    with pytest.raises(ValueError, match="timeout=0"):
        connect(timeout=0)
    with pytest.raises(ValueError, match="pass only one"):
        connect("tcp://127.0.0.1:8786", scheduler_file="s.json")


def test_security_is_passed_to_local_cluster_and_to_remote_client():
    pytest.importorskip("cryptography")
    from distributed.security import Security

    with connect(processes=False, n_workers=1, security=True, quiet=True) as client:
        assert client.scheduler.address.startswith("tls://127.0.0.1:")
        assert client.submit(sum, [1, 1]).result() == 2
    security = Security.temporary()
    with LocalCluster(processes=False, n_workers=1, security=security,
                      dashboard_address="127.0.0.1:0") as cluster:
        with connect(cluster.scheduler_address, security=security, quiet=True) as client:
            assert client.submit(sum, [1, 2]).result() == 3
        with pytest.raises(ConnectionError):  # no certificates: clear error, not a hang
            connect(cluster.scheduler_address, timeout=1.0)


# --- batch systems (dask-jobqueue); the real SLURM runs are in test_slurm.py --------------

JOB_SCRIPT_LINES = {"slurm": ("sbatch", "#SBATCH --mem=1G"),
                    "pbs": ("qsub", "#PBS -l select=1:ncpus=1:mem=1024MB"),
                    "sge": ("qsub", "#$ -N dask-worker")}
LOCAL_SCHEDULER = {"scheduler_options": {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"}}


@pytest.fixture
def no_batch_commands(tmp_path, monkeypatch):
    """A PATH without sbatch / qsub (whatever this machine has)."""
    pytest.importorskip("dask_jobqueue")
    monkeypatch.setenv("PATH", str(tmp_path))


@pytest.mark.parametrize("system", ["slurm", "pbs", "sge"])
def test_batch_system_without_its_commands_prints_the_script_and_fails_fast(
        system, no_batch_commands, capsys):
    command, line = JOB_SCRIPT_LINES[system]
    start = time.monotonic()
    with pytest.raises(ClusterStartError, match=f"cluster='{system}' submits its jobs with "
                                                f"'{command}', which is not on PATH"):
        connect(cluster=system, jobs=2, cores=1, memory="1GiB", **LOCAL_SCHEDULER)
    assert time.monotonic() - start < 10
    out = capsys.readouterr().out
    assert f"(cluster='{system}'), 2 jobs of this script:" in out and line in out


def test_dmlkit_cluster_env_and_jobs_zero_give_a_cluster_closed_with_the_client(
        no_batch_commands, monkeypatch, capsys):
    monkeypatch.setenv("DMLKIT_CLUSTER", "PBS")
    monkeypatch.setenv("DMLKIT_JOBS", "0")  # no job: nothing is submitted, scale/adapt later
    client = connect(cores=2, memory="2GiB", **LOCAL_SCHEDULER)
    cluster = client.cluster
    assert type(cluster).__name__ == "PBSCluster" and len(client.nthreads()) == 0
    assert "(DMLKIT_CLUSTER='pbs'), 0 jobs" in capsys.readouterr().out
    client.close()
    assert cluster.status.name == "closed"


def test_batch_cores_and_memory_come_from_the_dask_config(no_batch_commands):
    import dask

    with dask.config.set({"jobqueue.sge.cores": 3, "jobqueue.sge.memory": "3GiB"}):
        with connect(cluster="sge", jobs=0, quiet=True, **LOCAL_SCHEDULER) as client:
            script = client.cluster.job_script()
    # 3 cores and 3 GiB per job: dask-jobqueue makes 3 workers of 1 thread and 1 GiB
    assert "--nthreads 1 --memory-limit 1.00GiB --nworkers 3" in script
    with dask.config.set({"jobqueue.sge.cores": None, "jobqueue.sge.memory": None}):
        with pytest.raises(ValueError, match=r"needs the cores and memory.*jobqueue\.sge\.cores"
                                             r".*jobqueue\.yaml"):
            connect(cluster="sge", jobs=1)


def test_batch_job_scripts_export_the_worker_malloc_settings(no_batch_commands, monkeypatch):
    import dask

    from dmlkit._local import WORKER_MALLOC

    for name in WORKER_MALLOC:
        monkeypatch.delenv(name, raising=False)
    exports = [f"export {k}={v}" for k, v in WORKER_MALLOC.items()]
    with connect(cluster="sge", jobs=0, cores=1, memory="1GiB", quiet=True,
                 job_script_prologue=["module load python"], **LOCAL_SCHEDULER) as client:
        script = client.cluster.job_script()
    assert all(line in script for line in ["module load python", *exports])
    assert script.index("module load python") < script.index(exports[0])
    # the user's own malloc settings win: nothing is added
    with connect(cluster="sge", jobs=0, cores=1, memory="1GiB", quiet=True,
                 job_script_prologue=["export MALLOC_ARENA_MAX=2"], **LOCAL_SCHEDULER) as client:
        assert not any(line in client.cluster.job_script() for line in exports)
    # a config env-extra (deprecated) would be dropped by dask-jobqueue for a prologue
    with dask.config.set({"jobqueue.sge.env-extra": ["module load python"]}):
        with connect(cluster="sge", jobs=0, cores=1, memory="1GiB", quiet=True,
                     **LOCAL_SCHEDULER) as client:
            script = client.cluster.job_script()
        assert "module load python" in script and not any(line in script for line in exports)
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 1024}):
        with connect(cluster="sge", jobs=0, cores=1, memory="1GiB", quiet=True,
                     **LOCAL_SCHEDULER) as client:
            assert not any(line in client.cluster.job_script() for line in exports)


def test_batch_argument_errors(no_batch_commands, monkeypatch):
    with pytest.raises(ValueError, match="cluster='torque' should be one of"):
        connect(cluster="torque")
    monkeypatch.setenv("DMLKIT_CLUSTER", "condor")
    with pytest.raises(ValueError, match="DMLKIT_CLUSTER='condor' should be one of"):
        connect()
    monkeypatch.delenv("DMLKIT_CLUSTER")
    with pytest.raises(ValueError, match="pass only one"):
        connect("tcp://127.0.0.1:8786", cluster="slurm")
    with pytest.raises(TypeError, match="jobs=2.*describe batch jobs.*cluster='slurm'"):
        connect(jobs=2, cores=1)
    with pytest.raises(TypeError, match="'wall_time' \\(did you mean 'walltime'\\?\\)"):
        connect(cluster="slurm", cores=1, memory="1GiB", wall_time="01:00:00")
    with pytest.raises(TypeError, match="n_workers=4.*pass jobs="):
        connect(cluster="slurm", cores=1, memory="1GiB", n_workers=4)
    with pytest.raises(ValueError, match="jobs=-1 should be"):
        connect(cluster="slurm", jobs=-1, cores=1, memory="1GiB")
    monkeypatch.setenv("DMLKIT_JOBS", "two")
    with pytest.raises(ValueError, match="DMLKIT_JOBS='two' should be"):
        connect(cluster="slurm", cores=1, memory="1GiB")


def test_dmlkit_cluster_local_starts_a_local_cluster(monkeypatch):
    monkeypatch.setenv("DMLKIT_CLUSTER", "local")
    with connect(processes=False, n_workers=1, quiet=True) as client:
        assert type(client.cluster).__name__ == "LocalCluster"


def test_scheduler_env_beats_cluster_env_and_ignores_job_arguments(running, monkeypatch):
    monkeypatch.setenv("DMLKIT_CLUSTER", "slurm")
    monkeypatch.setenv("DMLKIT_SCHEDULER", running.scheduler_address)
    with pytest.warns(UserWarning, match=r"\['cores', 'jobs'\].*ignored"):
        client = connect(jobs=2, cores=1, quiet=True)
    with client:
        assert client.scheduler.address == running.scheduler_address


def test_missing_dask_jobqueue_says_what_it_is_for(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ImportError, match=r"connect\(cluster='slurm'\) starts Dask workers as "
                                          r"batch jobs through dask-jobqueue.*dmlkit\[hpc\]"):
        connect(cluster="slurm", cores=1, memory="1GiB")


def test_local_cluster_size_from_the_environment(monkeypatch):
    """binder/start exports the pod's size; explicit arguments still come first."""
    from dmlkit._local import _local_cluster_defaults

    monkeypatch.setenv("DMLKIT_N_WORKERS", "1")
    monkeypatch.setenv("DMLKIT_THREADS_PER_WORKER", "2")
    monkeypatch.setenv("DMLKIT_MEMORY_LIMIT", "1.5 GiB")
    d = _local_cluster_defaults({})
    assert (d["n_workers"], d["threads_per_worker"], d["memory_limit"]) == (1, 2, 3 * 2**29)
    d = _local_cluster_defaults({"n_workers": 3})
    assert d["n_workers"] == 3 and d["memory_limit"] == 2**29  # the same total, split in 3
    monkeypatch.setenv("DMLKIT_N_WORKERS", "two")
    with pytest.raises(ValueError, match="DMLKIT_N_WORKERS='two' should be an integer >= 1"):
        _local_cluster_defaults({})
    monkeypatch.setenv("DMLKIT_N_WORKERS", "1")
    monkeypatch.setenv("DMLKIT_MEMORY_LIMIT", "lots")
    with pytest.raises(ValueError, match="DMLKIT_MEMORY_LIMIT='lots' should be a byte count"):
        _local_cluster_defaults({})


def test_local_workers_get_malloc_settings_unless_configured(monkeypatch):
    import dask

    from dmlkit import _local

    for name in _local.WORKER_MALLOC:
        monkeypatch.delenv(name, raising=False)
    env = _local._worker_environ()
    assert {k: env[k] for k in _local.WORKER_MALLOC} == _local.WORKER_MALLOC
    assert env.get("OMP_NUM_THREADS") == dask.config.get(
        "distributed.nanny.pre-spawn-environ").get("OMP_NUM_THREADS")  # dask's others kept
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 1024}):
        assert _local._worker_environ()["MALLOC_TRIM_THRESHOLD_"] == 1024
        assert "MALLOC_MMAP_THRESHOLD_" not in _local._worker_environ()
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert "MALLOC_MMAP_THRESHOLD_" not in _local._worker_environ()
