"""K-means on a Zarr store at least as large as the machine's memory, streamed.

Generates (once) the course's ``large`` blobs dataset, 200,000,000 x 32
float32 (25.6 GB), fits ``dmlkit.KMeans`` on the store path with
``cache="auto"`` (which must choose to stream) and records the time of every
pass, the time of one pass that only reads the store, and the largest
resident memory of any worker while it runs.

    python -m benchmarks outofcore                     # the large dataset (about 80 GB free disk)
    python -m benchmarks outofcore --size medium       # a quick check of the script
"""
from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from benchmarks._common import machine, markdown_table, timed


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakMemory:
    """Samples every worker's resident memory in a background thread."""

    def __init__(self, client, every: float = 0.5):
        self.client, self.every, self.peak = client, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max([self.peak, *self.client.run(_rss).values()])
            except Exception:  # a worker restarting: try again next time
                pass
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace) -> dict:
    import psutil

    import dmlkit
    from dmlkit import data
    from dmlkit.datasets import ensure_dataset

    from benchmarks.kmeans import raw_read_seconds

    gen_s, path = timed(lambda: ensure_dataset("blobs", args.size, out=args.data))
    X = data.as_matrix(path)
    total_memory = psutil.virtual_memory().total
    client = dmlkit.connect("local", n_workers=args.workers, threads_per_worker=1, quiet=True)
    try:
        budget = data.memory_budget()
        # a pass that only reads every chunk, through the same machinery as the fit's passes
        # (before and after the fit: this disk's speed varies)
        read_s = raw_read_seconds(path, repeat=1)
        km = dmlkit.KMeans(args.k, init=args.init, max_iter=args.iters, random_state=0,
                           cache="auto")
        with _PeakMemory(client) as mem:
            fit_s, _ = timed(lambda: km.fit(path))
        read_s = [read_s, raw_read_seconds(path, repeat=1)]  # before and after the fit
        worker_limit = min(w["memory_limit"] for w in
                           client.scheduler_info(n_workers=-1)["workers"].values())
    finally:
        client.close()
    iters = [h["seconds"] for h in km.history_]
    return {
        "config": vars(args), "machine": machine(), "path": path,
        "store_bytes": int(X.nbytes), "chunks": len(X.chunks[0]),
        "machine_memory_bytes": int(total_memory), "cache_budget_bytes": int(budget),
        "streamed": bool(X.nbytes > budget), "generate_seconds": gen_s,
        "fit_seconds": fit_s, "n_passes": km.n_passes_, "n_iter": km.n_iter_,
        "iteration_seconds": iters, "median_iteration_seconds": float(np.median(iters)),
        "read_gb_per_s": X.nbytes / float(np.median(iters)) / 1e9,
        "raw_read_seconds": min(read_s), "raw_read_seconds_before_after": read_s,
        "iteration_vs_raw_read": float(np.median(iters)) / min(read_s),
        "peak_worker_rss_bytes": int(mem.peak), "worker_memory_limit_bytes": int(worker_limit),
        "inertia": km.inertia_,
    }


def report(r: dict) -> str:
    gb = 1e9
    rows = [
        ("store (X)", f"{r['store_bytes'] / gb:.1f} GB in {r['chunks']} chunks"),
        ("machine memory", f"{r['machine_memory_bytes'] / gb:.1f} GB"),
        ("cache='auto' chose", "streaming from Zarr" if r["streamed"] else "caching in memory"),
        ("fit", f"{r['fit_seconds']:.0f} s, {r['n_passes']} passes, {r['n_iter']} Lloyd iterations"),
        ("Lloyd iteration (median)", f"{r['median_iteration_seconds']:.1f} s "
                                     f"({r['read_gb_per_s']:.2f} GB/s of X)"),
        ("raw read of X (one pass, nothing computed; before / after the fit)",
         " / ".join(f"{t:.1f} s ({r['store_bytes'] / t / gb:.2f} GB/s)"
                    for t in r["raw_read_seconds_before_after"])),
        ("Lloyd iteration / raw read", f"{r['iteration_vs_raw_read']:.2f}x"),
        ("largest worker resident memory", f"{r['peak_worker_rss_bytes'] / gb:.2f} GB "
                                           f"(limit {r['worker_memory_limit_bytes'] / gb:.1f} GB)"),
    ]
    m = r["machine"]
    return (f"Out-of-core K-means ({r['config']['size']} blobs, k={r['config']['k']}, "
            f"init={r['config']['init']}), {r['config']['workers']} workers x 1 thread; "
            f"{m['cpu']}, {m['cores']} cores.\n\n"
            + markdown_table(["what", "measured"], rows) + "\n")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", default="large", choices=["tiny", "small", "medium", "large"])
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--init", default="random")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="data")
