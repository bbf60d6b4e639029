"""A streamed pass without Dask: each core reads its chunks from the store and runs the kernel.

A streamed pass reads every chunk of X from the store and runs the kernel on
it, both on the worker thread that holds the chunk's task. This does the same
work with no scheduler at all: ``--workers`` processes (one per core), each
reading its share of the chunks of the ``kmeans`` and ``logreg`` benchmarks'
stores (generated here with the same arguments when missing) as dmlkit's
streamed passes read them (``dmlkit._store``'s direct reads of uncompressed
chunk files, into a reused buffer) and running a kernel on each chunk just read, all processes at once (a barrier starts every
round), one thread for BLAS. A round reading only is the raw read; the ratio
of a round with a kernel to it is what the kernel costs on top of the reads
when every core is busy, with Dask's share of a pass left out. Every round
runs each kind of pass in turn; best of ``--repeat`` rounds each; the table puts the ratio next to the one the last
``kmeans`` and ``logreg`` runs measured through Dask (``results/*.json``).

    python -m benchmarks floor
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, markdown_table

#: What each round does to every chunk it reads: store, kernel. The ``held`` and ``stats``
#: modes read nothing: they run the Lloyd kernel, or the data checks of a fit's first pass
#: (:func:`dmlkit._kernels.stats.data_stats`), over the process's chunks held in memory,
#: as a cached fit's passes do, row-major (as the store holds them) and feature-major (as
#: dmlkit's cached copy for K-means holds them).
MODES = {"read": ("blobs", None), "lloyd": ("blobs", "lloyd"),
         "read_classification": ("classification", None),
         "newton": ("classification", "newton"), "gradient": ("classification", "gradient"),
         "held_rows": ("held_rows", "lloyd"), "held_features": ("held_features", "lloyd"),
         "stats_rows": ("held_rows", "stats"), "stats_features": ("held_features", "stats")}


def _worker(rank: int, args: dict, barrier, out) -> None:
    """One core's share of every round: the chunks ``rank, rank + workers, ...``."""
    from threadpoolctl import threadpool_limits
    import zarr

    from dmlkit import _store
    from dmlkit._kernels.glm import glm_partial
    from dmlkit._kernels.kmeans import lloyd_partial, to_feature_major
    from dmlkit._kernels.stats import data_stats

    stores = {name: zarr.open_group(path, mode="r") for name, path in args["stores"].items()}
    centers, theta, every = (np.asarray(args["centers"]), np.asarray(args["theta"]),
                             args["hessian_every"])
    X0 = stores["blobs"]["X"]
    rows, n = X0.chunks[0], X0.shape[0]
    mine = range(rank, -(-n // rows), args["workers"])
    y = {c: np.asarray(stores["classification"]["y"][c * rows:(c + 1) * rows]).astype(np.int64)
         for c in mine}  # y stays in memory while X streams, as in dmlkit's fits
    held = {"held_rows": {c: np.asarray(X0[c * rows:(c + 1) * rows]) for c in mine}}
    held["held_features"] = {c: to_feature_major(b) for c, b in held["held_rows"].items()}

    def kernel(name, X, c):
        if name == "lloyd":
            return lloyd_partial(X, None, c * rows, centers)
        if name == "stats":
            return data_stats(X, None, c * rows)
        return glm_partial(X, None, c * rows, y=y[c], theta=theta, family="binomial",
                           fit_intercept=True, hessian=name == "newton", hessian_every=every)

    times = {mode: np.inf for mode in MODES}
    with threadpool_limits(limits=1):
        # the modes in turn, round after round: the machine's drifting speed weighs on all
        for _ in range(args["repeat"] + 1):  # the first round warms up
            for mode, (store, name) in MODES.items():
                if store in held:
                    barrier.wait()
                    t0 = time.perf_counter()
                    for c in mine:
                        kernel(name, held[store][c], c)
                    times[mode] = min(times[mode], time.perf_counter() - t0)
                    continue
                X = stores[store]["X"]
                source = _store.source_of(X)  # read as dmlkit's streamed passes read it
                barrier.wait()
                t0 = time.perf_counter()
                for c in mine:
                    start, stop = c * rows, min((c + 1) * rows, n)
                    run = (lambda block: None) if name is None else (
                        lambda block: kernel(name, block, c))
                    if source is None:
                        run(X[start:stop])
                    else:
                        _store.with_rows(source, start, stop, run)
                times[mode] = min(times[mode], time.perf_counter() - t0)
    out.put((rank, times))


def run(args: argparse.Namespace) -> dict:
    import zarr

    from dmlkit.datasets import make_blobs, make_classification
    from dmlkit.linear_model import hessian_every

    data = Path(args.data)
    blobs = data / f"bench-blobs-{args.rows}x{args.features}.zarr"
    if not blobs.exists():
        print(f"generating {blobs} ...", flush=True)
        make_blobs(str(blobs), args.rows, args.features, centers=args.k, cluster_std=20.0,
                   chunk_rows=args.chunk_rows, random_state=0)
    classif = data / f"bench-classification-{args.rows}x{args.features}-k2.zarr"
    if not classif.exists():
        print(f"generating {classif} ...", flush=True)
        make_classification(str(classif), args.rows, args.features, n_classes=2,
                            chunk_rows=args.chunk_rows, random_state=0)
    Xb = zarr.open_group(str(blobs), mode="r")["X"]
    rng = np.random.default_rng(1)  # the kmeans benchmark's initial centres
    centers = np.asarray(Xb[np.sort(rng.choice(Xb.shape[0], args.k, replace=False))],
                         dtype=np.float64)
    p = args.features + 1
    shared = {"stores": {"blobs": str(blobs), "classification": str(classif)},
              "centers": centers.tolist(),
              "theta": (np.random.default_rng(0).standard_normal(p) * 0.1).tolist(),
              "hessian_every": hessian_every("binomial", args.rows, p),
              "workers": args.workers, "repeat": args.repeat}
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.workers), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, shared, barrier, out))
             for r in range(args.workers)]
    for proc in procs:
        proc.start()
    per_worker = dict(out.get() for _ in procs)
    for proc in procs:
        proc.join()
    # a pass ends when its slowest core does
    wall = {mode: max(t[mode] for t in per_worker.values()) for mode in MODES}
    chunks = -(-args.rows // int(Xb.chunks[0]))
    results = {"config": {**vars(args), "chunk_rows": int(Xb.chunks[0]), "chunks": chunks,
                          "hessian_every": shared["hessian_every"]},
               "machine": machine(), "pass_seconds": wall,
               "per_worker_seconds": {str(k): v for k, v in per_worker.items()},
               "ratio": {"lloyd": wall["lloyd"] / wall["read"],
                         "newton": wall["newton"] / wall["read_classification"],
                         "gradient": wall["gradient"] / wall["read_classification"],
                         "held_rows_vs_features": wall["held_rows"] / wall["held_features"],
                         "stats_rows_vs_features": wall["stats_rows"] / wall["stats_features"]}}
    measured = {}
    for name, key, kernel in (("kmeans", "streaming_iter_vs_direct_read", "lloyd"),
                              ("logreg", "streaming_pass_vs_direct_read", "newton")):
        f = Path(args.results) / f"{name}.json"
        if f.exists():
            value = json.loads(f.read_text()).get("summary", {}).get(key)
            if value is not None:
                measured[kernel] = value
    results["measured_through_dask"] = measured
    for mode, secs in wall.items():
        print(f"  {mode:<20s} {1e3 * secs:7.1f} ms a pass", flush=True)
    return results


def report(results: dict) -> str:
    cfg, m, wall, ratio = (results["config"], results["machine"], results["pass_seconds"],
                           results["ratio"])
    measured = results.get("measured_through_dask", {})
    rows = []
    for kernel, label, read in (
            ("lloyd", f"K-means Lloyd step (k={cfg['k']})", "read"),
            ("newton", f"logistic Newton pass (Hessian from 1 row in {cfg['hessian_every']})",
             "read_classification"),
            ("gradient", "logistic loss and gradient (an L-BFGS or gd pass)",
             "read_classification")):
        per_chunk = 1e3 * (wall[kernel] - wall[read]) * cfg["workers"] / cfg["chunks"]
        rows.append([label, f"{1e3 * wall[read]:.0f}", f"{1e3 * wall[kernel]:.0f}",
                     f"{per_chunk:.1f}", f"{ratio[kernel]:.2f}x",
                     f"{measured[kernel]:.2f}x" if kernel in measured else ""])
    lines = [f"A streamed pass without Dask: {cfg['rows']:,} x {cfg['features']} float32 in "
             f"{cfg['chunks']} chunks of {cfg['chunk_rows']:,} rows, read from the `kmeans` and "
             f"`logreg` benchmarks' stores by {cfg['workers']} processes at once (one thread "
             f"each), each kind of pass in turn, best of {cfg['repeat']} rounds; {m['cpu']}, {m['cores']} cores; numpy "
             f"{m['numpy']}.",
             "",
             markdown_table(["pass", "read only (ms)", "read and kernel (ms)",
                             "kernel per chunk (ms)", "pass / read, no Dask",
                             "streamed pass / direct read, through Dask (last run)"], rows),
             "",
             "- a pass's time is its slowest process's; the kernel runs on each chunk just "
             "read (page-cached, uncompressed bytes copied out of the store's chunk files "
             "into a reused buffer, as dmlkit's streamed passes read them), `y` held in "
             "memory as dmlkit's fits hold it while X streams.",
             "- the last column comes from `results/kmeans.json` and `results/logreg.json`: "
             "the same machine, not the same moment."]
    if "stats_features" in wall:
        per_chunk = cfg["workers"] / cfg["chunks"]
        held = [[label, f"{1e3 * wall[lloyd]:.0f}", f"{1e3 * wall[lloyd] * per_chunk:.1f}",
                 f"{1e3 * wall[stats]:.0f}", f"{1e3 * wall[stats] * per_chunk:.1f}"]
                for lloyd, stats, label in (
                    ("held_rows", "stats_rows", "row-major (as the store holds them)"),
                    ("held_features", "stats_features", "feature-major (dmlkit's cached copy)"))]
        lines += ["",
                  f"A cached pass without Dask: the K-means Lloyd step (k={cfg['k']}), and the "
                  "data checks that a fit's first pass adds (`data_stats`: NaN and inf, column "
                  f"sums and spread, squared norms), over the same chunks held in memory by the "
                  f"same {cfg['workers']} processes, in each layout in turn:",
                  "",
                  markdown_table(["chunks held", "Lloyd pass (ms)", "Lloyd per chunk (ms)",
                                  "data checks pass (ms)", "data checks per chunk (ms)"], held),
                  "",
                  f"- row-major / feature-major: Lloyd {ratio['held_rows_vs_features']:.2f}x, "
                  f"data checks {ratio['stats_rows_vs_features']:.2f}x"]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--chunk-rows", type=int, default=125_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--data", default="data")
