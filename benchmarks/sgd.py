"""Stochastic gradient descent side by side: loss per epoch and time to 1% of the optimum.

All contenders minimise scikit-learn's SGD objective, the mean log loss plus
``alpha ||coef||^2 / 2``, on the same float32 data (a Zarr store generated
once). The optimum ``f*`` is the lower of two tight full-batch solves
(dmlkit Newton and scikit-learn L-BFGS, ``C = 1 / (alpha n)``). The model
after ``k`` epochs is the model of a fit with ``max_epochs=k`` (``max_iter``
for scikit-learn; ``k`` passes of ``partial_fit`` for dask-ml): each is timed
from the start, so "seconds" is the time to have made ``k`` passes, reading
included where dmlkit fits from the Zarr path (the fastest of ``--repeat``
fits, for every contender); the first dmlkit row fits data
already held in the workers' memory, as scikit-learn's is in its process.
dask-ml's Incremental shuffles the order of the blocks: it runs with
``--dask-ml-seeds`` (each its own curve) and the comparison takes the median
seed's time to 1%.
Every objective is recomputed here in float64 on the in-memory data.

    python -m benchmarks sgd                    # 2,000,000 x 32, 3 epochs
    python -m benchmarks sgd --rows 200000      # quicker
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

from benchmarks._common import machine, markdown_table, timed
from benchmarks.kmeans import raw_read_seconds
from benchmarks.logreg import objective

#: "Within 1% of the optimum": objective <= f* (1 + TARGET).
TARGET = 0.01


def run(args: argparse.Namespace) -> dict:
    import dask.array as da
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression as SKLogReg
    from sklearn.linear_model import SGDClassifier as SKSGD
    from threadpoolctl import threadpool_limits

    import dmlkit
    from dmlkit.datasets import make_classification

    path = Path(args.data) / f"bench-classification-{args.rows}x{args.features}-k2.zarr"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        make_classification(str(path), args.rows, args.features, n_classes=2,
                            chunk_rows=args.chunk_rows, random_state=0)
    ds = dmlkit.open_zarr(path)
    X, y = ds["X"].values, ds["y"].values
    n = X.shape[0]
    alpha = args.alpha
    C = 1.0 / (alpha * n)
    results: dict = {"config": {**vars(args), "nbytes": int(X.nbytes), "target": TARGET},
                     "machine": machine(), "curves": {}}

    def f_of(coef, intercept):
        return objective(X, y, coef, intercept, C)

    warnings.simplefilter("ignore", ConvergenceWarning)
    with threadpool_limits(limits=args.workers):
        secs, ref = timed(lambda: SKLogReg(C=C, tol=1e-10, max_iter=1000).fit(X, y))
    f_sk = f_of(ref.coef_, ref.intercept_)
    print(f"  scikit-learn full-batch lbfgs tol=1e-10: {secs:.2f} s, f {f_sk:.10g}", flush=True)

    def curve(name, fits):
        """``fits(k)`` -> (seconds, coef, intercept) after k epochs, for k = 1..epochs; the
        fastest of ``--repeat`` fits (every fit gives the same model: they are seeded)."""
        rows = []
        for k in range(1, args.epochs + 1):
            runs = [fits(k) for _ in range(args.repeat)]
            seconds, coef, intercept = min(runs, key=lambda r: r[0])
            f = f_of(coef, intercept)
            rows.append({"epochs": k, "seconds": seconds, "objective": f})
            print(f"  {name:<34s} epoch {k}: {seconds:7.2f} s  f {f:.6f}", flush=True)
        results["curves"][name] = rows
        return rows

    # ------------------------------------------------------------ scikit-learn
    def sk_fit(k):
        m = SKSGD(loss="log_loss", alpha=alpha, max_iter=k, tol=None, random_state=0)
        with threadpool_limits(limits=args.workers):
            seconds, _ = timed(lambda: m.fit(X, y))
        return seconds, m.coef_, m.intercept_

    curve("scikit-learn SGDClassifier", sk_fit)

    client = dmlkit.connect("local", n_workers=args.workers, threads_per_worker=1, quiet=True)
    try:
        results["raw_read_seconds"] = raw_read_seconds(str(path))
        print(f"  raw read of X from Zarr: {results['raw_read_seconds']:.3f} s", flush=True)
        # warm the workers up (imports of dmlkit.sgd, scipy, sklearn) on a tiny fit
        dmlkit.SGDClassifier(max_epochs=1, tol=None).fit(X[:20_000], y[:20_000])

        # the data in the workers' memory, as scikit-learn's is in its process's
        Xd = da.from_zarr(str(path / "X")).rechunk({0: args.chunk_rows})
        yd = da.from_zarr(str(path / "y")).rechunk(args.chunk_rows)
        Xd, yd = client.persist([Xd, yd])
        client.wait_for_workers(args.workers)
        from distributed import wait
        wait([Xd, yd])

        for mode, source in (("local", "memory"), ("local", "zarr"), ("sync", "zarr")):
            def dm_fit(k, mode=mode, source=source):
                m = dmlkit.SGDClassifier(alpha=alpha, mode=mode, max_epochs=k, tol=None,
                                         random_state=0, cache=True,
                                         learning_rate=args.learning_rate,
                                         sync_every=args.sync_every, shard_rows=args.chunk_rows)
                data = (Xd, yd) if source == "memory" else (str(path),)
                seconds, _ = timed(lambda: m.fit(*data))
                return seconds, m.coef_, m.intercept_

            where = ("data in the workers' memory" if source == "memory"
                     else "from the Zarr path, reading included")
            curve(f"dmlkit SGDClassifier mode={mode} ({where})", dm_fit)

        if not args.skip_dask_ml:
            from dask_ml.wrappers import Incremental

            # Incremental shuffles the order of the blocks: seeded, so that each curve is one
            # model's, and over several seeds, which reach 1% after different epochs
            for seed in args.dask_ml_seeds:
                def dask_ml_fit(k, seed=seed):
                    inc = Incremental(SKSGD(loss="log_loss", alpha=alpha, tol=None,
                                            random_state=0), random_state=seed)

                    def passes():
                        for _ in range(k):
                            inc.partial_fit(Xd, yd, classes=[0, 1])
                    seconds, _ = timed(passes)
                    return seconds, inc.estimator_.coef_, inc.estimator_.intercept_

                curve(f"dask-ml Incremental(SGDClassifier) random_state={seed}", dask_ml_fit)

        # the full-batch optimum, last: after a cached full-batch fit, SGD rounds on the
        # same workers ran 2-3x slower in this benchmark (not understood yet)
        secs, full = timed(lambda: dmlkit.LogisticRegression(C=C, tol=1e-10, cache=True)
                           .fit(str(path)))
        f_dm = f_of(full.coef_, full.intercept_)
        print(f"  dmlkit full-batch newton tol=1e-10: {secs:.2f} s, f {f_dm:.10g}", flush=True)
        results["f_star"] = f_star = min(f_sk, f_dm)
        secs, full = timed(lambda: dmlkit.LogisticRegression(C=C, cache=True).fit(str(path)))
        results["full_batch"] = {"method": "dmlkit LogisticRegression (newton, tol=1e-6)",
                                 "seconds": secs, "passes": full.n_passes_,
                                 "objective": f_of(full.coef_, full.intercept_)}

    finally:
        client.close()

    # ------------------------------------------------------------------ summary
    summary = {}
    for name, rows in results["curves"].items():
        hit = next((r for r in rows if r["objective"] <= f_star * (1 + TARGET)), None)
        summary[name] = {"epochs_to_target": None if hit is None else hit["epochs"],
                         "seconds_to_target": None if hit is None else hit["seconds"]}
    results["summary"] = summary
    return results


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(results: dict) -> str:
    cfg, m = results["config"], results["machine"]
    f_star = results["f_star"]
    lines = [f"## SGD: {cfg['rows']:,} x {cfg['features']} float32, binary log loss, "
             f"alpha={cfg['alpha']:g}, {cfg['workers']} workers",
             "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; numpy "
             f"{m['numpy']}, dask {m['dask']}, scikit-learn {m['sklearn']}. Optimum f* = "
             f"{f_star:.8f} (full-batch). Raw read of X from Zarr: "
             f"{results['raw_read_seconds']:.2f} s. Each time is the fastest of "
             f"{cfg.get('repeat', 1)} fits.",
             ""]
    epochs = range(1, cfg["epochs"] + 1)
    header = ["method"] + [f"epoch {k}: gap, s" for k in epochs] + ["epochs to 1%", "s to 1%"]
    rows = []
    for name, curve in results["curves"].items():
        s = results["summary"][name]
        rows.append([name] + [f"{(r['objective'] - f_star) / f_star:+.2%}, {r['seconds']:.2f}"
                              for r in curve]
                    + [_fmt(s["epochs_to_target"], "d"), _fmt(s["seconds_to_target"], ".2f")])
    lines.append(markdown_table(header, rows))
    fb = results["full_batch"]
    lines += ["", f"For scale: {fb['method']} reaches gap "
              f"{(fb['objective'] - f_star) / f_star:+.1e} in {fb['seconds']:.2f} s "
              f"({fb['passes']} passes)."]
    sk = results["summary"].get("scikit-learn SGDClassifier", {})
    loc = results["summary"].get(
        "dmlkit SGDClassifier mode=local (data in the workers' memory)", {})
    if sk.get("seconds_to_target") and loc.get("seconds_to_target"):
        lines.append(f"Time to 1%: scikit-learn / dmlkit local (in memory) = "
                     f"{sk['seconds_to_target'] / loc['seconds_to_target']:.2f}x.")
    dm = {name: s for name, s in results["summary"].items() if name.startswith("dask-ml")}
    if dm and loc.get("seconds_to_target"):
        # a seed that does not reach 1% counts as slower than every one that does
        times = sorted(s["seconds_to_target"] or np.inf for s in dm.values())
        median = times[len(times) // 2]
        each = ", ".join(f"{t:.2f} s" if np.isfinite(t) else "not reached" for t in times)
        lines.append(f"Time to 1%: dask-ml (median over its {len(times)} seeds: {each}) / dmlkit "
                     f"local (in memory) = {median / loc['seconds_to_target']:.1f}x."
                     if np.isfinite(median) else
                     f"dask-ml's median seed did not reach 1% in {cfg['epochs']} epochs ({each}).")
    lines.append("")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--chunk-rows", type=int, default=100_000)
    p.add_argument("--alpha", type=float, default=1e-4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--learning-rate", default="invscaling")
    p.add_argument("--sync-every", type=float, default=0.25)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data", default="data")
    p.add_argument("--skip-dask-ml", action="store_true")
    p.add_argument("--dask-ml-seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="random_state of dask-ml's Incremental (the order of the blocks)")
    p.add_argument("--repeat", type=int, default=2,
                   help="fits per contender and number of epochs; the fastest is reported")
