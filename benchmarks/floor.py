"""Per-chunk CPU cost of reading X from the store and of each pass's kernel, in one thread.

A streamed pass reads every chunk from the store and runs the kernel on it,
both on the same worker thread. With every core busy it therefore takes at
least a raw read (the same reads, in the same tasks) plus the kernel's time
for the chunks of one worker thread: ``1 + kernel x chunks per thread / raw
read`` times a raw read, whatever the scheduling. This measures the kernels
(and the reads) on the stores of the ``kmeans`` and ``logreg`` benchmarks
(generated here with the same arguments when missing): CPU time
(``time.process_time``), one thread for BLAS, best of ``--repeat`` per
chunk, median over the first ``--chunks`` chunks; no Dask. The raw read's
wall time and the measured streamed ratio come from those benchmarks'
results (``results/kmeans.json``, ``results/logreg.json``), when present.

    python -m benchmarks floor
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, markdown_table


def _cpu_ms(fn, repeat: int) -> float:
    fn()  # warm: first-touch page faults and caches
    best = np.inf
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return 1e3 * best


def run(args: argparse.Namespace) -> dict:
    import zarr
    from threadpoolctl import threadpool_limits

    from dmlkit._kernels.glm import glm_partial
    from dmlkit._kernels.kmeans import lloyd_partial
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
    group = zarr.open_group(str(classif), mode="r")
    Xc, yc = group["X"], group["y"]
    rng = np.random.default_rng(1)
    centers = np.asarray(Xb[np.sort(rng.choice(Xb.shape[0], args.k, replace=False))],
                         dtype=np.float64)
    p = args.features + 1
    every = hessian_every("binomial", Xc.shape[0], p)
    theta = np.random.default_rng(0).standard_normal(p) * 0.1
    rows = Xb.chunks[0]
    per_chunk: dict[str, list[float]] = {k: [] for k in (
        "read_blobs", "lloyd", "read_classification", "newton", "gradient")}
    with threadpool_limits(limits=1):
        for c in range(min(args.chunks, -(-Xb.shape[0] // rows))):
            s, e = c * rows, min((c + 1) * rows, Xb.shape[0])
            per_chunk["read_blobs"].append(_cpu_ms(lambda: Xb[s:e], args.repeat))
            X = Xb[s:e]
            per_chunk["lloyd"].append(
                _cpu_ms(lambda: lloyd_partial(X, None, s, centers), args.repeat))
            per_chunk["read_classification"].append(_cpu_ms(lambda: Xc[s:e], args.repeat))
            X, y = Xc[s:e], np.asarray(yc[s:e]).astype(np.int64)
            common = dict(y=y, theta=theta, family="binomial", fit_intercept=True)
            per_chunk["newton"].append(_cpu_ms(
                lambda: glm_partial(X, None, s, hessian=True, hessian_every=every, **common),
                args.repeat))
            per_chunk["gradient"].append(
                _cpu_ms(lambda: glm_partial(X, None, s, **common), args.repeat))
            print(f"  chunk {c}: " + ", ".join(f"{k} {v[-1]:.2f} ms"
                                               for k, v in per_chunk.items()), flush=True)
    med = {k: float(np.median(v)) for k, v in per_chunk.items()}
    results = {"config": {**vars(args), "chunk_rows": int(rows), "hessian_every": every},
               "machine": machine(), "per_chunk_ms": per_chunk, "median_ms": med}
    # the raw read and the streamed ratio the end-to-end benchmarks measured
    results_dir = Path(args.results)
    passes = {}
    for name, kernels, key in (("kmeans", ("lloyd",), "streaming_iter_vs_raw_read"),
                               ("logreg", ("newton", "gradient"), "streaming_pass_vs_raw_read")):
        f = results_dir / f"{name}.json"
        if not f.exists():
            continue
        done = json.loads(f.read_text())
        cfg = done["config"]
        per_thread = -(-(-(-cfg["rows"] // cfg["chunk_rows"])) // cfg["workers"])
        for kernel in kernels:
            passes[kernel] = {
                "raw_read_seconds": done["raw_read_seconds"], "chunks_per_thread": per_thread,
                "floor": 1 + 1e-3 * med[kernel] * per_thread / done["raw_read_seconds"],
                "measured": done.get("summary", {}).get(key) if kernel != "gradient" else None}
    results["passes"] = passes
    return results


def report(results: dict) -> str:
    cfg, m, med = results["config"], results["machine"], results["median_ms"]
    names = {"lloyd": ("K-means Lloyd step (k=%d)" % cfg["k"], "read_blobs"),
             "newton": (f"logistic Newton pass (Hessian from 1 row in {cfg['hessian_every']})",
                        "read_classification"),
             "gradient": ("logistic loss and gradient (an L-BFGS or gd pass)",
                          "read_classification")}
    rows = []
    for kernel, (label, read) in names.items():
        p = results.get("passes", {}).get(kernel)
        rows.append([label, f"{med[read]:.2f}", f"{med[kernel]:.2f}"] + (
            ["", "", "", ""] if p is None else
            [str(p["chunks_per_thread"]), f"{1e3 * p['raw_read_seconds']:.0f}",
             f"{p['floor']:.2f}x", "" if p["measured"] is None else f"{p['measured']:.2f}x"]))
    lines = [f"Per-chunk CPU cost of a pass: chunks of {cfg['chunk_rows']:,} x "
             f"{cfg['features']} float32 ({cfg['chunk_rows'] * cfg['features'] * 4 / 1e6:.0f} "
             f"MB) of the `kmeans` and `logreg` benchmarks' stores, one thread, best of "
             f"{cfg['repeat']} per chunk, median of {cfg['chunks']} chunks; {m['cpu']}, "
             f"{m['cores']} cores; numpy {m['numpy']}.",
             "",
             markdown_table(["pass", "read a chunk (ms CPU)", "kernel (ms CPU)",
                             "chunks per worker thread", "raw read (ms, measured)",
                             "least streamed pass / raw read", "measured"], rows),
             "",
             "- read: the chunk sliced from the Zarr array (page-cached, uncompressed bytes "
             "copied out); kernel: the function the pass maps over a chunk.",
             "- least: 1 + kernel x chunks per thread / raw read: a streamed pass does the raw "
             "read's work plus the kernel's on the same threads. The raw read (wall time of "
             "one pass of the reads alone) and the measured ratio are those of the last "
             "`kmeans` and `logreg` runs, on the same machine but not at the same moment."]
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--chunk-rows", type=int, default=125_000)
    p.add_argument("--chunks", type=int, default=4, help="chunks measured (the first ones)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--data", default="data")
