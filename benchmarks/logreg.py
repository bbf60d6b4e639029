"""Logistic regression side by side: time to the optimum for dmlkit, scikit-learn, dask-ml.

Every contender minimises the same L2-penalised log loss (``C=1``) on the same
float32 data, generated once into a Zarr store. The reference optimum ``f*``
is the lowest objective of two tightly converged fits (scikit-learn L-BFGS
with ``tol=1e-10`` and dmlkit Newton, L-BFGS for more than two classes, with
``tol=1e-10``). Every final objective is recomputed here with NumPy in
float64 on the in-memory data, in dmlkit's scale (mean log loss plus
``||coef||^2 / (2 C n)``), so all of them are comparable.

    python -m benchmarks logreg                   # 2,000,000 x 32, two classes
    python -m benchmarks logreg --classes 4       # multinomial
    python -m benchmarks logreg --rows 200000     # quicker
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import numpy as np

from benchmarks._common import machine, markdown_table, timed
from benchmarks.kmeans import raw_read_seconds, read_rows

#: A fit "reaches f*" once its objective is at most ``f* (1 + REACH)``.
REACH = 1e-6


def objective(X, y, coef, intercept, C: float, rows: int = 250_000) -> float:
    """dmlkit's objective in float64: mean log loss + ``||coef||^2 / (2 C n)``.

    ``coef`` of shape (1, d) means the binary loss with ``y`` in {0, 1}; (K, d)
    the multinomial loss with ``y`` in 0..K-1. ``X`` is converted to float64
    ``rows`` at a time.
    """
    from scipy.special import logsumexp

    coef = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
    n = X.shape[0]
    total = 0.0
    for s in range(0, n, rows):
        Xb = X[s : s + rows].astype(np.float64)
        yb = y[s : s + rows]
        Z = Xb @ coef.T + intercept
        if coef.shape[0] == 1:
            z = Z[:, 0]
            total += float(np.sum(np.logaddexp(0.0, z) - yb * z))
        else:
            total += float(np.sum(logsumexp(Z, axis=1) - Z[np.arange(Z.shape[0]), yb]))
    return total / n + float(np.sum(coef * coef)) / (2.0 * C * n)


def _reach_index(history, f_star):
    """Index of the first iteration whose objective is within ``REACH`` of ``f_star``."""
    for i, h in enumerate(history):
        if h["objective"] <= f_star * (1 + REACH):
            return i
    return None


def run(args: argparse.Namespace) -> dict:
    import dask.array as da
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression as SKLogReg
    from threadpoolctl import threadpool_limits

    import dmlkit
    from dmlkit.datasets import make_classification

    K = args.classes
    path = Path(args.data) / f"bench-classification-{args.rows}x{args.features}-k{K}.zarr"
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        make_classification(str(path), args.rows, args.features, n_classes=K,
                            chunk_rows=args.chunk_rows, random_state=0)
    ds = dmlkit.open_zarr(path)
    X, y = ds["X"].values, ds["y"].values  # in memory, for scikit-learn and the objective
    C = args.C
    results: dict = {"config": {**vars(args), "nbytes": int(X.nbytes), "reach": REACH},
                     "machine": machine(), "rows": []}

    def f_of(coef, intercept):
        return objective(X, y, coef, intercept, C)

    # ------------------------------------------------------------ scikit-learn
    def sk_fit(**kw):
        """The fastest of ``--repeat`` fits (the machine's speed drifts; the fit does not)."""
        best = None
        for _ in range(args.repeat):
            m = SKLogReg(C=C, solver="lbfgs", **kw)
            with threadpool_limits(limits=args.workers), warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                secs, _ = timed(lambda: m.fit(X, y))
            if best is None or secs < best[0]:
                best = (secs, m)
        return best[0], best[1], f_of(best[1].coef_, best[1].intercept_)

    sk_ref = sk_fit(tol=1e-10, max_iter=1000)
    print(f"  scikit-learn tol=1e-10: {sk_ref[0]:.2f} s, {int(np.max(sk_ref[1].n_iter_))} it, "
          f"f {sk_ref[2]:.12g}", flush=True)
    sk_runs = {"1e-4": sk_fit(), "1e-6": sk_fit(tol=1e-6, max_iter=1000)}
    # (the tol=1e-8 fit only when tol=1e-6 does not reach f*: decided below)

    client = dmlkit.connect("local", n_workers=args.workers, threads_per_worker=1, quiet=True)
    try:
        read_s = raw_read_seconds(str(path))
        direct_s = raw_read_seconds(str(path), direct=True)
        results["raw_read_seconds"], results["direct_read_seconds"] = read_s, direct_s
        print(f"  raw read of X through zarr: {read_s:.3f} s; dmlkit's direct reader: "
              f"{direct_s:.3f} s", flush=True)
        # warm the workers up (imports of dmlkit.linear_model, scipy, sklearn) on a tiny fit
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            dmlkit.LogisticRegression(max_iter=5, solver="lbfgs").fit(X[:2000], y[:2000])

        ref_solver = "newton" if K == 2 else "lbfgs"

        def dml_fit(solver, cache, data=None, **kw):
            """The fastest of ``--repeat`` fits, as for scikit-learn."""
            best = None
            for _ in range(args.repeat):
                m = dmlkit.LogisticRegression(C=C, solver=solver, cache=cache, **kw)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    secs, _ = timed(lambda: m.fit(*(data or (str(path),))))
                if best is None or secs < best[0]:
                    best = (secs, m)
            return best[0], best[1], f_of(best[1].coef_, best[1].intercept_)

        dml_ref = dml_fit(ref_solver, True, tol=1e-10, max_iter=args.max_iter)
        print(f"  dmlkit {ref_solver} tol=1e-10: {dml_ref[0]:.2f} s, {dml_ref[1].n_iter_} it, "
              f"f {dml_ref[2]:.12g}", flush=True)
        f_star = min(sk_ref[2], dml_ref[2])
        results["f_star"] = f_star
        results["f_star_from"] = ("scikit-learn lbfgs tol=1e-10" if sk_ref[2] <= dml_ref[2]
                                  else f"dmlkit {ref_solver} tol=1e-10")

        def gap(f):
            return None if f is None else (f - f_star) / f_star

        def record(name, seconds, f, n_iter=None, passes=None, to_f_star=None, note="", **extra):
            row = {"method": name, "seconds": seconds, "objective": f, "rel_gap": gap(f),
                   "n_iter": n_iter, "passes": passes, "seconds_to_f_star": to_f_star,
                   "note": note, **extra}
            results["rows"].append(row)
            print(f"  {name:<40s} {_fmt(seconds, '8.2f'):>8s} s  to f* "
                  f"{_fmt(to_f_star, '8.2f'):>8s} s  gap {_fmt(gap(f), '+.2e'):>9s}  "
                  f"{n_iter} it  {passes} passes  {note}", flush=True)
            return row

        # scikit-learn rows (now that f* is known)
        secs, m, f = sk_ref
        record("scikit-learn lbfgs tol=1e-10 (in memory)", secs, f, int(np.max(m.n_iter_)),
               to_f_star=secs if gap(f) <= REACH else None,
               note=f"{args.workers} threads; reference")
        sk_reach = None
        for tol in ("1e-4", "1e-6", "1e-8"):  # the loosest that reaches f*
            if tol not in sk_runs:
                sk_runs[tol] = sk_fit(tol=float(tol), max_iter=1000)
            if gap(sk_runs[tol][2]) <= REACH:
                sk_reach = tol
                break
        for tol, (secs, m, f) in sk_runs.items():
            default = " (default)" if tol == "1e-4" else ""
            reached = secs if gap(f) <= REACH else None
            record(f"scikit-learn lbfgs tol={tol}{default} (in memory)", secs, f,
                   int(np.max(m.n_iter_)), to_f_star=reached, note=f"{args.workers} threads")
        if sk_reach is None:
            sk_time_to_f_star, sk_reach = sk_ref[0], "1e-10"
        else:
            sk_time_to_f_star = sk_runs[sk_reach][0]
        results["sklearn_time_to_f_star"] = sk_time_to_f_star
        results["sklearn_tol_reaching_f_star"] = sk_reach

        # dmlkit rows
        def dml_record(label, secs, m, f, note=""):
            hist = m.history_
            secs_iter = [h["seconds"] for h in hist]
            i = _reach_index(hist, f_star)
            # the whole fit less the iterations after the one reaching f*: the fit time had
            # the solver stopped there (setup, class pass and cache loading included)
            to = None if i is None else secs - float(sum(secs_iter[i + 1:]))
            # the first iteration of a cached fit also loads the store: left out
            per_pass = [h["seconds"] / h["passes"] for h in hist[1:] or hist if h["passes"]]
            # the same split by the passes' precision: float32 products, or float64 near the
            # optimum (`history_`'s "float64")
            by_kind = {kind: [h["seconds"] / h["passes"] for h in hist[1:] or hist
                              if h["passes"] and h.get("float64", False) == (kind == "float64")]
                       for kind in ("float32", "float64")}
            row = record(label, secs, f, m.n_iter_, m.n_passes_, to_f_star=to,
                         note=note or f"converged_={m.converged_}",
                         passes_seconds_to_f_star=(None if i is None
                                                   else float(sum(secs_iter[:i + 1]))),
                         iteration_to_f_star=None if i is None else i + 1,
                         seconds_per_pass=float(np.median(per_pass)) if per_pass else None,
                         seconds_per_pass_by_precision={
                             k: float(np.median(v)) for k, v in by_kind.items() if v},
                         history=hist)
            return row

        secs, m, f = dml_ref
        dml_record(f"dmlkit {ref_solver} tol=1e-10 (cached)", secs, m, f,
                   note=f"converged_={m.converged_}; reference")
        # the data already in the workers' memory, as scikit-learn's is in its process and
        # dask-ml's is (persisted first) below: these fits read no store
        from distributed import wait

        in_memory = client.persist([da.from_zarr(str(path), component="X"),
                                    da.from_zarr(str(path), component="y")])
        wait(in_memory)
        solvers = [("newton", {}), ("lbfgs", {}), ("gd", {"max_iter": args.gd_max_iter})]
        if K > 2:  # Newton is binary only: stream L-BFGS instead
            solvers = solvers[1:]
        contenders = ([(s, "memory", kw) for s, kw in solvers]
                      + [(s, "cached", kw) for s, kw in solvers]
                      + [(solvers[0][0], "streaming", {})])
        where = {"memory": "in the workers' memory", "cached": "cached from Zarr",
                 "streaming": "streaming"}
        for solver, source, kw in contenders:
            kw = {"max_iter": args.max_iter, **kw}
            secs, m, f = dml_fit(solver, source != "streaming",
                                 in_memory if source == "memory" else None, **kw)
            row = dml_record(f"dmlkit {solver} ({where[source]})", secs, m, f)
            row["source"] = source
            if source == "streaming":
                results["streaming"] = row["method"]
        del in_memory

        # dask-ml
        if args.skip_dask_ml:
            pass
        elif K > 2:
            for solver in ("lbfgs", "admm"):
                record(f"dask-ml {solver}", None, None,
                       note="binary only (dask-glm has no multinomial family): not run")
        else:
            _dask_ml_rows(args, path, C, f_of, record, results, da)
    finally:
        client.close()

    rows = {r["method"]: r for r in results["rows"]}
    summary: dict = {}
    best = {}
    for source in ("memory", "cached"):
        dml = [r for r in results["rows"] if r.get("source") == source
               and r["seconds_to_f_star"] is not None]
        if dml:
            best[source] = min(dml, key=lambda r: r["seconds_to_f_star"])
            summary[f"best_dmlkit_{source}"] = best[source]["method"]
            summary[f"best_dmlkit_{source}_vs_sklearn_to_f_star"] = (
                best[source]["seconds_to_f_star"] / sk_time_to_f_star)
    stream = rows[results["streaming"]]
    summary["streaming_pass_vs_raw_read"] = stream["seconds_per_pass"] / results["raw_read_seconds"]
    summary["streaming_pass_vs_raw_read_by_precision"] = {
        k: v / results["raw_read_seconds"]
        for k, v in stream.get("seconds_per_pass_by_precision", {}).items()}
    summary["streaming_pass_vs_direct_read"] = (stream["seconds_per_pass"]
                                                / results["direct_read_seconds"])
    mine = rows.get("dmlkit lbfgs (in the workers' memory)")
    dm = rows.get("dask-ml lbfgs")
    if dm is not None and mine is not None and dm["seconds"] is not None:
        # both on data persisted in the workers' memory before the fit
        summary["dask_ml_lbfgs_vs_dmlkit_lbfgs_fit"] = dm["seconds"] / mine["seconds"]
        if "memory" in best:
            summary["dask_ml_lbfgs_vs_best_dmlkit_to_f_star"] = (
                dm["seconds"] / best["memory"]["seconds_to_f_star"])
    results["summary"] = summary
    return results


def _dask_ml_rows(args, path, C, f_of, record, results, da):
    """dask-ml's LogisticRegression (lbfgs, admm) on the persisted arrays; errors are reported."""
    try:
        from dask_ml.linear_model import LogisticRegression as DMLogReg
    except ImportError as exc:
        print(f"  dask-ml not installed ({exc}); pip install -e '.[bench]'")
        return
    from distributed import wait

    Xd = da.from_zarr(str(path), component="X").persist()
    yd = da.from_zarr(str(path), component="y").persist()
    load_s, _ = timed(lambda: wait([Xd, yd]))
    results["dask_ml_load_seconds"] = load_s
    with warnings.catch_warnings():  # warm up: dask-glm's imports on the workers
        warnings.simplefilter("ignore")
        DMLogReg(C=C, solver="lbfgs", max_iter=2).fit(Xd[:2000], yd[:2000])
    # dask-glm minimises sum(loss) + (1/C) ||beta||^2 / 2 over beta = (coef, intercept): the
    # scale of scikit-learn's objective, but with the intercept penalised too. Its default
    # normalize=True would penalise coef * std(X) instead of coef: turned off.
    for solver in ("lbfgs", "admm"):
        # ADMM: about 3 s an iteration at 2,000,000 rows (10 s the first), max_iter=100 by default
        max_iter = args.admm_max_iter if solver == "admm" else 100
        m = DMLogReg(C=C, solver=solver, max_iter=max_iter, solver_kwargs={"normalize": False})
        name = f"dask-ml {solver}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # dask-glm's old config key
                secs, _ = timed(lambda: m.fit(Xd, yd))
        except Exception as exc:  # an incompatibility with this numpy / dask / scikit-learn
            msg = f"{type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]
            record(name, None, None, note=f"error: {msg}")
            continue
        coef = np.asarray(m.coef_, dtype=np.float64).reshape(1, -1)
        f = f_of(coef, np.atleast_1d(m.intercept_))
        tol = "abstol=1e-4, reltol=1e-2" if solver == "admm" else f"tol={m.tol}"
        record(name, secs, f, to_f_star=secs if (f - results["f_star"]) / results["f_star"] <= REACH
               else None, note=f"data persisted first ({load_s:.2f} s, not included); "
                               f"max_iter={m.max_iter}, {tol}")
    del Xd, yd


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def report(results: dict) -> str:
    cfg = results["config"]
    m = results["machine"]
    K = cfg["classes"]
    rows = []
    for r in results["rows"]:
        g = r["rel_gap"]
        rows.append((r["method"], _fmt(r["seconds_to_f_star"], ".2f") or
                     ("" if r["seconds"] is None else "not reached"),
                     _fmt(r["seconds"], ".2f"), _fmt(r["n_iter"], "d"), _fmt(r["passes"], "d"),
                     _fmt(r.get("seconds_per_pass") and 1e3 * r["seconds_per_pass"], ".0f"),
                     _fmt(g, "+.1e"), r["note"]))
    rows += [(label, "", f"{secs:.2f}", "", "1", f"{1e3 * secs:.0f}", "", "best of 3")
             for label, secs in read_rows(results)]
    kind = "binary" if K == 2 else f"{K}-class multinomial"
    s = results["summary"]
    lines = [
        f"Logistic regression ({kind}, L2, C={cfg['C']:g}), {cfg['rows']:,} x {cfg['features']} "
        f"float32 ({cfg['nbytes'] / 1e6:.0f} MB); dmlkit and dask-ml on {cfg['workers']} "
        f"workers x 1 thread, scikit-learn in memory with {cfg['workers']} threads; "
        f"{m['cpu']}, {m['cores']} cores, {m['memory_gb']:.0f} GB; dask {m['dask']}, "
        f"scikit-learn {m['sklearn']}, numpy {m['numpy']}.",
        "",
        f"f* = {results['f_star']:.12g} (from {results['f_star_from']}); \"to f*\" is the time to "
        f"an objective <= f* (1 + {cfg['reach']:g}); gap = (f - f*) / f*, every f recomputed "
        "with NumPy in float64.",
        "",
        markdown_table(["method", "to f* (s)", "fit (s)", "iterations", "passes",
                        "ms / pass", "gap", "note"], rows),
        "",
    ]
    for source, what in (("memory", "data in memory, as scikit-learn's"),
                         ("cached", "from the Zarr path, loading included")):
        if f"best_dmlkit_{source}_vs_sklearn_to_f_star" in s:
            lines.append(
                f"- {what}: best dmlkit time to f* ({s[f'best_dmlkit_{source}']}) / "
                f"scikit-learn time to f* (lbfgs tol={results['sklearn_tol_reaching_f_star']}, "
                f"{results['sklearn_time_to_f_star']:.2f} s): "
                f"{s[f'best_dmlkit_{source}_vs_sklearn_to_f_star']:.2f}x")
    if "dask_ml_lbfgs_vs_dmlkit_lbfgs_fit" in s:
        lines.append(f"- dask-ml lbfgs fit / dmlkit lbfgs (in the workers' memory) fit: "
                     f"{s['dask_ml_lbfgs_vs_dmlkit_lbfgs_fit']:.1f}x; dask-ml lbfgs fit / best "
                     f"dmlkit time to f*: {s['dask_ml_lbfgs_vs_best_dmlkit_to_f_star']:.1f}x")
    split = s.get("streaming_pass_vs_raw_read_by_precision", {})
    by_method = {r["method"]: r for r in results["rows"]}
    counts = {k: sum(1 for h in by_method[results["streaming"]]["history"][1:]
                     if h.get("float64", False) == (k == "float64")) for k in split}
    detail = "; ".join(f"{k} passes ({counts[k]} iterations): {v:.2f}x" for k, v in split.items())
    lines.append(f"- {results['streaming']} pass / one raw read of the store through zarr: "
                 f"{s['streaming_pass_vs_raw_read']:.2f}x" + (f" ({detail})" if detail else "")
                 + f"; / one read by dmlkit's direct reader, which the streamed passes use: "
                 f"{s['streaming_pass_vs_direct_read']:.2f}x")
    lines += [
        "- dmlkit \"to f*\": the whole fit (class pass, cache loading or placing, setup) less "
        "the passes "
        "of the iterations after the first whose `history_` objective is within the tolerance; "
        "scikit-learn's and dask-ml's: the whole fit, when its final objective is within it. "
        f"scikit-learn and dmlkit: the fastest of {cfg['repeat']} fits (dask-ml: one). "
        "ms / pass: median over iterations (the first, which loads a cache, left out) of "
        "`history_` seconds / passes.",
    ]
    lines.append("- the tol=1e-10 reference fits: near the optimum dmlkit's passes compute in "
                 "float64 (`glm_partial(precise=True)`), so the gradient on float32 data can "
                 "reach 1e-10 (the note's `converged_` says whether it did); an L-BFGS fit may "
                 "stop first on scipy's relative reduction test; passes include failed trial "
                 "points.")
    if K == 2 and not cfg["skip_dask_ml"]:
        lines.append(
            "- dask-ml (dask-glm) minimises sum(loss) + ||(coef, intercept)||^2 / (2C): it also "
            "penalises the intercept, so its optimum differs from f* by O(intercept^2 / (2 C n)); "
            "`normalize=False` so that the penalty is on coef, not coef * std(X).")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--features", type=int, default=32)
    p.add_argument("--classes", type=int, default=2,
                   help="more than 2: multinomial (no Newton, no dask-ml)")
    p.add_argument("--C", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-rows", type=int, default=125_000)
    p.add_argument("--max-iter", type=int, default=100, help="dmlkit newton and lbfgs")
    p.add_argument("--gd-max-iter", type=int, default=300)
    p.add_argument("--data", default="data")
    p.add_argument("--admm-max-iter", type=int, default=30,
                   help="dask-ml ADMM iterations (each a local L-BFGS per chunk)")
    p.add_argument("--skip-dask-ml", action="store_true")
    p.add_argument("--repeat", type=int, default=2,
                   help="fits of each scikit-learn and dmlkit contender; the fastest is reported")
