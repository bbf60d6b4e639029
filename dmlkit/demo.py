"""``make demo``: the four algorithm families on Zarr stores with a Dask cluster, checked against scikit-learn.

1. K-means on the ``blobs`` course dataset: :class:`dmlkit.KMeans` fitted
   out-of-core on the store's path, compared with scikit-learn on the same data
   in memory (same initial centres, and scikit-learn's own k-means++) and with
   the ground-truth centres and labels.
2. On the ``classification`` course dataset of the same size (binary, 32
   features), trained on the first 80% of the rows (a lazy slice of the store)
   and scored on the last 20%:

   * full-batch :class:`dmlkit.LogisticRegression` (Newton, C=1) against
     scikit-learn's (objective, passes, held-out log loss and accuracy,
     largest coefficient difference);
   * :class:`dmlkit.SGDClassifier` (local SGD, 2 epochs) against scikit-learn's
     ``SGDClassifier(max_iter=2)``: gap of the training objective to the
     full-batch optimum of the same objective;
   * :class:`dmlkit.KNeighborsClassifier` (k=10, exact) against scikit-learn's
     brute force on up to 2,000 held-out queries: queries per second, accuracy,
     and the fraction of neighbour indices identical to scikit-learn's.

Prints one table per family and writes plots and JSON (``kmeans_*``,
``logreg_*``, ``sgd_results.json``, ``knn_results.json``) to ``--out``. For
``--size large`` nothing is loaded in memory: scikit-learn and k-NN are skipped::

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
#: Classification: the first TRAIN_FRACTION of the rows train, the rest are held out.
TRAIN_FRACTION = 0.8
#: Logistic regression's C; SGD's epochs; k-NN's neighbours and (at most) held-out queries.
LOGREG_C, SGD_EPOCHS, KNN_NEIGHBORS, KNN_QUERIES = 1.0, 2, 10, 2_000


_EPILOG = """\
runs, in order:
  k-means          dmlkit.KMeans vs sklearn KMeans on blobs-SIZE
  logistic         dmlkit.LogisticRegression (Newton, C=1) vs sklearn, on
                   classification-SIZE: first 80% of rows train, last 20% test
  SGD              dmlkit.SGDClassifier (local, 2 epochs) vs sklearn, gap to
                   the full-batch optimum of the same objective
  k-NN             dmlkit.KNeighborsClassifier (k=10) vs sklearn brute force
                   on up to 2,000 held-out queries (skipped at large)
writes to OUT: kmeans_convergence.png, kmeans_clusters.png,
  logreg_sgd_convergence.png, logreg_coefficients.png, kmeans_results.json,
  logreg_results.json, sgd_results.json, knn_results.json (not at large)
"""


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from dmlkit.datasets import SIZES

    p = argparse.ArgumentParser(prog="python -m dmlkit.demo", description=__doc__.splitlines()[0],
                                epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="small",
                   help="size of the blobs and classification datasets (default: small; "
                   "large: out-of-core only, scikit-learn and k-NN skipped)")
    p.add_argument("--data", default="data", help="data directory (default: data)")
    p.add_argument("--out", default="out", help="directory for plots and JSON (default: out)")
    p.add_argument("--progress", action="store_true", help="show a progress bar while fitting")
    p.add_argument("--n-clusters", type=int, default=8,
                   help="K-means: number of clusters (default: 8)")
    p.add_argument("--random-state", type=int, default=0,
                   help="seed of the fits, of the shared initial centres and of SGD "
                        "(default: 0)")
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


def _per_pass_axes(ax) -> None:
    """Integer ticks along x (iterations, passes), a light grid, a small legend."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_convergence(histories: dict[str, list[dict]], path: str) -> None:
    """Inertia and squared centre shift per Lloyd iteration (shift on a log scale)."""
    import matplotlib.pyplot as plt

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
        _per_pass_axes(ax)
    _save(fig, path)


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
    _save(fig, path)


# ------------------------------------------------------------------ classification families
def format_columns(rows: list[dict], columns: list[tuple[str, str, Any]]) -> str:
    """``rows`` as an aligned plain-text table; ``columns`` holds ``(header, key, fmt)``.

    ``fmt`` is a format spec or a callable of the row; ``None`` values print as "-".
    """
    def cell(r: dict, key: str, fmt: Any) -> str:
        if callable(fmt):
            return fmt(r)
        v = r.get(key)
        return "-" if v is None else format(v, fmt)

    header = [c[0] for c in columns]
    body = [[cell(r, key, fmt) for _, key, fmt in columns] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(line, widths))) for line in [header, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


LOGREG_COLUMNS = [("method", "method", "s"), ("fit s", "seconds", ".2f"), ("iter", "n_iter", "d"),
                  ("passes", "n_passes", "d"), ("objective", "objective", ".8f"),
                  ("test log loss", "test_log_loss", ".5f"), ("test acc", "test_accuracy", ".4f"),
                  ("max |coef diff|", "coef_diff",
                   lambda r: "ref" if r["reference"] else
                   ("-" if r["coef_diff"] is None else format(r["coef_diff"], ".2e")))]
SGD_COLUMNS = [("method", "method", "s"), ("fit s", "seconds", ".2f"), ("epochs", "n_epochs", "d"),
               ("rounds", "n_rounds", "d"), ("objective", "objective", ".6f"),
               ("gap", "gap", lambda r: "ref" if r["reference"] else
                ("-" if r["gap"] is None else format(r["gap"], ".2%"))),
               ("test log loss", "test_log_loss", ".5f"), ("test acc", "test_accuracy", ".4f")]
KNN_COLUMNS = [("method", "method", "s"), ("fit s", "fit_seconds", ".2f"),
               ("predict s", "predict_seconds", ".2f"), ("queries/s", "queries_per_second", ",.0f"),
               ("test acc", "test_accuracy", ".4f"),
               ("same neighbours", "identical_fraction",
                lambda r: "ref" if r["reference"] else format(r["identical_fraction"], ".6f")),
               ("same labels", "same_predictions",
                lambda r: "ref" if r["reference"] else format(r["same_predictions"], ".6f"))]


def log_loss_terms(X: Any, y: Any, coef: np.ndarray, intercept: np.ndarray) -> tuple[Any, Any]:
    """Mean binary log loss and accuracy of ``X coef^T + intercept`` against ``y`` in {0, 1}.

    In float64; lazy (two dask scalars) when ``X`` and ``y`` are dask arrays, else floats.
    """
    w = np.asarray(coef, dtype=np.float64).reshape(-1)
    b = float(np.asarray(intercept, dtype=np.float64).reshape(-1)[0])
    z = X.astype(np.float64) @ w + b
    loss = np.logaddexp(0.0, z) - y * z
    hit = (z > 0) == (y == 1)
    return loss.mean(), hit.mean()


def binary_metrics(X: Any, y: Any, coef: np.ndarray, intercept: np.ndarray) -> tuple[float, float]:
    """``(mean log loss, accuracy)`` as floats; one pass when ``X`` is a dask array."""
    import dask

    loss, acc = dask.compute(*log_loss_terms(X, y, coef, intercept))
    return float(loss), float(acc)


def l2_objective(X: Any, y: Any, coef: np.ndarray, intercept: np.ndarray, alpha: float) -> float:
    """Mean log loss + ``alpha / 2 ||coef||^2`` (the intercept is not penalised), in float64.

    With ``alpha = 1 / (C n)`` it is scikit-learn's logistic objective divided by ``C n``
    (dmlkit's ``history_["objective"]``); with SGD's ``alpha``, SGD's objective.
    """
    loss, _ = binary_metrics(X, y, coef, intercept)
    return loss + 0.5 * alpha * float(np.sum(np.square(np.asarray(coef, dtype=np.float64))))


def _traced_sgd_class():
    """:class:`dmlkit.SGDClassifier` that also keeps ``(coef, intercept)`` after every round."""
    import dmlkit
    from dmlkit._kernels.glm import split_theta

    class TracedSGDClassifier(dmlkit.SGDClassifier):
        def _record(self, *args, **kwargs):
            super()._record(*args, **kwargs)
            coef, intercept = split_theta(self._theta, self._family, self.n_features_in_,
                                          self.fit_intercept)
            self.trace_ = getattr(self, "trace_", []) + [(coef.copy(), intercept.copy())]

    return TracedSGDClassifier


def plot_linear_convergence(newton: list[dict], f_star: float, sgd_rounds: list[dict],
                            sgd_sklearn: list[tuple[int, float]], title: str, path: str) -> None:
    """Relative objective gap against passes: Newton iterations, SGD rounds, sklearn SGD epochs."""
    import matplotlib.pyplot as plt

    floor = 1e-12  # a gap at or below float64 rounding is drawn here
    gap = lambda f: max((f - f_star) / abs(f_star), floor)  # noqa: E731
    fig, ax = plt.subplots(figsize=(7, 4.5))
    passes = np.cumsum([h["passes"] for h in newton])
    ax.semilogy(passes, [gap(h["objective"]) for h in newton], "o-", ms=4,
                label="dmlkit LogisticRegression, Newton (per iteration)")
    if sgd_rounds:
        ax.semilogy([r["passes"] for r in sgd_rounds], [gap(r["objective"]) for r in sgd_rounds],
                    "s-", ms=4, label="dmlkit SGDClassifier, local SGD (per round)")
    if sgd_sklearn:
        ax.semilogy([p for p, _ in sgd_sklearn], [gap(f) for _, f in sgd_sklearn], "^--", ms=6,
                    label="sklearn SGDClassifier (per epoch, in memory)")
    ax.set(xlabel="passes over the training rows",
           ylabel="(objective - optimum) / optimum", title=title)
    ax.text(0.99, 0.98, f"gaps below {floor:g} drawn at {floor:g}", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="grey")
    _per_pass_axes(ax)
    _save(fig, path)


def plot_coefficients(fits: dict[str, np.ndarray], true_coef: np.ndarray | None,
                      path: str) -> None:
    """Fitted coefficients per feature, against the generating ones when known."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4))
    d = len(next(iter(fits.values())))
    x = np.arange(d)
    if true_coef is not None:
        ax.bar(x, true_coef, color="lightgrey", label="true coefficients (generator)")
    markers = iter("ox+^v")
    for label, coef in fits.items():
        ax.plot(x, coef, next(markers), ms=6, mfc="none", label=label)
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xlabel="feature", ylabel="coefficient", title="Logistic regression coefficients")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    _save(fig, path)


def run_classification(args: argparse.Namespace, in_memory: bool) -> tuple[list[str], list[str]]:
    """Logistic regression, SGD and k-NN on the classification store (needs a connected client).

    Prints a table per family; returns ``(the families' JSON file names, plot file names)``
    (written in ``args.out``).
    """
    import warnings

    from dask.utils import format_bytes
    from sklearn.exceptions import ConvergenceWarning

    import dmlkit
    from dmlkit.datasets import ensure_dataset

    seed, out = args.random_state, args.out
    path = ensure_dataset("classification", args.size, out=args.data)
    ds = dmlkit.open_zarr(path)
    X_lazy, n = ds["X"].data, ds.sizes["sample"]
    n_train = int(round(TRAIN_FRACTION * n))
    train, test = ds.isel(sample=slice(0, n_train)), ds.isel(sample=slice(n_train, n))
    true_coef = (ds["coef"].values.reshape(-1).astype(np.float64) if "coef" in ds else None)
    print(f"\n=== classification: {path}  X shape {X_lazy.shape} {X_lazy.dtype}, chunks "
          f"{X_lazy.chunksize}, {format_bytes(X_lazy.nbytes)}; training on rows [0, {n_train:,}),"
          f" held out [{n_train:,}, {n:,})", flush=True)
    dataset = {"path": path, "shape": list(X_lazy.shape), "chunks": list(X_lazy.chunksize),
               "nbytes": int(X_lazy.nbytes), "n_train": n_train, "n_test": n - n_train}
    if in_memory:
        (X, y), load_s = _timed(lambda: (X_lazy.compute(), ds["y"].values))
        Xtr, ytr, Xte, yte = X[:n_train], y[:n_train], X[n_train:], y[n_train:]
        print(f"loaded X in memory for scikit-learn in {load_s:.2f} s", flush=True)
    else:
        print(f"size={args.size}: scikit-learn comparisons and k-NN skipped (data larger than "
              "sensible in memory); metrics computed out-of-core by dask", flush=True)
        Xtr, ytr = train["X"].data, train["y"].data
        Xte, yte = test["X"].data, test["y"].data
    written: list[str] = []
    plots: list[str] = []

    def dump(name: str, payload: dict) -> None:
        os.makedirs(out, exist_ok=True)
        written.append(os.path.join(out, name))
        with open(written[-1], "w") as f:
            json.dump({"dataset": dataset, "random_state": seed, **payload}, f, indent=2)

    # ---- 1. full-batch logistic regression
    C = LOGREG_C
    lr, lr_s = _timed(lambda: dmlkit.LogisticRegression(
        C=C, solver="newton", progress=args.progress).fit(train))
    print(f"dmlkit LogisticRegression (Newton, C={C}) on the training slice: {lr_s:.2f} s, "
          f"{lr.n_iter_} iterations, {lr.n_passes_} passes, converged={lr.converged_}", flush=True)
    lam = 1.0 / (C * n_train)  # objective = mean log loss + lam/2 ||coef||^2
    models = [("dmlkit Newton (Zarr)", "dmlkit", lr, lr_s, lr.n_iter_, lr.n_passes_)]
    if in_memory:
        from sklearn.linear_model import LogisticRegression as SKLogisticRegression

        sk, sk_s = _timed(lambda: SKLogisticRegression(C=C, tol=1e-8, max_iter=1000).fit(
            Xtr, ytr))
        models.append(("sklearn lbfgs (memory)", "sklearn", sk, sk_s, int(sk.n_iter_[0]), None))
    lr_rows = []
    for method, key, m, secs, n_iter, passes in models:
        obj = (l2_objective(Xtr, ytr, m.coef_, m.intercept_, lam) if in_memory
               else float(lr.history_[-1]["objective"]))
        loss, acc = binary_metrics(Xte, yte, m.coef_, m.intercept_)
        diff = None
        if in_memory:
            theta = lambda e: np.concatenate([np.ravel(e.coef_), np.ravel(e.intercept_)])  # noqa
            diff = float(np.abs(theta(m) - theta(models[-1][2])).max())
        lr_rows.append({"method": method, "key": key, "seconds": secs, "n_iter": int(n_iter),
                        "n_passes": passes, "objective": obj, "test_log_loss": loss,
                        "test_accuracy": acc, "reference": key == "sklearn", "coef_diff": diff,
                        "coef": np.ravel(m.coef_).tolist(),
                        "intercept": float(np.ravel(m.intercept_)[0])})
    print()
    print(format_columns(lr_rows, LOGREG_COLUMNS))
    print("\n".join([
        f"objective: mean training log loss + ||coef||^2 / (2 C n), C={C}, n={n_train:,} "
        "(sklearn's objective / (C n))" + ("; recomputed in float64 for both" if in_memory
                                           else "; dmlkit's last history_ entry"),
        "passes: reads of the training rows (the pass finding the classes excluded)"
        + ("; sklearn: lbfgs with tol=1e-8" if in_memory else ""),
        f"test log loss, acc: on the {n - n_train:,} held-out rows"]
        + (["max |coef diff|: largest difference to sklearn's coefficients and intercept"]
           if in_memory else [])), flush=True)
    dump("logreg_results.json", {"C": C, "rows": lr_rows, "history": lr.history_})

    # ---- 2. SGD against the full-batch optimum of the same objective
    Traced = _traced_sgd_class()
    sgd, sgd_s = _timed(lambda: Traced(
        mode="local", max_epochs=SGD_EPOCHS, tol=None, random_state=seed,
        progress=args.progress).fit(train))
    alpha = float(sgd.alpha)
    C_opt = 1.0 / (alpha * n_train)
    opt, opt_s = _timed(lambda: dmlkit.LogisticRegression(C=C_opt, solver="newton").fit(train))
    f_star = (l2_objective(Xtr, ytr, opt.coef_, opt.intercept_, alpha) if in_memory
              else float(opt.history_[-1]["objective"]))
    print(f"\ndmlkit SGDClassifier (local, {SGD_EPOCHS} epochs): {sgd_s:.2f} s, "
          f"{len(sgd.history_)} rounds; optimum by Newton (C=1/(alpha n)={C_opt:.4g}): "
          f"{opt_s:.2f} s, {opt.n_passes_} passes", flush=True)
    sgd_models = [("dmlkit Newton optimum (Zarr)", "optimum", opt, opt_s, None, None),
                  ("dmlkit local SGD (Zarr)", "dmlkit", sgd, sgd_s, sgd.n_iter_,
                   len(sgd.history_))]
    sk_epochs = []
    if in_memory:
        from sklearn.linear_model import SGDClassifier as SKSGDClassifier

        def sk_sgd(epochs):
            with warnings.catch_warnings():  # tol=None and few epochs: expected
                warnings.simplefilter("ignore", ConvergenceWarning)
                return SKSGDClassifier(loss="log_loss", alpha=alpha, max_iter=epochs, tol=None,
                                       random_state=seed).fit(Xtr, ytr)

        sks, sks_s = _timed(lambda: sk_sgd(SGD_EPOCHS))
        sgd_models.append(("sklearn SGD (memory)", "sklearn", sks, sks_s, int(sks.n_iter_), None))
        sk_epochs = [(e, l2_objective(Xtr, ytr, m.coef_, m.intercept_, alpha)) for e, m in
                     [(e, sk_sgd(e)) for e in range(1, SGD_EPOCHS)] + [(SGD_EPOCHS, sks)]]
    sgd_rows = []
    for method, key, m, secs, epochs, rounds in sgd_models:
        obj = f_star if key == "optimum" else l2_objective(Xtr, ytr, m.coef_, m.intercept_, alpha)
        loss, acc = binary_metrics(Xte, yte, m.coef_, m.intercept_)
        sgd_rows.append({"method": method, "key": key, "seconds": secs, "n_epochs": epochs,
                         "n_rounds": rounds, "objective": obj,
                         "gap": (obj - f_star) / abs(f_star), "reference": key == "optimum",
                         "test_log_loss": loss, "test_accuracy": acc})
    # the objective after every round (in memory: cheap); rounds are one pass each
    sgd_trace = ([{"round": i + 1, "passes": i + 1,
                   "objective": l2_objective(Xtr, ytr, c, b, alpha)}
                  for i, (c, b) in enumerate(sgd.trace_)] if in_memory else [])
    print()
    print(format_columns(sgd_rows, SGD_COLUMNS))
    print("\n".join([
        f"objective: mean training log loss + alpha/2 ||coef||^2, alpha={alpha:g} (SGD's); "
        f"optimum: dmlkit Newton with C = 1/(alpha n)",
        "gap: (objective - optimum's) / optimum's",
        f"rounds: dmlkit's model averagings (sync_every={sgd.sync_every}), one pass each",
        f"both SGDs run {SGD_EPOCHS} epochs with tol=None"
        + ("\n  sklearn: one row per update, 'optimal' rate (large first steps: far from converged"
           " after 2 epochs); dmlkit: mini-batches of 512, rate 1/L" if in_memory else "")]),
          flush=True)
    dump("sgd_results.json", {"alpha": alpha, "C_optimum": C_opt, "optimum": f_star,
                              "rows": sgd_rows, "rounds": sgd.history_, "round_objectives":
                              sgd_trace, "optimum_history": opt.history_})
    plots.append(os.path.join(out, "logreg_sgd_convergence.png"))
    plot_linear_convergence(opt.history_, f_star, sgd_trace, sk_epochs,
                            f"Logistic loss + L2 (alpha={alpha:g}), {n_train:,} training rows",
                            plots[-1])
    plots.append(os.path.join(out, "logreg_coefficients.png"))
    plot_coefficients({r["method"]: np.array(r["coef"]) for r in lr_rows}, true_coef, plots[-1])

    # ---- 3. k nearest neighbours
    if not in_memory:
        print(f"\nk-NN skipped at size={args.size}: scikit-learn needs the training rows in "
              "memory, and exact search costs (queries x training rows)", flush=True)
        return written, plots
    from sklearn.neighbors import KNeighborsClassifier as SKKNeighborsClassifier
    from sklearn.neighbors import NearestNeighbors as SKNearestNeighbors

    k = KNN_NEIGHBORS
    Q, yq = Xte[:KNN_QUERIES], yte[:KNN_QUERIES]
    knn, fit_s = _timed(lambda: dmlkit.KNeighborsClassifier(
        n_neighbors=k, progress=args.progress).fit(train))
    pred, pred_s = _timed(lambda: knn.predict(Q))
    ind = knn.kneighbors(Q, return_distance=False)
    skk, skfit_s = _timed(lambda: SKKNeighborsClassifier(k, algorithm="brute").fit(Xtr, ytr))
    skpred, skpred_s = _timed(lambda: skk.predict(Q))
    skind = SKNearestNeighbors(n_neighbors=k, algorithm="brute").fit(Xtr).kneighbors(
        Q, return_distance=False)
    print(f"\ndmlkit KNeighborsClassifier (k={k}, brute) fitted on {n_train:,} rows, "
          f"{len(Q):,} held-out queries", flush=True)
    knn_rows = [
        {"method": "dmlkit brute (Zarr)", "key": "dmlkit", "fit_seconds": fit_s,
         "predict_seconds": pred_s, "queries_per_second": len(Q) / pred_s,
         "test_accuracy": float(np.mean(pred == yq)), "reference": False,
         "identical_fraction": float(np.mean(ind == skind)),
         "recall": float(np.mean([np.intersect1d(a, b).size for a, b in zip(ind, skind)]) / k),
         "same_predictions": float(np.mean(pred == skpred))},
        {"method": "sklearn brute (memory)", "key": "sklearn", "fit_seconds": skfit_s,
         "predict_seconds": skpred_s, "queries_per_second": len(Q) / skpred_s,
         "test_accuracy": float(np.mean(skpred == yq)), "reference": True,
         "identical_fraction": 1.0, "recall": 1.0, "same_predictions": 1.0}]
    print()
    print(format_columns(knn_rows, KNN_COLUMNS))
    print("\n".join([
        f"k={k}; queries: the first {len(Q):,} held-out rows; fit s: dmlkit's reads and caches "
        "the training rows (and finds the classes)",
        "same neighbours: fraction of the (query, rank) neighbour indices equal to sklearn's "
        f"NearestNeighbors (as sets: {knn_rows[0]['recall']:.6f})",
        "same labels: fraction of predictions equal to sklearn's"]), flush=True)
    dump("knn_results.json", {"n_neighbors": k, "n_queries": int(len(Q)), "rows": knn_rows})
    return written, plots


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
        more, plots = run_classification(args, in_memory)
        written[2:2] = plots
        written += more
    finally:
        client.close()

    print("\nwrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
