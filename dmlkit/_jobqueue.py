"""Dask workers as batch jobs through dask-jobqueue (SLURM, PBS, SGE): start the cluster,
submit the jobs, wait for their workers, and say why when they do not come.

Private: used by :func:`dmlkit.connect.connect`; dask-jobqueue is imported only when a
batch system is asked for.
"""
from __future__ import annotations

import inspect
import logging
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from distributed import Client

from dmlkit._client import ClusterClient, ClusterStartError, _check_versions, _unknown_hints

#: Environment variable with the number of batch jobs when ``jobs`` is not given.
JOBS_ENV_VAR = "DMLKIT_JOBS"
#: Batch systems reachable through ``cluster=``: the dask-jobqueue class of each.
BATCH_SYSTEMS = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}


def _import_dask_jobqueue(system: str) -> Any:
    try:
        import dask_jobqueue
    except ImportError as exc:
        raise ImportError(
            f"connect(cluster={system!r}) starts Dask workers as batch jobs through dask-jobqueue, "
            "which is not installed: pip install 'dmlkit[hpc]' (or: pip install dask-jobqueue; "
            "conda install -c conda-forge dask-jobqueue)"
        ) from exc
    return dask_jobqueue


def _batch_cluster_parameters(cls: Any) -> set[str]:
    """Keyword arguments a dask-jobqueue cluster accepts, directly or passed on to its jobs."""
    names: set[str] = set()
    classes = [c for c in (*cls.__mro__, *cls.job_cls.__mro__)
               if c.__module__.startswith("dask_jobqueue") and "__init__" in vars(c)]
    for c in classes:
        for name, param in inspect.signature(c.__init__).parameters.items():
            if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and name != "self":
                names.add(name)
    return names - {"n_workers", "job_cls", "scheduler", "cores", "memory"}


def _n_jobs(jobs: Any) -> int:
    source = "jobs"
    if jobs is None:
        value = os.environ.get(JOBS_ENV_VAR, "").strip()
        if not value:
            return 1
        source = JOBS_ENV_VAR
        try:
            jobs = int(value)
        except ValueError:
            raise ValueError(f"{JOBS_ENV_VAR}={value!r} should be a whole number of jobs >= 0") from None
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 0:
        raise ValueError(f"{source}={jobs!r} should be a whole number of jobs >= 0")
    return jobs


def _start_batch(system: str, *, source: str, jobs: int | None, cores: Any, memory: Any,
                 timeout: float, worker_timeout: float, security: Any, check_versions: bool,
                 quiet: bool, kwargs: Mapping[str, Any]) -> Client:
    """A dask-jobqueue cluster with ``jobs`` jobs submitted and their workers connected."""
    import dask

    jobs = _n_jobs(jobs)
    if (isinstance(worker_timeout, bool) or not isinstance(worker_timeout, (int, float))
            or not worker_timeout > 0):
        raise ValueError(f"worker_timeout={worker_timeout!r} should be a number of seconds > 0")
    cls = getattr(_import_dask_jobqueue(system), BATCH_SYSTEMS[system])
    if "n_workers" in kwargs:
        raise TypeError(
            f"n_workers={kwargs['n_workers']!r}: connect(cluster={system!r}) scales by batch jobs; "
            f"pass jobs= (each job runs `processes` workers)"
        )
    accepted = _batch_cluster_parameters(cls)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        hints = _unknown_hints(unknown, accepted)
        raise TypeError(
            f"connect() got unexpected keyword argument(s) {', '.join(hints)}: with "
            f"cluster={system!r} keyword arguments are passed to dask_jobqueue.{cls.__name__} "
            "(e.g. processes, walltime, queue, account, job_extra_directives, worker_extra_args, "
            "scheduler_options, log_directory)"
        )
    section = f"jobqueue.{kwargs.get('config_name') or cls.job_cls.default_config_name()}"
    cores = dask.config.get(f"{section}.cores", None) if cores is None else cores
    memory = dask.config.get(f"{section}.memory", None) if memory is None else memory
    missing = [name for name, value in (("cores", cores), ("memory", memory)) if value is None]
    if missing:
        raise ValueError(
            f"cluster={system!r} needs the cores and memory of one job, and {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} neither given nor set in the dask config "
            f"({', '.join(f'{section}.{m}' for m in missing)}): pass e.g. "
            f"connect(cluster={system!r}, cores=1, memory='4GiB'), or set them in "
            f"~/.config/dask/jobqueue.yaml (or DASK_{section.upper().replace('.', '__')}__CORES=1 "
            f"and ...__MEMORY=4GiB)"
        )

    job_kwargs = {**_with_worker_malloc(kwargs, section), "cores": cores, "memory": memory}
    if security is not None:
        job_kwargs["security"] = security
    cluster = cls(**job_kwargs)  # starts the scheduler in this process; submits nothing yet
    try:
        if not quiet:
            print(f"dmlkit: {cls.__name__} ({source}={system!r}), {jobs} job{'s' * (jobs != 1)} "
                  f"of this script:\n{cluster.job_script()}", flush=True)
        command = shlex.split(cls.job_cls.submit_command)[0]
        if jobs and shutil.which(command) is None:
            raise ClusterStartError(
                f"cluster={system!r} submits its jobs with {command!r}, which is not on PATH: run "
                f"this on a login node of the {system.upper()} cluster (or where its client "
                "commands are installed)"
            )
        client = ClusterClient(cluster, timeout=timeout)
    except BaseException:
        cluster.close()
        raise
    try:
        if jobs:
            _submit_jobs(cluster, system, jobs)
            _wait_for_batch_workers(client, cluster, system, jobs, worker_timeout,
                                    cores=cores, memory=memory)
            if check_versions:
                _check_versions(client, f"{cluster.scheduler_address} ({cls.__name__})", timeout)
    except BaseException:
        client.close()  # also closes the cluster: cancels the jobs
        raise
    return client


class _DropReported(logging.Filter):
    """Drops tornado's log of an exception that connect() re-raises with a clearer message."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not getattr(exc, "_dmlkit_reported", False)


def _with_worker_malloc(kwargs: Mapping[str, Any], section: str) -> dict:
    """The batch cluster's keyword arguments, with a job script that exports dmlkit's
    malloc settings (:data:`dmlkit._local.WORKER_MALLOC`) before starting the workers.

    A job's nanny gives its worker processes the variables of its own environment
    over dask's defaults (``MALLOC_TRIM_THRESHOLD_=65536``), so the worker kernels get the
    same memory behaviour as on dmlkit's LocalCluster. Nothing is added when the user
    configured malloc (dask config, this process's environment, or a prologue line
    that mentions it) or passes the deprecated ``env_extra``.
    """
    import dask

    from dmlkit._local import WORKER_MALLOC, _malloc_configured

    if "env_extra" in kwargs or dask.config.get(f"{section}.env-extra", None):
        return dict(kwargs)  # dask-jobqueue would drop env_extra for our prologue
    prologue = kwargs.get("job_script_prologue")
    if prologue is None:
        prologue = dask.config.get(f"{section}.job-script-prologue", None) or []
    prologue = list(prologue)
    environ = dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}
    if _malloc_configured(environ) or any("MALLOC_" in str(line) for line in prologue):
        return dict(kwargs)
    exports = [f"export {name}={value}" for name, value in WORKER_MALLOC.items()]
    return {**kwargs, "job_script_prologue": prologue + exports}


def _submit_jobs(cluster: Any, system: str, jobs: int) -> None:
    """Scale to ``jobs`` and wait until the batch system accepted (or refused) every job."""

    async def scale_and_submit() -> None:
        # On the cluster's event loop, so that the submission the scale schedules is
        # the one awaited here: a refused job then raises instead of only being logged.
        cluster.scale(jobs=jobs)
        correct_state = getattr(cluster, "_correct_state", None)
        if correct_state is not None:
            try:
                await correct_state()
            except Exception as exc:
                # The scale's own callback awaits the same submission after us and would
                # log its traceback next to the ClusterStartError: mark it as reported.
                exc._dmlkit_reported = True  # type: ignore[attr-defined]
                raise

    logger = logging.getLogger("tornado.application")
    if not any(isinstance(f, _DropReported) for f in logger.filters):
        logger.addFilter(_DropReported())
    try:
        cluster.sync(scale_and_submit)
    except Exception as exc:
        from distributed.core import Status

        for job in cluster.workers.values():  # refused: never started, so closing must skip it
            if getattr(job, "job_id", "") is None and job.status == Status.created:
                job.status = Status.failed
        text = str(exc)
        reason = text.split("stderr:", 1)[1] if "stderr:" in text else text
        reason = "; ".join(line.strip() for line in reason.splitlines() if line.strip())
        raise ClusterStartError(
            f"cluster={system!r}: the batch system refused the worker jobs: {reason or repr(exc)}. "
            "Check the job script printed above against what the queue allows (cores, memory, "
            "walltime, queue/partition, account): a job asking more than any node has is refused"
        ) from exc


def _job_ids(cluster: Any) -> list[str]:
    return [str(job.job_id) for job in cluster.workers.values() if getattr(job, "job_id", None)]


def _slurm_states(job_ids: list[str]) -> dict[str, str] | None:
    """``{job id: "STATE (reason)"}`` for the jobs still in SLURM's queue; None if squeue fails."""
    if not job_ids:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:  # all the jobs have left the queue: "Invalid job id specified"
        return {} if "invalid job id" in out.stderr.lower() else None
    states = {}
    for line in out.stdout.splitlines():
        job_id, state, reason = (line.split(maxsplit=2) + ["", ""])[:3]
        states[job_id] = f"{state} ({reason})" if reason and reason != "None" else state
    return states


#: SLURM job states in which a job may still start a worker.
_SLURM_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
                 "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def _job_log_tail(log_directory: str | None, job_ids: list[str], lines: int = 3) -> str:
    """`` Job <id> wrote: ...`` from the first job's error log, or ""."""
    if not log_directory or not job_ids:
        return ""
    import glob

    folder = os.path.expanduser(log_directory)
    for path in sorted(glob.glob(os.path.join(glob.escape(folder), f"*{job_ids[0]}.err"))):
        try:
            with open(path, errors="replace") as f:
                tail = [line.strip() for line in f.read().splitlines() if line.strip()][-lines:]
        except OSError:
            continue
        if tail:
            return f" Job {job_ids[0]} wrote ({path}): {' | '.join(tail)}."
    return ""


def _wait_for_batch_workers(client: Client, cluster: Any, system: str, jobs: int,
                            worker_timeout: float, *, cores: Any, memory: Any) -> None:
    """Wait for the workers of all jobs; ClusterStartError saying why if they do not come."""
    expected = jobs * cluster._dummy_job.worker_processes
    start = time.monotonic()
    next_check = start + 2
    while (n := len(client.nthreads())) < expected:
        now = time.monotonic()
        if now - start > worker_timeout:
            reason = f"only {n} of {expected} workers connected within worker_timeout={worker_timeout:g} s"
            break
        if system == "slurm" and now >= next_check:
            next_check = now + 2
            states = _slurm_states(_job_ids(cluster))
            if states is not None and not any(s.split()[0] in _SLURM_ACTIVE for s in states.values()):
                reason = (f"the jobs ended after {now - start:.0f} s with only {n} of "
                          f"{expected} workers connected")
                break
        time.sleep(0.2)
    else:
        return
    ids = _job_ids(cluster)
    states = _slurm_states(ids) if system == "slurm" else None
    queue = (", ".join(f"{i} {states.get(i, 'gone')}" for i in ids) if states is not None
             else ", ".join(ids) or "none")
    log_directory = getattr(cluster._dummy_job, "log_directory", None)
    logs = log_directory or f"{os.getcwd()} (the submission folder)"
    said = _job_log_tail(log_directory, ids)
    raise ClusterStartError(
        f"cluster={system!r}: {reason}; jobs: {queue}.{said} Check that the jobs start (squeue / "
        f"qstat), their output in {logs}, that one job fits a node (cores={cores!r}, memory={memory!r}), "
        f"and that the compute nodes reach the scheduler at {cluster.scheduler_address} "
        "(scheduler_options={'host': ...} or interface= in jobqueue.yaml). The jobs are cancelled"
    )
