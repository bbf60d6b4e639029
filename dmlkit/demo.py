"""``make demo``: K-means on a Zarr store with a Dask cluster, checked against scikit-learn.

Generates (or reuses) the ``blobs`` course dataset, fits :class:`dmlkit.KMeans`
out-of-core on the store's path, compares it with scikit-learn on the same data
in memory (same initial centres, and scikit-learn's own k-means++) and with the
ground-truth centres and labels, then prints a table and writes plots and JSON::

    python -m dmlkit.demo --size small --data data --out out
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np

#: Sizes where scikit-learn runs in memory and every row gets a predicted label.
IN_MEMORY_SIZES = ("tiny", "small", "medium")
#: Rows drawn for the cluster plot, and for the ARI when a size is too large to label every row.
PLOT_ROWS, ARI_ROWS = 5_000, 200_000


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from dmlkit.datasets import SIZES

    p = argparse.ArgumentParser(prog="python -m dmlkit.demo", description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="small",
                   help="blobs dataset size (default: small)")
    p.add_argument("--data", default="data", help="data directory (default: data)")
    p.add_argument("--out", default="out", help="directory for plots and JSON (default: out)")
    p.add_argument("--progress", action="store_true", help="show a progress bar while fitting")
    p.add_argument("--n-clusters", type=int, default=8, help="number of clusters (default: 8)")
    p.add_argument("--random-state", type=int, default=0,
                   help="seed of the fits and of the shared initial centres (default: 0)")
    return p.parse_args(argv)


def _timed(fit: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    model = fit()
    return model, time.perf_counter() - t0


def center_error(fitted: np.ndarray, true: np.ndarray) -> float:
    """Largest distance between a fitted centre and the true centre matched to it.

    Centres are paired by the Hungarian algorithm on Euclidean distances (for
    unequal counts only ``min(len(fitted), len(true))`` pairs are matched).
    """
    from scipy.optimize import linear_sum_assignment

    d = np.linalg.norm(fitted[:, None, :].astype(np.float64) - true[None, :, :], axis=-1)
    rows, cols = linear_sum_assignment(d)
    return float(d[rows, cols].max())


def format_table(rows: list[dict]) -> str:
    """The results as an aligned plain-text table."""
    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    header = ["method", "fit s", "iter", "passes", "inertia", "rel. inertia", "ARI", "centre err"]
    body = [[r["method"], num(r["seconds"], ".2f"), str(r["n_iter"]), num(r["n_passes"], "d"),
             num(r["inertia"], ".6e"), "ref" if r["reference"] else num(r["rel_inertia"], "+.2e"),
             num(r["ari"], ".4f"), num(r["center_error"], ".4f")] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def plot_convergence(histories: dict[str, list[dict]], path: str) -> None:
    """Inertia and squared centre shift per Lloyd iteration (shift on a log scale)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    zeros = False
    for label, hist in histories.items():
        it = np.array([h["iteration"] for h in hist])
        ax1.semilogy(it, [h["inertia"] for h in hist], "o-", ms=3, label=label)
        shift = np.array([h["center_shift"] for h in hist])
        ok = shift > 0  # an exactly zero shift (labels unchanged) has no logarithm
        zeros |= not ok.all()
        ax2.semilogy(it[ok], shift[ok], "o-", ms=3, label=label)
    ax1.set(xlabel="iteration", ylabel="inertia w.r.t. the iteration's starting centres",
            title="Inertia")
    ax2.set(xlabel="iteration", ylabel="sum of squared centre shifts",
            title="Centre shift" + (" (exact zeros not shown)" if zeros else ""))
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_clusters(X: np.ndarray, labels: np.ndarray, centers: np.ndarray,
                  true_centers: np.ndarray, path: str) -> None:
    """Rows projected on their first two principal components (NumPy SVD), by label."""
    import matplotlib.pyplot as plt

    mean = X.mean(axis=0, dtype=np.float64)
    _, _, vt = np.linalg.svd(X - mean, full_matrices=False)
    P = lambda A: (A - mean) @ vt[:2].T  # noqa: E731
    fig, ax = plt.subplots(figsize=(6.5, 6))
    xy = P(X)
    ax.scatter(xy[:, 0], xy[:, 1], c=labels, cmap="tab10", s=4, alpha=0.5, linewidths=0)
    t, c = P(true_centers), P(centers)
    ax.scatter(t[:, 0], t[:, 1], s=160, facecolors="none", edgecolors="red", linewidths=2,
               label="true centres")
    ax.scatter(c[:, 0], c[:, 1], marker="x", s=70, c="black", linewidths=2,
               label="fitted centres (dmlkit)")
    ax.set(xlabel="PC 1", ylabel="PC 2",
           title=f"{len(X):,} sampled rows, coloured by predicted cluster")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dmlkit.demo``; returns the exit code."""
    args = _parse(argv)
    import matplotlib

    matplotlib.use("Agg")
    from dask.utils import format_bytes
    from sklearn.cluster import KMeans as SKKMeans
    from sklearn.metrics import adjusted_rand_score

    import dmlkit
    from dmlkit.datasets import ensure_dataset

    k, seed = args.n_clusters, args.random_state
    path = ensure_dataset("blobs", args.size, out=args.data)
    ds = dmlkit.open_zarr(path)
    X_lazy, n = ds["X"].data, ds.sizes["sample"]
    true_centers = ds["centers"].values.astype(np.float64)
    print(f"dataset: {path}  X shape {X_lazy.shape} {X_lazy.dtype}, chunks {X_lazy.chunksize}"
          f" ({X_lazy.npartitions} chunks), {format_bytes(X_lazy.nbytes)}")
    in_memory = args.size in IN_MEMORY_SIZES
    rng = np.random.default_rng(seed)

    client = dmlkit.connect()
    try:
        nthreads = client.nthreads()
        cluster = {"workers": len(nthreads), "threads": sum(nthreads.values()),
                   "dashboard": client.dashboard_link}
        print(f"cluster: {cluster['workers']} workers, {cluster['threads']} threads, "
              f"dashboard {cluster['dashboard']}", flush=True)

        km, km_s = _timed(lambda: dmlkit.KMeans(
            k, random_state=seed, progress=args.progress).fit(path))
        print(f"dmlkit KMeans (k-means||) on {path}: {km_s:.2f} s, {km.n_iter_} iterations, "
              f"{km.n_passes_} passes, converged={km.converged_}", flush=True)
        fits = [("dmlkit k-means|| (Zarr)", "dmlkit", km, km_s, km.n_passes_)]
        histories = {"dmlkit, k-means|| init": km.history_}
        if in_memory:
            X, load_s = _timed(lambda: X_lazy.compute())
            y = ds["y"].values
            print(f"loaded X in memory for scikit-learn in {load_s:.2f} s", flush=True)
            init = X[rng.choice(n, k, replace=False)].astype(np.float64)
            same = dict(init=init, n_init=1, max_iter=30, tol=0)
            km2, km2_s = _timed(lambda: dmlkit.KMeans(
                k, random_state=seed, progress=args.progress, **same).fit(path))
            sk2, sk2_s = _timed(lambda: SKKMeans(k, random_state=seed, **same).fit(X))
            sk, sk_s = _timed(lambda: SKKMeans(k, random_state=seed, n_init=1).fit(X))
            fits += [("dmlkit, same init (Zarr)", "dmlkit_same_init", km2, km2_s, km2.n_passes_),
                     ("sklearn, same init (memory)", "sklearn_same_init", sk2, sk2_s, None),
                     ("sklearn k-means++ (memory)", "sklearn", sk, sk_s, None)]
            histories["dmlkit, same init as sklearn"] = km2.history_
            idx = rng.choice(n, min(PLOT_ROWS, n), replace=False)
            X_plot = X[idx]
        else:
            print(f"size={args.size}: scikit-learn skipped (data larger than sensible in "
                  f"memory); ARI on {ARI_ROWS:,} sampled rows", flush=True)
            idx = np.sort(rng.choice(n, min(ARI_ROWS, n), replace=False))
            X, y = X_lazy[idx].compute(), ds["y"].data[idx].compute()
            X_plot = X[rng.permutation(len(idx))[:PLOT_ROWS]]

        refs = {"dmlkit": "sklearn", "dmlkit_same_init": "sklearn_same_init"}
        inertia = {key: float(m.inertia_) for _, key, m, _, _ in fits}
        rows = []
        for method, key, model, secs, passes in fits:
            if key.startswith("sklearn"):
                labels = model.labels_
            elif in_memory:
                labels = model.labels_.compute()
            else:
                labels = model.predict(X)
            ref = inertia.get(refs.get(key, ""))
            rows.append({
                "method": method, "key": key, "seconds": secs, "n_iter": int(model.n_iter_),
                "n_passes": passes, "inertia": inertia[key],
                "reference": key.startswith("sklearn"),
                "rel_inertia": None if ref is None else (inertia[key] - ref) / ref,
                "ari": float(adjusted_rand_score(y, labels)),
                "center_error": center_error(model.cluster_centers_, true_centers)})
        plot_labels = km.predict(X_plot)
    finally:
        client.close()

    print()
    print(format_table(rows))
    notes = [f"fit s: dmlkit's includes reading the store (cache='auto' keeps it on the workers)"
             + (f"; sklearn's excludes loading X ({load_s:.2f} s)" if in_memory else ""),
             "passes: reads of the Zarr store (sklearn works on the data in memory)",
             f"ARI: against the true labels, on {len(y):,} rows",
             "centre err: largest distance of a fitted centre to its true centre (Hungarian)"]
    if in_memory:
        notes[1:1] = [
            "rel. inertia: (inertia - sklearn's) / sklearn's, sklearn with the same kind of init",
            "same init: both start from the same k random rows (max_iter=30, tol=0) to check that"
            "\n  dmlkit computes what sklearn computes; random rows often give a local minimum"]
    print("\n".join(notes))

    os.makedirs(args.out, exist_ok=True)
    written = [os.path.join(args.out, f) for f in
               ("kmeans_convergence.png", "kmeans_clusters.png", "kmeans_results.json")]
    plot_convergence(histories, written[0])
    plot_clusters(X_plot, plot_labels, km.cluster_centers_, true_centers, written[1])
    with open(written[2], "w") as f:
        json.dump({"dataset": {"path": path, "shape": list(X_lazy.shape),
                               "chunks": list(X_lazy.chunksize), "nbytes": int(X_lazy.nbytes)},
                   "cluster": cluster, "n_clusters": k, "random_state": seed, "rows": rows,
                   "history": km.history_}, f, indent=2)
    print("\nwrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
