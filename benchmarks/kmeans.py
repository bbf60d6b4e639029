"""K-means side by side: dmlkit (cached, streaming), scikit-learn, dask-ml, raw read.

Every contender starts from the same initial centres and runs the same fixed
number of Lloyd iterations (``tol=0``) on the same float32 data, generated
once into a Zarr store. scikit-learn fits the data in memory with all cores;
dmlkit and dask-ml run on a LocalCluster of ``--workers`` single-threaded
worker processes on the same machine.

    python -m benchmarks kmeans                 # 2,000,000 x 32, k=8, 30 iterations
    python -m benchmarks kmeans --rows 200000   # quicker
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks._common import machine, markdown_table, timed


def _read_rows(X, w, offset, repeat):
    """The cheapest kernel: the chunk is read (and decoded), nothing computed."""
    return X.shape[0]


def _add(a, b):
    return a + b


def raw_read_seconds(path: str, repeat: int = 3, direct: bool = False) -> float:
    """Best of ``repeat`` passes that only read every chunk of X from the store.

    ``direct=False``: through zarr-python (xarray's lazy array), one task per chunk, as
    any Dask graph over the store reads it. ``direct=True``: dmlkit's own reader of
    uncompressed local chunks (``dmlkit._store``), in the same machinery as a fit's
    streamed passes (resident actors on a distributed cluster); NaN where the store
    does not qualify.
    """
    from dmlkit import _graph, data

    X = data.as_matrix(path)
    if getattr(X, "_dmlkit_source", None) is None and direct:
        return float("nan")
    if not direct and hasattr(X, "_dmlkit_source"):
        del X._dmlkit_source
    blocks = _graph.RowBlocks(X)
    best = np.inf
    for i in range(repeat):
        # a parameter that changes gives new keys: the cluster cannot reuse the last result
        t0 = time.perf_counter()
        (n,) = _graph.compute(blocks.reduce(_read_rows, _add, {"repeat": i}, name="read"))
        best = min(best, time.perf_counter() - t0)
    assert n == blocks.X.shape[0]
    return best


def read_rows(results: dict) -> list[tuple[str, float]]:
    """The table rows of the two raw reads: (label, seconds)."""
    return [("raw read of X through zarr (one pass)", results["raw_read_seconds"]),
            ("raw read of X, dmlkit's direct reader (one pass)", results["direct_read_seconds"])]


def run(args: argparse.Namespace) -> dict:
    import dask.array as da
    from sklearn.cluster import KMeans as SKKMeans
    from threadpoolctl import threadpool_limits

    import dmlkit
    from dmlkit.datasets import make_blobs

    path = Path(args.data) / f"bench-blobs-{args.rows}x{args.features}.zarr"
    params = dict(centers=args.k, cluster_std=args.cluster_std, chunk_rows=args.chunk_rows,
                  random_state=0)
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        make_blobs(str(path), args.rows, args.features, **params)
    X = dmlkit.open_zarr(path)["X"].values  # in memory, for scikit-learn
    rng = np.random.default_rng(1)
    init = X[rng.choice(X.shape[0], args.k, replace=False)].astype(np.float64)
    it = args.iters
    results: dict = {"config": {**vars(args), "nbytes": int(X.nbytes)}, "machine": machine(),
                     "rows": []}

    def record(name, seconds, n_iter, inertia, passes=None, note=""):
        row = {"method": name, "seconds": seconds, "n_iter": int(n_iter),
               "seconds_per_iter": seconds / max(n_iter, 1), "inertia": float(inertia),
               "note": note}
        results["rows"].append(row)
        print(f"  {name:<32s} {seconds:8.3f} s  {n_iter:3d} it  inertia {inertia:.6e}  {note}",
              flush=True)
        return row

    def sk_fit(Xs):
        m = SKKMeans(args.k, init=init, n_init=1, max_iter=it, tol=0, algorithm="lloyd")
        with threadpool_limits(limits=args.workers):  # all cores of the machine
            secs, _ = timed(lambda: m.fit(Xs))
        return secs, m

    def dml_fit(cache):
        km = dmlkit.KMeans(args.k, init=init, max_iter=it, tol=0, cache=cache)
        secs, _ = timed(lambda: km.fit(str(path)))
        return secs, km

    if args.float64_reference:
        # the same fit in float64: the inertia every float32 run should approach
        X64 = X.astype(np.float64)
        secs64, sk64 = sk_fit(X64)
        results["float64_inertia"] = float(sk64.inertia_)
        del X64

    client = dmlkit.connect("local", n_workers=args.workers, threads_per_worker=1,
                            quiet=True)
    try:
        read_s = raw_read_seconds(str(path))
        direct_s = raw_read_seconds(str(path), direct=True)
        results["raw_read_seconds"], results["direct_read_seconds"] = read_s, direct_s
        print(f"  raw read of X through zarr: {read_s:.3f} s ({X.nbytes / read_s / 1e9:.2f} GB/s); "
              f"dmlkit's direct reader: {direct_s:.3f} s", flush=True)

        # scikit-learn and dmlkit (cached) in turn, --repeat times: this machine's speed
        # drifts, so each pair is measured side by side and the medians are reported
        pairs = []
        for rep in range(args.repeat):
            sk_s, sk = sk_fit(X)
            dm_s, km = dml_fit(True)
            per_iter = [h["seconds"] for h in km.history_]
            # the first pass of a cached fit also loads the store into the workers
            lloyd = float(np.median(per_iter[1:] if len(per_iter) > 1 else per_iter))
            pairs.append((sk_s, dm_s, lloyd, km))
            print(f"  round {rep + 1}: scikit-learn {1e3 * sk_s / sk.n_iter_:.1f} ms / iteration, "
                  f"dmlkit cached {1e3 * lloyd:.1f} ms / iteration", flush=True)
        results["side_by_side"] = [{"sklearn_seconds_per_iter": a / it, "dmlkit_cached_lloyd_seconds":
                                    c, "dmlkit_cached_fit_seconds": b} for a, b, c, _ in pairs]
        middle = sorted(range(len(pairs)), key=lambda i: pairs[i][0])[len(pairs) // 2]
        ref = record("scikit-learn KMeans (in memory)", pairs[middle][0], sk.n_iter_, sk.inertia_,
                     note=f"{args.workers} threads; median of {args.repeat} fits")
        if "float64_inertia" in results:
            record("scikit-learn KMeans float64 (reference)", secs64, sk64.n_iter_, sk64.inertia_,
                   note="X converted to float64")

        for cache, label in ((True, "dmlkit KMeans (cached)"), (False, "dmlkit KMeans (streaming)")):
            if cache:  # the fit whose Lloyd pass is the median of the rounds
                middle = sorted(range(len(pairs)), key=lambda i: pairs[i][2])[len(pairs) // 2]
                secs, km = pairs[middle][1], pairs[middle][3]
            else:
                secs, km = dml_fit(cache)
            per_iter = [h["seconds"] for h in km.history_]
            # the first pass of a cached fit also loads the store into the workers
            typical = float(np.median(per_iter[1:] if len(per_iter) > 1 else per_iter))
            note = f"{km.n_passes_} passes; first iteration {per_iter[0]:.2f} s"
            row = record(label, secs, km.n_iter_, km.inertia_,
                         note=note + (f"; median of {args.repeat} fits" if cache else ""))
            row["lloyd_seconds_per_iter"] = typical
            row["iteration_seconds"] = per_iter
            row["inertia_rel_diff_vs_sklearn"] = abs(km.inertia_ - sk.inertia_) / sk.inertia_
            if "float64_inertia" in results:
                f64 = results["float64_inertia"]
                row["inertia_rel_diff_vs_float64"] = abs(km.inertia_ - f64) / f64

        if not args.skip_dask_ml:
            try:
                from dask_ml.cluster import KMeans as DMKMeans
            except ImportError as exc:
                print(f"  dask-ml not installed ({exc}); pip install -e '.[bench]'")
            else:
                from distributed import wait

                def rounds(X, where: str, key: str, notes: tuple[str, str]) -> None:
                    # dmlkit and dask-ml in turn, --repeat rounds (this machine's speed drifts
                    # over a run): the ratio of each round is measured side by side
                    fits = []
                    for rep in range(args.repeat):
                        km = dmlkit.KMeans(args.k, init=init, max_iter=it, tol=0)
                        km_s = timed(lambda: km.fit(X))[0]
                        dm = DMKMeans(n_clusters=args.k, init=init, max_iter=it, tol=0)
                        dm_s = timed(lambda: dm.fit(X))[0]
                        fits.append((km_s, km, dm_s, dm))
                        print(f"  round {rep + 1}, {where}: dmlkit {km_s:.2f} s, dask-ml "
                              f"{dm_s:.2f} s: {dm_s / km_s:.1f}x", flush=True)
                    results[key] = [{"dmlkit_seconds": a, "dask_ml_seconds": c}
                                    for a, _, c, _ in fits]
                    for name, i, note in (("dmlkit", 0, notes[0]), ("dask-ml", 2, notes[1])):
                        secs, model = _middle([(f[i], f[i + 1]) for f in fits])
                        record(f"{name} KMeans ({where})", secs, model.n_iter_, model.inertia_,
                               note=f"{note}; median of {args.repeat} fits"
                                    + (", in turn with dmlkit's" if i else ""))

                # both given the same dask array over the Zarr store, as a user passes data
                # that lives in a store: dask-ml reads it every iteration, dmlkit caches it
                rounds(da.from_zarr(str(path), component="X"), "from the Zarr store",
                       "dask_ml_store_rounds", ("the dask array over the store",
                                                "the same dask array"))
                # both on the store's chunks persisted in the workers' memory first (not timed),
                # as dask-ml's documentation advises
                Xd = da.from_zarr(str(path), component="X").persist()
                wait(Xd)
                rounds(Xd, "in the workers' memory", "dask_ml_rounds",
                       ("X persisted first, as for dask-ml", "X persisted first"))
                if not args.skip_default_init:
                    # each library's own initialisation (k-means||, its default), timed too
                    km = dmlkit.KMeans(args.k, max_iter=it, tol=0, random_state=0)
                    secs, _ = timed(lambda: km.fit(Xd))
                    record("dmlkit KMeans, its k-means|| init (in the workers' memory)", secs,
                           km.n_iter_, km.inertia_, note="init included")
                    dm = DMKMeans(n_clusters=args.k, max_iter=it, tol=0, random_state=0)
                    secs, _ = timed(lambda: dm.fit(Xd))
                    record("dask-ml KMeans, its k-means|| init (in the workers' memory)", secs,
                           dm.n_iter_, dm.inertia_, note="init included")
                del Xd
    finally:
        client.close()

    rows = {r["method"]: r for r in results["rows"]}
    cached = rows["dmlkit KMeans (cached)"]
    streaming = rows["dmlkit KMeans (streaming)"]
    summary = {
        "cached_vs_sklearn_per_iter": cached["lloyd_seconds_per_iter"] / ref["seconds_per_iter"],
        "cached_vs_sklearn_per_iter_rounds": [
            r["dmlkit_cached_lloyd_seconds"] / r["sklearn_seconds_per_iter"]
            for r in results["side_by_side"]],
        "streaming_vs_sklearn_per_iter": streaming["lloyd_seconds_per_iter"] / ref["seconds_per_iter"],
        "cached_fit_vs_sklearn_fit": cached["seconds"] / ref["seconds"],
        "streaming_iter_vs_raw_read": streaming["lloyd_seconds_per_iter"] / results["raw_read_seconds"],
        "streaming_iter_vs_direct_read": (streaming["lloyd_seconds_per_iter"]
                                          / results["direct_read_seconds"]),
    }
    if "dask-ml KMeans (in the workers' memory)" in rows:
        rounds = [r["dask_ml_seconds"] / r["dmlkit_seconds"] for r in results["dask_ml_rounds"]]
        summary["dask_ml_fit_vs_in_memory_fit_rounds"] = rounds
        summary["dask_ml_fit_vs_in_memory_fit"] = float(np.median(rounds))
    if "dask_ml_store_rounds" in results:
        rounds = [r["dask_ml_seconds"] / r["dmlkit_seconds"] for r in results["dask_ml_store_rounds"]]
        summary["dask_ml_fit_vs_fit_from_store_rounds"] = rounds
        summary["dask_ml_fit_vs_fit_from_store"] = float(np.median(rounds))
    own = ("dmlkit KMeans, its k-means|| init (in the workers' memory)",
           "dask-ml KMeans, its k-means|| init (in the workers' memory)")
    if all(name in rows for name in own):
        summary["dask_ml_vs_dmlkit_own_init"] = rows[own[1]]["seconds"] / rows[own[0]]["seconds"]
    results["summary"] = summary
    return results


def _middle(fits: list) -> tuple:
    """The median ``(seconds, model)`` of some fits (the upper one of an even number)."""
    return sorted(fits, key=lambda f: f[0])[len(fits) // 2]


def report(results: dict) -> str:
    cfg = results["config"]
    rows = [(r["method"], f"{r['seconds']:.2f}", str(r["n_iter"]),
             f"{1e3 * r.get('lloyd_seconds_per_iter', r['seconds_per_iter']):.1f}",
             f"{r['inertia']:.6e}", r["note"]) for r in results["rows"]]
    rows += [(label, f"{secs:.2f}", "", "", "", "best of 3") for label, secs in read_rows(results)]
    s = results["summary"]
    m = results["machine"]
    lines = [
        f"K-means, {cfg['rows']:,} x {cfg['features']} float32 ({cfg['nbytes'] / 1e6:.0f} MB), "
        f"k={cfg['k']}, {cfg['iters']} iterations from the same initial centres, "
        f"{cfg['workers']} workers x 1 thread; {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']:.0f} GB; dask {m['dask']}, scikit-learn {m['sklearn']}.",
        "",
        markdown_table(["method", "fit (s)", "iterations", "ms / iteration", "inertia", "note"],
                       rows),
        "",
        f"- dmlkit cached vs scikit-learn, time per iteration: {s['cached_vs_sklearn_per_iter']:.2f}x "
        f"(medians of {len(s['cached_vs_sklearn_per_iter_rounds'])} fits each, in turn; per "
        "round: " + ", ".join(f"{r:.2f}x" for r in s["cached_vs_sklearn_per_iter_rounds"])
        + f"; whole fit, loading the store included: {s['cached_fit_vs_sklearn_fit']:.2f}x)",
        f"- dmlkit streaming iteration vs one raw read of the store through zarr: "
        f"{s['streaming_iter_vs_raw_read']:.2f}x; vs one read by dmlkit's direct reader, "
        f"which the streamed passes use: {s['streaming_iter_vs_direct_read']:.2f}x",
        "- ms / iteration: scikit-learn's fit time / iterations; dmlkit's median Lloyd pass "
        "(from `history_`, the first, which loads the store, left out).",
    ]
    if "float64_inertia" in results:
        f64 = results["float64_inertia"]
        diffs = ", ".join(f"{r['method']} {abs(r['inertia'] - f64) / f64:.1e}"
                          for r in results["rows"] if "reference" not in r["method"])
        lines.append(f"- relative inertia difference from the float64 reference: {diffs}")
    for key, both in (("dask_ml_fit_vs_fit_from_store", "given the same dask array over the "
                       "Zarr store"),
                      ("dask_ml_fit_vs_in_memory_fit", "on X persisted in the workers' memory "
                       "first")):
        if key in s:
            lines.append(f"- dask-ml fit time / dmlkit fit time, both {both}: {s[key]:.1f}x "
                         f"(median of {len(s[key + '_rounds'])} rounds, one fit of each in turn; "
                         "per round: " + ", ".join(f"{r:.1f}x" for r in s[key + "_rounds"]) + ")")
    if "dask_ml_vs_dmlkit_own_init" in s:
        lines.append("- the same with each library's own k-means|| initialisation, init "
                     f"included: {s['dask_ml_vs_dmlkit_own_init']:.1f}x (the inertia differs "
                     "with the initial centres)")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=125_000)
    p.add_argument("--cluster-std", type=float, default=20.0,
                   help="overlapping blobs, so that Lloyd runs all iterations")
    p.add_argument("--data", default="data")
    p.add_argument("--skip-dask-ml", action="store_true")
    p.add_argument("--skip-default-init", action="store_true",
                   help="skip the fits with each library's own k-means|| initialisation")
    p.add_argument("--repeat", type=int, default=5,
                   help="rounds of scikit-learn and dmlkit cached fits in turn, and of dmlkit "
                        "and dask-ml fits in turn, from the store and on persisted X (medians "
                        "reported)")
    p.add_argument("--float64-reference", action="store_true",
                   help="also fit scikit-learn on a float64 copy (needs 3x the memory of X)")
