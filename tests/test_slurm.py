"""dmlkit.connect(cluster="slurm") on a real single-node SLURM (started by ci/slurm.sh).

The workers are SLURM batch jobs launched by slurmd; the scheduler runs in this process on
127.0.0.1. Without that SLURM (not root, packages missing, daemons down) the tests skip and
say why; `make test` starts it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import yaml
from numpy.testing import assert_array_equal

from conftest import write_store
from dmlkit import KMeans, LogisticRegression
from dmlkit.connect import ClusterStartError, connect
from _processes import ROOT, execute_notebook, notebook_env

pytestmark = [pytest.mark.slurm, pytest.mark.cluster]
pytest.importorskip("dask_jobqueue")

SLURM_DIR = Path(os.environ.get("DMLKIT_SLURM_DIR", "/tmp/dmlkit-slurm"))
SLURM_CONF = SLURM_DIR / "slurm.conf"
START = "start it with `bash ci/slurm.sh up` as root (`make test` does)"


def _run(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=15,
                          env={**os.environ, "SLURM_CONF": str(SLURM_CONF)})


@pytest.fixture(scope="module")
def slurm():
    """The SLURM of ci/slurm.sh, answering; never a site's SLURM_CONF from the environment."""
    if shutil.which("sinfo") is None:
        pytest.skip(f"SLURM is not installed (no sinfo on PATH): {START}")
    if not SLURM_CONF.is_file():
        pytest.skip(f"no single-node SLURM configured ({SLURM_CONF} is missing): {START}")
    ping = _run("scontrol", "ping")
    if "is UP" not in ping.stdout:
        said = ((ping.stdout + ping.stderr).strip().splitlines() or ["nothing"])[0]
        pytest.skip(f"the SLURM controller of {SLURM_CONF} does not answer "
                    f"(scontrol ping: {said!r}): {START}")
    state = _run("sinfo", "-h", "-o", "%T").stdout.split()
    if not {"idle", "mixed", "allocated"} & set(state):
        pytest.skip(f"the SLURM node is not available (sinfo says {state}): {START}")
    return str(SLURM_CONF)


@pytest.fixture
def slurm_env(slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm)
    for name in ("DMLKIT_SCHEDULER", "DASK_SCHEDULER_ADDRESS", "DMLKIT_SCHEDULER_FILE",
                 "DASK_SCHEDULER_FILE", "DMLKIT_CLUSTER", "DMLKIT_JOBS"):
        monkeypatch.delenv(name, raising=False)


def local_options(log_directory) -> dict:
    """What a single machine needs: everything on 127.0.0.1, logs out of the working tree."""
    return dict(processes=1, scheduler_options={"host": "127.0.0.1",
                                                "dashboard_address": "127.0.0.1:0"},
                worker_extra_args=["--host", "127.0.0.1"], log_directory=str(log_directory))


def in_queue(job_ids) -> list[str]:
    out = _run("squeue", "-h", "-o", "%i")
    return sorted(set(out.stdout.split()) & set(job_ids))


def wait_gone(job_ids, timeout=20.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while (left := in_queue(job_ids)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(2)
    centers = rng.uniform(-5, 5, size=(3, 4))
    labels = rng.integers(0, 3, 9_000)
    X = (centers[labels] + rng.standard_normal((9_000, 4))).astype(np.float32)
    y = (X @ rng.standard_normal(4) + 0.5 * rng.standard_normal(9_000) > 0).astype(np.int64)
    path = write_store(tmp_path_factory.mktemp("slurm-data") / "data.zarr", X, y, chunk_rows=1000)
    # cache=False: the blocks are the store's whatever the cluster, so the bits are the same
    with dask.config.set(scheduler="sync"):
        km = KMeans(3, random_state=0, cache=False).fit(path)
        lr = LogisticRegression(cache=False).fit(path)
    return path, km, lr


@pytest.fixture(scope="module")
def on_slurm(slurm, tmp_path_factory):
    """connect(cluster="slurm", jobs=2, ...): the client, the printed text, the job ids."""
    import contextlib
    import io

    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", slurm)
    mp.delenv("DMLKIT_SCHEDULER", raising=False)
    logs = tmp_path_factory.mktemp("slurm-logs")
    printed = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        client = connect(cluster="slurm", jobs=2, cores=1, memory="1GiB", walltime="00:10:00",
                         worker_timeout=90, **local_options(logs))
    seconds = time.perf_counter() - t0
    job_ids = [str(job.job_id) for job in client.cluster.workers.values()]
    try:
        yield client, printed.getvalue(), job_ids, seconds
    finally:
        client.close()
        mp.undo()


def test_job_script_is_printed_with_the_requested_resources(on_slurm):
    _, printed, _, _ = on_slurm
    assert "SLURMCluster (cluster='slurm'), 2 jobs of this script:" in printed
    for line in ("#SBATCH -n 1", "#SBATCH --cpus-per-task=1", "#SBATCH --mem=1G",
                 "#SBATCH -t 00:10:00", "--nthreads 1", "--memory-limit 1.00GiB",
                 "--host 127.0.0.1"):
        assert line in printed, f"{line!r} not in the printed job script:\n{printed}"
    assert "dmlkit: connected to tcp://127.0.0.1:" in printed and "(SLURMCluster, 2 workers" in printed


def test_workers_are_the_slurm_jobs(on_slurm):
    client, _, job_ids, seconds = on_slurm
    print(f"2 SLURM workers connected in {seconds:.1f} s")
    assert len(job_ids) == 2
    running = _run("squeue", "-h", "-o", "%i %T").stdout.split("\n")
    assert {f"{j} RUNNING" for j in job_ids} <= set(running)
    worker_jobs = client.run(lambda: os.environ.get("SLURM_JOB_ID"))
    assert len(worker_jobs) == 2 and sorted(worker_jobs.values()) == sorted(job_ids)
    # the job script's exports reach the worker processes over dask's malloc defaults
    from dmlkit._local import WORKER_MALLOC
    if not any(name in os.environ for name in WORKER_MALLOC):
        seen = client.run(lambda: {n: os.environ.get(n) for n in WORKER_MALLOC})
        assert all(env == WORKER_MALLOC for env in seen.values()), seen


def test_kmeans_and_logistic_regression_on_slurm_equal_the_sync_fits(on_slurm, data):
    client, _, _, _ = on_slurm
    path, km_ref, lr_ref = data
    km = KMeans(3, random_state=0, cache=False).fit(path)
    assert_array_equal(km.cluster_centers_, km_ref.cluster_centers_)
    assert km.inertia_ == km_ref.inertia_ and km.n_iter_ == km_ref.n_iter_
    lr = LogisticRegression(cache=False).fit(path)
    assert_array_equal(lr.coef_, lr_ref.coef_)
    assert_array_equal(lr.intercept_, lr_ref.intercept_)
    # both ran on the SLURM workers
    processing = client.run(lambda dask_worker: dask_worker.state.executed_count)
    assert len(processing) == 2 and all(n > 0 for n in processing.values())


def test_jobqueue_yaml_is_honoured_and_closing_the_client_cancels_the_jobs(slurm_env, tmp_path,
                                                                           capsys):
    # a user's jobqueue.yaml: what is not passed to connect comes from it
    jobqueue_yaml = tmp_path / "jobqueue.yaml"
    jobqueue_yaml.write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "cores": 1, "memory": "1GiB", "walltime": "00:07:00",
        "job-extra-directives": ["--comment=from-jobqueue-yaml"],
        **{k.replace("_", "-"): v for k, v in local_options(tmp_path).items()},
    }}}))
    user_config = dask.config.collect(paths=[str(tmp_path)], env={})
    flat = {f"jobqueue.slurm.{k}": v for k, v in user_config["jobqueue"]["slurm"].items()}
    with dask.config.set(flat):
        client = connect(cluster="slurm", jobs=1, walltime="00:08:00", worker_timeout=90)
    printed = capsys.readouterr().out
    assert "#SBATCH --comment=from-jobqueue-yaml" in printed and "#SBATCH --mem=1G" in printed
    assert "#SBATCH -t 00:08:00" in printed  # an argument beats the file
    cluster = client.cluster
    job_ids = [str(job.job_id) for job in cluster.workers.values()]
    assert len(job_ids) == 1 and in_queue(job_ids) == job_ids
    assert client.submit(sum, [1, 2]).result() == 3
    client.close()
    assert cluster.status.name == "closed"
    assert wait_gone(job_ids) == [], "the jobs are still in squeue after client.close()"


def test_a_job_the_node_cannot_hold_is_a_clear_error_not_a_timeout(slurm_env, tmp_path):
    # more memory than the node's RealMemory: sbatch refuses; dask-jobqueue alone only logs it
    before = set(_run("squeue", "-h", "-o", "%i").stdout.split())
    start = time.monotonic()
    with pytest.raises(ClusterStartError) as info:
        connect(cluster="slurm", jobs=1, cores=1, memory="4000GiB", worker_timeout=120,
                quiet=True, **local_options(tmp_path))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "refused the worker jobs" in message and "memory" in message.lower()
    assert set(_run("squeue", "-h", "-o", "%i").stdout.split()) <= before


def test_jobs_that_die_are_a_clear_error_before_the_timeout(slurm_env, tmp_path):
    # the job starts but its worker cannot (a python the compute node does not have)
    start = time.monotonic()
    with pytest.raises(ClusterStartError) as info:
        connect(cluster="slurm", jobs=1, cores=1, memory="1GiB", python="/nonexistent/python",
                worker_timeout=120, quiet=True, **local_options(tmp_path))
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "the jobs ended after" in message and "only 0 of 1 workers connected" in message
    assert "/nonexistent/python" in message and "No such file" in message  # the job's log


@pytest.mark.notebooks
def test_hpc_notebook_runs_on_slurm(slurm, tmp_path_factory):
    """07_hpc with DMLKIT_CLUSTER=slurm; the jobs' settings come from a jobqueue.yaml (DASK_CONFIG)."""
    pytest.importorskip("nbclient")
    base = tmp_path_factory.mktemp("nb-slurm")
    config = base / "dask-config"
    config.mkdir()
    (config / "jobqueue.yaml").write_text(yaml.safe_dump({"jobqueue": {"slurm": {
        "cores": 1, "memory": "1GiB", "walltime": "00:09:00",
        **{k.replace("_", "-"): v for k, v in local_options(base / "logs").items()},
    }}}))
    env = {**notebook_env(base), "DMLKIT_CLUSTER": "slurm", "DMLKIT_JOBS": "2",
           "SLURM_CONF": slurm, "DASK_CONFIG": str(config)}
    before = set(_run("squeue", "-h", "-o", "%i").stdout.split())
    printed = "\n".join(execute_notebook(ROOT / "notebooks" / "07_hpc.ipynb", env))
    assert "SLURMCluster (DMLKIT_CLUSTER='slurm'), 2 jobs of this script:" in printed
    assert "#SBATCH -t 00:09:00" in printed  # from the jobqueue.yaml
    assert "(SLURMCluster, 2 workers" in printed
    left = set(_run("squeue", "-h", "-o", "%i").stdout.split()) - before
    assert wait_gone(left) == []
