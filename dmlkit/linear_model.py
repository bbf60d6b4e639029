"""Distributed full-batch linear models: least squares, ridge and logistic regression.

Every evaluation of the objective is one tree-reduced pass over the data
computing the weighted sums of loss and gradient (and the Hessian for Newton)
at the current parameters; the solvers work on those sums alone.
"""
from __future__ import annotations

import numbers
import time
import warnings
from typing import Any

import dask
import numpy as np
from scipy.optimize import minimize
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning

from dmlkit import _graph, data
from dmlkit._kernels.glm import combine_glm, glm_partial, n_params, split_theta
from dmlkit._kernels.stats import combine_label_counts, label_counts
from dmlkit._progress import progress_bar

_SOLVERS = ("auto", "lbfgs", "newton", "gd", "fista")
#: "auto" picks Newton up to this many parameters (its Hessian is p x p).
NEWTON_MAX_PARAMS = 1000
#: Once the gradient's largest entry is this small (least squares: in the problem's units),
#: passes compute ``z`` and the gradient in float64 (``glm_partial(precise=True)``), so that
#: line searches still see the loss decrease and the gradient can vanish.
PRECISE_BELOW = 1e-3
#: Newton on a loss whose Hessian changes (logistic, Huber) sums the Hessian over a sample
#: of about this many rows per parameter when the data hold at least twice as many
#: (sub-sampled Newton); the objective and the gradient always use every row.
HESSIAN_ROWS_PER_PARAM = 1000
#: With an intercept, the kernels work on ``X - mean`` once some feature's mean exceeds
#: ``sqrt(FAR_FROM_ORIGIN)`` = 10 times its standard deviation.
FAR_FROM_ORIGIN = 100.0
#: A feature varying by at most this many units of ``X``'s float precision (relative to
#: its mean) is constant: its variation is rounding.
CONSTANT_EPS = 4.0


def index_dtype(n_classes: int) -> np.dtype:
    """The smallest signed integer dtype that holds class indices ``0 .. n_classes``
    (int8 up to 126 classes): kernels read them as class numbers, and a copy held in
    memory while ``X`` streams takes a byte per row."""
    for t in (np.int8, np.int16, np.int32):
        if n_classes < np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.int64)


def _labels_to_index(y, classes):
    return np.searchsorted(classes, y).astype(index_dtype(classes.size))


def _probabilities(Z):
    """Class probabilities from decision values: sigmoid for one column, softmax for more."""
    if Z.shape[1] == 1:
        p1 = expit(Z)
        return np.hstack([1.0 - p1, p1])
    return softmax(Z, axis=1)


def _take(index, values):
    return values[index]


def _class_weight_block(y, classes, table):
    return table[np.searchsorted(classes, y)]


def _linear_block(X, coef, intercept, center=None):
    X = X if X.dtype.kind == "f" else X.astype(np.float64)
    if center is not None:  # data far from the origin: the product of X - center, smaller
        c = center.astype(X.dtype)
        X = X - c
        intercept = intercept + coef @ c.astype(np.float64)
    return (X @ coef.T.astype(X.dtype)).astype(np.float64) + intercept


def prepare_supervised(X: Any, y: Any, sample_weight: Any):
    """Validated dask arrays ``(X, y, sample_weight)``; ``y`` defaults to the store's ``y``."""
    X_in = data.as_matrix(X)
    y_in = data.as_targets(y, X, X_in)
    w_in = data.check_sample_weight(sample_weight, X_in)
    return X_in, y_in, w_in


def _features(stats, dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per feature: mean, variance and whether it is constant, from the first pass's data
    statistics (unweighted; float64 sums relative to a row of each block, so exact for
    data far from the origin). Constant: a spread within :data:`CONSTANT_EPS` units of
    ``X``'s float precision of the mean (rounding, not data)."""
    n = max(stats.n_rows, 1)
    mean = stats.col_sum / n
    var = stats.col_m2 / n
    with np.errstate(over="ignore", invalid="ignore"):
        constant = var <= (CONSTANT_EPS * np.finfo(dtype).eps * mean) ** 2
    return mean, var, constant


def _squared_units(y_moments, mean, var, constant, fit_intercept: bool):
    """The units of least squares' problem: ``s_y`` and, per parameter, ``s_j``.

    ``s_y`` and ``s_j`` are the standard deviations of ``y`` and of feature ``j``
    (root mean squares without an intercept, or for a constant; 1 for the intercept,
    and where a value is 0 or not finite). The gradient's entry ``j`` divided by
    ``s_y s_j`` is the gradient had ``X`` and ``y`` been standardised: the test
    against ``tol``, which then means the same for ``y`` in metres or in nanometres.
    ``y_moments``: ``y``'s one-column :class:`~dmlkit._kernels.stats.Moments`.
    """
    weight, total, m2 = y_moments.weight, float(y_moments.col_sum[0]), float(y_moments.col_m2[0])
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        y_mean, y_var = total / weight, m2 / weight
        rms_y = np.sqrt(y_var + y_mean * y_mean)
        y_constant = y_var <= (CONSTANT_EPS * np.finfo(float).eps * y_mean) ** 2
        s_y = np.sqrt(y_var) if fit_intercept and not y_constant else rms_y
        rms = np.sqrt(var + mean * mean)
        s_x = np.where(fit_intercept & ~constant, np.sqrt(var), rms)
    s_y = float(s_y) if np.isfinite(s_y) and s_y > 0 else 1.0
    s_x = np.where(np.isfinite(s_x) & (s_x > 0), s_x, 1.0)
    return s_y, (np.append(s_x, 1.0) if fit_intercept else s_x)


class _NewtonSolve:
    """Solves ``H d = -g`` for Newton's direction, safe where ``H`` is (nearly) singular.

    Cholesky on ``H`` scaled to a unit diagonal; where a pivot falls below
    ``cutoff`` of its diagonal entry (collinear features: duplicated columns,
    say, whose Hessian float rounding leaves barely positive definite), a
    pseudo-inverse from the scaled ``H``'s eigenvalues instead, those below
    ``cutoff`` times the largest taken as 0: the minimum-norm step, which leaves
    the collinear directions alone.
    """

    def __init__(self, H: np.ndarray, cutoff: float):
        d = np.sqrt(np.maximum(np.diag(H), 0.0))
        self.scale = np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)
        Hs = H * np.outer(self.scale, self.scale)
        self.factor, self.eig = None, None
        try:
            L = np.linalg.cholesky(Hs)
            if float(np.min(np.diag(L)) ** 2) > cutoff:
                self.factor = L
        except np.linalg.LinAlgError:
            pass
        if self.factor is None:
            vals, vecs = np.linalg.eigh(Hs)
            keep = vals > cutoff * max(float(vals[-1]), 0.0)
            self.eig = (vals[keep], vecs[:, keep])

    def __call__(self, g: np.ndarray) -> np.ndarray:
        gs = g * self.scale
        if self.factor is not None:
            x = np.linalg.solve(self.factor.T, np.linalg.solve(self.factor, gs))
        else:
            vals, vecs = self.eig
            x = vecs @ ((vecs.T @ gs) / vals)
        return -x * self.scale


def _newton_cutoff(dtype) -> float:
    """Below this (relative) an eigenvalue of the unit-diagonal Hessian is rounding: its
    products are in X's dtype (float32 Hessians are good to a few 1e-7)."""
    return max(1e-10, 100.0 * float(np.finfo(dtype).eps))


def hessian_every(family: str, n_rows: int, n_params: int) -> int:
    """One row in how many the Newton Hessian sums over (1: every row).

    Sampled only for losses whose Hessian changes with the parameters, from
    :data:`HESSIAN_ROWS_PER_PARAM` rows per parameter up: with the exact
    gradient and the line search, a Hessian from ``m`` rows (relative error
    about ``sqrt(p / m)``) keeps Newton's few iterations, at a fraction of
    the ``X^T W X`` products, which dominate a Newton pass.
    """
    if family not in ("binomial", "huber"):
        return 1
    return max(1, n_rows // (HESSIAN_ROWS_PER_PARAM * n_params))


#: Blocks of ``y`` one task of :func:`find_classes` reads.
CLASS_BLOCKS_PER_TASK = 8


def find_classes(y_in, estimator: str, *also):
    """``(classes, counts)`` of the labels (one pass over ``y``); at least two classes.

    One task per :data:`CLASS_BLOCKS_PER_TASK` blocks counts their labels;
    the counts are merged here (far cheaper than ``dask.array.unique``'s
    graph). Lazy values in ``also`` are computed in the same round trip;
    their values follow: ``(classes, counts, *also)``.
    """
    blocks = list(y_in.to_delayed(optimize_graph=True).ravel())
    task = dask.delayed(label_counts, pure=True)
    step = CLASS_BLOCKS_PER_TASK
    parts = [task(*blocks[i : i + step]) for i in range(0, len(blocks), step)]
    n_parts = len(parts)
    values = _graph.compute(*parts, *also)
    classes, counts = combine_label_counts(*values[:n_parts])
    check_classes(classes, estimator)
    return (classes, counts, *values[n_parts:])


def check_classes(classes: np.ndarray, estimator: str) -> None:
    """At least two classes, or a ValueError that says so."""
    if classes.size < 2:
        raise ValueError(f"y has a single class ({classes.tolist()}); {estimator} "
                         "needs samples of at least 2 classes")


def class_weight_rows(class_weight: Any, w_in, y_in, classes: np.ndarray, counts: np.ndarray):
    """Per-row weights: ``class_weight`` ("balanced", a dict or None) times ``sample_weight``."""
    cw = class_weight
    if cw is None:
        return w_in
    if isinstance(cw, str) and cw == "balanced":
        table = counts.sum() / (classes.size * counts.astype(np.float64))
    elif isinstance(cw, dict):
        unknown = set(cw) - set(classes.tolist())
        if unknown:
            raise ValueError(f"class_weight has classes {sorted(unknown)} that are not in y "
                             f"(classes: {classes.tolist()})")
        table = np.array([float(cw.get(c, 1.0)) for c in classes.tolist()])
    else:
        raise ValueError(f"class_weight={cw!r} should be a dict, 'balanced' or None")
    per_row = y_in.map_blocks(_class_weight_block, classes, table, dtype=np.float64)
    return per_row if w_in is None else per_row * w_in


class LinearPredictorMixin:
    """``X coef^T + intercept`` for any fitted linear model (``coef_``, ``intercept_``)."""

    def _decision(self, X):
        Xd = data.as_fitted_matrix(self, X, "coef_")
        coef = np.atleast_2d(self.coef_)
        intercept = np.atleast_1d(self.intercept_).astype(np.float64)
        # (a fit that worked on X - mean computes the product there too: see _LinearModel)
        params = {"coef": coef, "intercept": intercept, "center": getattr(self, "_center", None)}
        out = _graph.map_rows(Xd, _linear_block, params, np.float64, n_columns=coef.shape[0])
        return out


class LinearClassifierMixin(LinearPredictorMixin):
    """Outputs of a fitted linear classifier with ``classes_``: one decision column
    for two classes, one per class otherwise."""

    def decision_function(self, X: Any) -> Any:
        """``X coef^T + intercept``: shape (n_samples,) for two classes, else (n_samples, n_classes)."""
        out = self._decision(X)
        out = out[:, 0] if self.classes_.size == 2 else out
        return out if data.is_lazy(X) else _graph.compute(out)[0]

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, shape (n_samples, n_classes)."""
        Z = self._decision(X)
        out = Z.map_blocks(_probabilities, dtype=np.float64,
                           chunks=(Z.chunks[0], (self.classes_.size,)))
        return out if data.is_lazy(X) else _graph.compute(out)[0]

    def predict(self, X: Any) -> Any:
        """Most probable class of each row."""
        Z = self._decision(X)
        idx = (Z[:, 0] > 0).astype(np.int64) if self.classes_.size == 2 else Z.argmax(axis=1)
        out = idx.map_blocks(_take, self.classes_, dtype=self.classes_.dtype)
        return out if data.is_lazy(X) else _graph.compute(out)[0]


class LinearRegressorMixin(LinearPredictorMixin):
    """``predict`` of a fitted linear regressor with a 1-D ``coef_``."""

    def predict(self, X: Any) -> Any:
        """Predictions; a lazy dask array for lazy input."""
        out = self._decision(X)[:, 0]
        return out if data.is_lazy(X) else _graph.compute(out)[0]


class _LinearModel(BaseEstimator):
    """What the three estimators share: validation, the passes and the solvers."""

    _family = "squared"

    # ---------------------------------------------------------------- helpers
    def _penalty_strength(self) -> float:
        raise NotImplementedError

    def _check_common(self):
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral) \
                or self.max_iter < 1:
            raise ValueError(f"max_iter={self.max_iter!r} should be an integer >= 1")
        if not isinstance(self.tol, numbers.Real) or not self.tol > 0:
            raise ValueError(f"tol={self.tol!r} should be a number > 0")
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver={self.solver!r} should be one of {_SOLVERS}")
        if not isinstance(self.fit_intercept, bool):
            raise ValueError(f"fit_intercept={self.fit_intercept!r} should be True or False")
        _graph.check_split_every(self.split_every)

    def _solve(self, passes: _graph.Passes, n_features: int, n_classes: int) -> np.ndarray:
        """Minimise ``(sum_i w_i loss_i + lam/2 ||coef||^2) / sum_i w_i``; assumes validated input."""
        family, fit_intercept = self._family, self.fit_intercept
        p = n_params(family, n_features, n_classes, fit_intercept)
        lam, lam1 = self._penalty_strength(), self._l1_strength()
        solver = self.solver
        if lam1 > 0:
            if solver not in ("auto", "fista"):
                raise ValueError(f"solver={solver!r} cannot handle an L1 penalty; use "
                                 "solver='fista' (or 'auto')")
            solver = "fista"
        if solver == "auto":
            solver = "newton" if family != "multinomial" and p <= NEWTON_MAX_PARAMS else "lbfgs"
        if solver == "newton" and family == "multinomial":
            raise ValueError("solver='newton' handles binary logistic and least squares; "
                             "use solver='lbfgs' for more than two classes")
        mask = np.ones(p)
        if fit_intercept:
            k = n_classes if family == "multinomial" else 1
            mask[k * n_features:] = 0.0  # the intercept is never penalised
        common = dict(family=family, fit_intercept=fit_intercept, n_classes=n_classes)
        self.history_ = []
        bar = progress_bar(self.progress, total=self.max_iter, desc=type(self).__name__)

        dtype = passes.blocks.X.dtype
        dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
        # shift: the point the kernels measure X from (None: the origin); units: (s_y, s)
        # with the gradient divided by s_y * s before the comparison with tol (least squares
        # only: see _squared_units; None: the gradient as it is)
        state = {"shift": None, "y_shift": 0.0, "fixed": None, "units": None, "first": True,
                 "features": None}

        def run(theta, hessian, *, name, **kw):
            args = dict(common, theta=theta, hessian=hessian, shift=state["shift"])
            if state["y_shift"] and args["family"] == "squared":
                args["y_shift"] = state["y_shift"]
            args.update(kw)
            return passes.run(glm_partial, combine_glm, args, name=name)

        def gram():
            """``[X 1]^T W [X 1] / sum(w)``: one pass (the squared loss's Hessian)."""
            t0 = time.perf_counter()
            theta0 = np.zeros(n_features + int(fit_intercept))
            part = run(theta0, True, family="squared", name="gram")
            return part.hess / part.weight, time.perf_counter() - t0

        precise = {"on": False}
        # Newton's Hessian from a sample of the rows (gd and FISTA take their step size from
        # the Hessian's largest eigenvalue, which a sample does not bound: every row there)
        sampled = {"every": hessian_every(family, passes.blocks.X.shape[0], p)
                   if solver == "newton" else 1}

        def first_pass(theta, hessian, name):
            """The first evaluation (at ``theta = 0``, the same point whatever the shift),
            which also brings the data's statistics: they decide the shift and the units."""
            squared = family == "squared"
            part = run(theta, hessian, name=name, precise=precise["on"],
                       hessian_every=sampled["every"], y_moments=squared)
            mean, var, constant = state["features"] = _features(passes.stats, dtype)
            with np.errstate(over="ignore", invalid="ignore"):
                far = ~constant & (mean * mean > FAR_FROM_ORIGIN * var)
            if fit_intercept and constant.any():
                # a constant feature is collinear with the intercept: its coefficient stays
                # 0, as scikit-learn's centring makes it (the gradient and the Hessian
                # leave that coordinate alone)
                k = n_classes if family == "multinomial" else 1
                state["fixed"] = (np.arange(k)[:, None] * n_features
                                  + np.flatnonzero(constant)[None, :]).ravel()
            y_far = False
            if squared and fit_intercept:
                ym = part.y_moments
                y_mean = float(ym.col_sum[0]) / ym.weight
                y_far = bool(y_mean * y_mean > FAR_FROM_ORIGIN * float(ym.col_m2[0]) / ym.weight)
            if fit_intercept and (far.any() or y_far):
                # far from the origin: X^T X has lost the spread around the mean in any
                # float precision, and the intercept and the coefficients are near-collinear.
                # Work on X - mean (the intercept absorbs the shift); one more pass. A y far
                # from 0 makes every residual a difference of large numbers: fit y - mean.
                state["shift"] = mean.astype(dtype) if far.any() else None
                state["y_shift"] = float(y_mean) if y_far else 0.0
                part = run(theta, hessian, name=name, precise=precise["on"],
                           hessian_every=sampled["every"], y_moments=squared)
            if squared:
                state["units"] = _squared_units(part.y_moments, mean, var, constant,
                                                fit_intercept)
            return part

        def evaluate(theta, hessian=False):
            """``(f, g, H, seconds)`` at ``theta``; ``evaluate.runs``: the passes it took."""
            t0, before = time.perf_counter(), passes.count
            evaluate.precise = precise["on"]  # whether this evaluation is in float64
            f, g, H = _evaluate(theta, hessian)
            evaluate.runs = passes.count - before
            return f, g, H, time.perf_counter() - t0

        def _evaluate(theta, hessian):
            name = f"{family}-{'newton' if hessian else 'grad'}"
            if state["first"]:
                state["first"] = False
                part = first_pass(theta, hessian, name)
            else:
                part = run(theta, hessian, name=name, precise=precise["on"],
                           hessian_every=sampled["every"])
            if hessian and sampled["every"] > 1 and part.hess_weight <= 0:
                sampled["every"] = 1  # a sample without weight: the whole Hessian instead
                return _evaluate(theta, hessian)
            scale = 1.0 / part.weight
            evaluate.fista_setup = {"weight": part.weight, "lam": lam, "lam1": lam1,
                                    "mask": mask, "gram": gram}
            f = (part.loss + 0.5 * lam * float(theta @ (mask * theta))) * scale
            g = (part.grad + lam * mask * theta) * scale
            # near the optimum the float32 rounding of z and of the gradient hides the
            # loss's decrease: from here on, every pass computes them in float64 (see
            # glm_partial's `precise`)
            s_y, s = units()
            precise["on"] = precise["on"] or float(np.abs(g / (s_y * s)).max()) <= PRECISE_BELOW
            H = None if part.hess is None else (
                part.hess * (part.weight / part.hess_weight) + lam * np.diag(mask)) * scale
            fixed = state["fixed"]
            if fixed is not None:
                g[fixed] = 0.0
                if H is not None:
                    free = np.setdiff1d(np.arange(p), fixed)
                    diagonal = float(np.mean(np.diag(H)[free])) if free.size else 1.0
                    H[fixed, :] = 0.0
                    H[:, fixed] = 0.0
                    H[fixed, fixed] = diagonal if diagonal > 0 else 1.0
            return f, g, H

        def units() -> tuple[float, np.ndarray]:
            """``(s_y, s)``: see ``state``; ``(1, 1)`` where the gradient is taken as it is."""
            return state["units"] or (1.0, np.ones(p))

        def small(g) -> bool:
            """Whether the gradient (or FISTA's gradient mapping) meets ``tol``."""
            s_y, s = units()
            return bool(np.abs(g / (s_y * s)).max() <= self.tol)

        def whole_hessian() -> bool:
            """From now on the Hessian over every row; False if it already was."""
            if sampled["every"] == 1:
                return False
            sampled["every"] = 1
            return True

        def unsafe(H) -> bool:
            """Whether Newton's Hessian cannot be trusted: not finite, or some feature's
            squares beyond the normal range of X's dtype, where the products that sum it
            overflow or lose their digits (float32 beyond about 1e15 for a million rows, or
            below 1e-16): Newton then hands over to L-BFGS, whose passes need no squares."""
            info = np.finfo(dtype)
            mean, var, _ = state["features"]
            with np.errstate(over="ignore", invalid="ignore"):
                sq = var + mean * mean
                big = sq > float(info.max) / (16.0 * max(passes.stats.n_rows, 1))
                small = (sq > 0) & (sq < float(info.tiny) / float(info.eps))
            return bool(big.any() or small.any() or not np.isfinite(sq).all()
                        or (H is not None and not np.isfinite(H).all()))

        def refuse_unsafe(H, name: str) -> None:
            """gd and FISTA take their step from the Hessian's largest eigenvalue: where the
            Hessian cannot be trusted (see ``unsafe``), a clear error."""
            if unsafe(H):
                raise ValueError(
                    f"solver={name!r}: X's squares overflow or underflow {dtype} (features "
                    f"of root mean square beyond about 1e15 or below 1e-16), so the step size "
                    "cannot be bounded; scale X (dmlkit.StandardScaler) or use solver='lbfgs'")

        evaluate.small = small
        evaluate.units = units
        evaluate.unsafe = unsafe
        evaluate.refuse_unsafe = refuse_unsafe
        evaluate.cutoff = _newton_cutoff(dtype)
        evaluate.whole_hessian = whole_hessian

        theta = np.zeros(p)
        try:
            solve = {"lbfgs": self._lbfgs, "newton": self._newton, "gd": self._gd,
                     "fista": self._fista}[solver]
            theta = solve(evaluate, theta, bar)
        finally:
            bar.close()
        self.n_passes_ = passes.count
        center = None if state["shift"] is None else state["shift"].astype(np.float64)
        if state["shift"] is not None or state["y_shift"]:
            # back from X - shift and y - y_shift to X and y: the intercept takes both
            theta = theta.copy()
            coef, intercept = split_theta(theta, family, n_features, fit_intercept)
            if state["shift"] is not None:
                intercept -= coef @ state["shift"].astype(np.float64)
            intercept += state["y_shift"]
        if not self.converged_:
            if self.n_iter_ >= self.max_iter:
                why = f"did not converge in max_iter={self.max_iter} iterations"
                fix = "increase max_iter or tol"
            else:
                why = (f"stopped after {self.n_iter_} iterations: no step lowers the objective "
                       "any more within floating point precision")
                fix = "tol is below what this data's precision allows; increase it"
            warnings.warn(f"{type(self).__name__} {why} (solver={solver!r}, tol={self.tol}); {fix}",
                          ConvergenceWarning, stacklevel=3)
        self._center = center  # (with the coefficients: a warning raised as an error stops both)
        return theta

    def _record(self, f, g, step, seconds, passes, bar, float64=False):
        self.history_.append({"iteration": len(self.history_) + 1, "objective": f,
                              "grad_norm": float(np.abs(g).max()), "step": step,
                              "seconds": seconds, "passes": passes, "float64": bool(float64)})
        bar.update(1)
        bar.set_postfix_str(f"objective {f:.6g}")

    def _lbfgs(self, evaluate, theta, bar, start=None):
        """scipy's L-BFGS-B; every function evaluation is one pass (loss and gradient).

        scipy works in the problem's units (see ``_squared_units``): on ``u`` with
        ``theta = u s_y / s`` and the objective divided by ``s_y^2``, whose gradient is the
        one ``tol`` is compared with, so that scipy's ``gtol`` is ``tol`` and its line
        search and ``ftol`` see a problem of unit scale whatever the data's units.
        """
        if start is None:  # (Newton hands over its last evaluation when it cannot go on)
            f0, g0, _, sec0 = evaluate(theta)  # the first pass, which sets the units
            start = (f0, g0, sec0, evaluate.runs)
        s_y, s = evaluate.units()
        to_theta, f_unit = s_y / s, s_y * s_y
        u0 = theta / to_theta
        last = {"theta": theta, "g": start[1], "passes": 0, "seconds": 0.0, "start": start}

        def fun(u):
            start, last["start"] = last["start"], None
            if start is not None and np.array_equal(u, u0):  # scipy's first call: the start
                f, g, sec, runs = start
            else:
                f, g, _, sec = evaluate(u * to_theta)
                runs = evaluate.runs
            last["g"] = g
            last["passes"] += runs
            last["seconds"] += sec
            return f / f_unit, g * to_theta / f_unit

        def callback(intermediate_result):
            x = intermediate_result.x * to_theta
            step = float(np.abs(x - last["theta"]).max())
            last["theta"] = x.copy()
            self._record(float(intermediate_result.fun) * f_unit, last["g"], step,
                         last["seconds"], last["passes"], bar, evaluate.precise)
            last["passes"], last["seconds"] = 0, 0.0

        done = len(self.history_)  # (iterations Newton made before handing over)
        res = minimize(fun, u0, jac=True, method="L-BFGS-B", callback=callback,
                       options={"maxiter": self.max_iter - done, "gtol": self.tol,
                                "maxls": 50, "ftol": 64 * np.finfo(float).eps})
        self.n_iter_ = len(self.history_)
        # judged on the gradient, like the other solvers: scipy also stops when
        # the objective no longer decreases, which float32 data reach first
        self.converged_ = evaluate.small(res.jac * f_unit / to_theta)
        return res.x * to_theta

    def _l1_strength(self) -> float:
        return 0.0

    def _fista(self, evaluate, theta, bar):
        """FISTA (Beck and Teboulle 2009) with adaptive restart, for L1 and elastic net.

        The smooth part (loss and any L2 term) takes gradient steps of ``1/L``;
        the L1 term is applied by soft-thresholding (its proximal operator);
        one pass per iteration, at the extrapolated point. ``L`` bounds the
        smooth part's curvature everywhere: the Hessian at ``theta = 0`` for
        binary logistic (its curvature is largest there) and least squares,
        and Bohning's bound ``0.5 [X 1]^T W [X 1]`` for the multinomial loss
        (one more pass). Momentum restarts when it stops pointing downhill
        (O'Donoghue and Candes 2015). Converged when the gradient mapping
        ``L (y - x_next)`` is at most ``tol`` everywhere.
        """
        multinomial = self._family == "multinomial"
        f, g, H, sec = evaluate(theta, hessian=not multinomial)
        evaluate.refuse_unsafe(H, "fista")
        passes, seconds = evaluate.runs, sec
        setup = evaluate.fista_setup  # set by the first evaluation
        W, lam, mask = setup["weight"], setup["lam"], setup["mask"]
        l1 = setup["lam1"] / W
        if multinomial:
            G, sec = setup["gram"]()
            passes, seconds = passes + 1, seconds + sec
            L = 0.5 * float(np.linalg.eigvalsh(G)[-1]) + lam / W
        else:
            L = float(np.linalg.eigvalsh(H)[-1])
        L = max(L, 1e-12)
        pen = mask > 0

        def prox(v):
            out = v.copy()
            out[pen] = np.sign(v[pen]) * np.maximum(np.abs(v[pen]) - l1 / L, 0.0)
            return out

        x, y, t = theta, theta, 1.0
        self.converged_ = False
        for _ in range(self.max_iter):
            x_next = prox(y - g / L)
            mapping = L * (y - x_next)
            if evaluate.small(mapping):
                x = x_next
                self.converged_ = True
                break
            if float((y - x_next) @ (x_next - x)) > 0:
                t, y = 1.0, x_next  # restart: momentum points uphill
            else:
                t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
                y = x_next + ((t - 1.0) / t_next) * (x_next - x)
                t = t_next
            x = x_next
            f, g, _, sec = evaluate(y)
            passes, seconds = passes + evaluate.runs, seconds + sec
            objective = f + l1 * float(np.abs(y[pen]).sum())
            self._record(objective, mapping, 1.0 / L, seconds, passes, bar, evaluate.precise)
            passes, seconds = 0, 0.0
        self.n_iter_ = len(self.history_)
        return x

    def _gd(self, evaluate, theta, bar):
        """Gradient descent ``theta <- theta - eta grad``, one pass per iteration.

        The first step is ``1 / L`` with ``L`` the largest eigenvalue of the
        Hessian at the start, computed in the same first pass (at ``theta = 0``
        the logistic curvature is at its maximum, so this bounds it
        everywhere); multinomial starts from ``eta = 1``. Later steps are
        Barzilai-Borwein ``s.s / s.y`` from the last two iterates, which needs
        no extra pass. A step that raises the objective above the largest of
        the last 10 values is halved and retried (one pass per retry).
        """
        hessian = self._family != "multinomial"
        f, g, H, sec = evaluate(theta, hessian=hessian)
        evaluate.refuse_unsafe(H, "gd")
        passes, seconds = evaluate.runs, sec
        eta = 1.0 / max(float(np.linalg.eigvalsh(H)[-1]), 1e-12) if hessian else 1.0
        recent = [f]
        for _ in range(self.max_iter):
            if evaluate.small(g):
                break
            for _ in range(30):
                candidate = theta - eta * g
                f_new, g_new, _, sec = evaluate(candidate)
                passes, seconds = passes + evaluate.runs, seconds + sec
                if f_new <= max(recent) - 1e-4 * eta * float(g @ g):
                    break
                eta *= 0.5
            s_, y_ = candidate - theta, g_new - g
            sy = float(s_ @ y_)
            theta, f, g = candidate, f_new, g_new
            self._record(f, g, eta, seconds, passes, bar, evaluate.precise)
            passes, seconds = 0, 0.0
            recent = (recent + [f])[-10:]
            if sy > 0:
                eta = float(s_ @ s_) / sy
        self.converged_ = evaluate.small(g)
        self.n_iter_ = len(self.history_)
        return theta

    def _refine(self, evaluate, theta, bar):
        """Newton for least squares: the normal equations from one pass, then refinement.

        The objective is quadratic and the first pass's Hessian exact, so every
        step is the full Newton step and no line search is needed; each later
        pass only evaluates the gradient at the new point, and a step solves
        with the same Hessian (iterative refinement: each pass gains the
        digits that rounding took from the last). Stops when the gradient
        meets ``tol``. Where a step raises the objective, or stops halving a
        gradient computed in float64 short of ``tol`` (a Hessian whose float32
        products are too coarse for the problem's conditioning), L-BFGS goes on
        from the best point.
        """
        f, g, H, sec = evaluate(theta, hessian=True)
        if evaluate.unsafe(H):
            return self._lbfgs(evaluate, theta, bar, start=(f, g, sec, evaluate.runs))
        passes, seconds = evaluate.runs, sec
        exact = evaluate.precise  # g in float64 (float32 data's first passes are not)
        solve = _NewtonSolve(H, evaluate.cutoff)
        for _ in range(self.max_iter):
            if evaluate.small(g) or not np.isfinite(g).all():
                break
            direction = solve(g)
            candidate = theta + direction
            f_new, g_new, _, sec = evaluate(candidate)
            passes, seconds = passes + evaluate.runs, seconds + sec
            before, after = float(np.abs(g).max()), float(np.abs(g_new).max())
            if not f_new <= f + 1e-6 * abs(f) or (exact and after > 0.5 * before):
                # worse, or no better, than rounding allows: if the point is not done,
                # the Hessian is not good enough for this problem
                if f_new < f:
                    theta, f, g = candidate, f_new, g_new
                    self._record(f, g, float(np.abs(direction).max()), seconds, passes, bar, evaluate.precise)
                    passes, seconds = 0, 0.0
                if evaluate.small(g) or len(self.history_) >= self.max_iter:
                    break
                return self._lbfgs(evaluate, theta, bar, start=(f, g, seconds, passes))
            theta, f, g = candidate, f_new, g_new
            self._record(f, g, float(np.abs(direction).max()), seconds, passes, bar, evaluate.precise)
            passes, seconds = 0, 0.0
            # (a step from a float32 gradient is as good as that gradient: go on)
            exact = evaluate.precise
        self.converged_ = evaluate.small(g)
        self.n_iter_ = len(self.history_)
        return theta

    def _newton(self, evaluate, theta, bar):
        """Newton's method with step halving; one pass (gradient and Hessian) per trial point."""
        if self._family == "squared":
            return self._refine(evaluate, theta, bar)
        f, g, H, sec = evaluate(theta, hessian=True)
        if evaluate.unsafe(H):
            return self._lbfgs(evaluate, theta, bar, start=(f, g, sec, evaluate.runs))
        passes, seconds = evaluate.runs, sec
        for _ in range(self.max_iter):
            if evaluate.small(g):
                break
            direction = _NewtonSolve(H, evaluate.cutoff)(g)
            step, accepted = 1.0, False
            floor = 4 * np.finfo(float).eps * abs(f)  # the objective's rounding
            g_max = float(np.abs(g).max())
            for _ in range(8):  # backtracking: each trial point is one pass
                candidate = theta + step * direction
                f_new, g_new, H_new, sec = evaluate(candidate, hessian=True)
                passes, seconds = passes + evaluate.runs, seconds + sec
                if f_new <= f + 1e-4 * step * float(g @ direction) or (
                        abs(f_new - f) <= floor and float(np.abs(g_new).max()) < g_max):
                    # (within the objective's rounding, a smaller gradient is the progress
                    # left to see: a sampled Hessian converges linearly down to there)
                    accepted = True
                    break
                step *= 0.5
            if not accepted and evaluate.whole_hessian():
                # a Hessian from a sample of the rows can miss a direction the data barely
                # vary in: go on with the whole Hessian
                f, g, H, sec = evaluate(theta, hessian=True)
                passes, seconds = passes + evaluate.runs, seconds + sec
                continue
            if not accepted or (f - f_new <= floor
                                and float(np.abs(g_new).max()) > 0.5 * g_max):
                if accepted:  # the objective cannot decrease any more: keep the point, stop
                    theta, f, g, H = candidate, f_new, g_new, H_new
                    self._record(f, g, float(step * np.abs(direction).max()), seconds, passes, bar, evaluate.precise)
                break  # no decrease left within floating point precision: stop
            theta, f, g, H = candidate, f_new, g_new, H_new
            self._record(f, g, float(step * np.abs(direction).max()), seconds, passes, bar, evaluate.precise)
            passes, seconds = 0, 0.0
        self.converged_ = evaluate.small(g)
        self.n_iter_ = len(self.history_)
        return theta

    def _run(self, X_in, y_fit, w_fit, source, n_classes):
        Xd, (yd, wd), _ = data.cache(X_in, [y_fit, w_fit], self.cache, source)
        blocks = _graph.RowBlocks(Xd, wd, yd)
        passes = _graph.Passes(blocks, self.split_every, check=lambda s: data.check_stats(
            s, X_in.chunks[0], wd is not None, supervised=True))
        # the solver's own products on the client (directions, line searches, scipy's
        # L-BFGS-B) on one BLAS thread too: the same bits whatever this process's setting
        with _graph.one_blas_thread:
            return self._solve(passes, X_in.shape[1], n_classes)


class LinearRegression(RegressorMixin, LinearRegressorMixin, _LinearModel):
    """Ordinary least squares, fitted by distributed Newton (one pass) or L-BFGS.

    Minimises ``sum_i w_i (y_i - x_i coef - intercept)^2`` like
    :class:`sklearn.linear_model.LinearRegression`.

    Parameters
    ----------
    fit_intercept : bool, default=True
    solver : {"auto", "newton", "lbfgs", "gd"}, default="auto"
        "newton" solves the normal equations from one pass computing
        ``X^T W X`` and ``X^T W y``; a second pass confirms the gradient is 0,
        or refines the solution where rounding left more (float32 data: a
        third pass, in float64). "auto" uses it up to 1,000 features.
    max_iter : int, default=100
    tol : float, default=1e-8
        Stop when every entry of the objective's gradient (divided by the
        total weight), divided in turn by the standard deviations of ``y``
        and of its feature, is at most ``tol``: the gradient the same fit
        would have on standardised ``X`` and ``y``, so that ``tol`` means the
        same whatever their units. (Without an intercept, root mean squares
        replace the standard deviations.)
    split_every : int or None, default=None
    cache : {"auto", True, False}, default="auto"
    progress : bool, default=False

    Attributes
    ----------
    coef_ : ndarray of shape (n_features,)
    intercept_ : float
    n_iter_, converged_, n_passes_, n_features_in_
    history_ : list of dict
        Per iteration: ``objective`` (scikit-learn's objective divided by
        twice the total weight: ``sum w r^2 / 2 + alpha ||coef||^2 / 2``, over
        ``sum w``), ``grad_norm``, ``step``, ``seconds``, ``passes``, and
        ``float64``: whether the iteration's (last) pass computed ``z`` and the
        gradient in float64 (float32 data near the optimum, see
        :data:`PRECISE_BELOW`).

    Notes
    -----
    Newton costs two passes in all on float64 data (three to five on float32,
    whose first passes compute in float32); L-BFGS one pass per function
    evaluation. L-BFGS works in the units above (on standardised
    parameters), so badly scaled data do not stall its line search; "gd"
    does not, and needs features of similar scale. Where a feature's squares,
    summed over the rows, leave the normal range of ``X``'s dtype (float32
    values beyond about 1e15 for a million rows, or below 1e-16), the
    Hessian's products overflow or lose their digits: Newton then hands over
    to L-BFGS, and "gd" raises an error (scale X first). Newton solves for
    the minimum-norm step where the Hessian is singular to its precision
    (collinear features), and hands over to L-BFGS if its steps stop helping.

    Data far from the origin (some feature's mean beyond 10 standard
    deviations: float32 data around 1e4, say) lose their spread in
    ``X^T X`` at any float precision. With ``fit_intercept=True`` the first
    pass sees it (the data's statistics come with it), and the fit then
    works on ``X - mean`` (one more pass, the subtraction in every later
    one; ``history_``'s gradients and steps are those of that problem);
    ``intercept_`` is that of ``X``, and predictions subtract the same mean.
    A ``y`` far from 0 likewise: the fit is of ``y - mean``. Without an
    intercept the problem itself is ill-conditioned there. A constant
    feature, collinear with the intercept, gets coefficient 0, as
    scikit-learn's centring gives it.
    """

    _family = "squared"

    def __init__(self, *, fit_intercept: bool = True, solver: str = "auto", max_iter: int = 100,
                 tol: float = 1e-8, split_every: int | None = None, cache: bool | str = "auto",
                 progress: bool = False):
        self.fit_intercept = fit_intercept
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.split_every = split_every
        self.cache = cache
        self.progress = progress

    def _penalty_strength(self) -> float:
        return 0.0

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None):
        """Fit on ``X`` (array, dask, xarray or Zarr path) and ``y`` (or the store's ``y``)."""
        self._check_common()
        X_in, y_in, w_in = prepare_supervised(X, y, sample_weight)
        if y_in.dtype.kind not in "fiub":
            raise TypeError(f"y.dtype={y_in.dtype} is not numeric")
        theta = self._run(X_in, y_in, w_in, X, 1)
        coef, intercept = split_theta(theta, "squared", X_in.shape[1], self.fit_intercept)
        self.coef_ = coef[0]
        self.intercept_ = float(intercept[0])
        self.n_features_in_ = X_in.shape[1]
        return self

class Ridge(LinearRegression):
    """Least squares with an L2 penalty ``alpha ||coef||^2`` (intercept not penalised).

    Same parameters as :class:`LinearRegression` plus ``alpha`` (float >= 0,
    default 1.0), meaning what it means in :class:`sklearn.linear_model.Ridge`.
    """

    def __init__(self, alpha: float = 1.0, *, fit_intercept: bool = True, solver: str = "auto",
                 max_iter: int = 100, tol: float = 1e-8, split_every: int | None = None,
                 cache: bool | str = "auto", progress: bool = False):
        super().__init__(fit_intercept=fit_intercept, solver=solver, max_iter=max_iter, tol=tol,
                         split_every=split_every, cache=cache, progress=progress)
        self.alpha = alpha

    def _penalty_strength(self) -> float:
        if not isinstance(self.alpha, numbers.Real) or not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha!r} should be a number >= 0")
        # sum w r^2 + alpha ||c||^2 = 2 (sum w r^2 / 2 + alpha/2 ||c||^2)
        return float(self.alpha)


class LogisticRegression(ClassifierMixin, LinearClassifierMixin, _LinearModel):
    """Logistic regression, binary or multinomial, by distributed Newton or L-BFGS.

    Minimises scikit-learn's objective ``C sum_i w_i loss_i + ||coef||^2 / 2``
    (``penalty="l2"``; no penalty with ``penalty=None``): the binary log loss
    for two classes, the multinomial (softmax) loss for more. Coefficients can
    be compared one to one with :class:`sklearn.linear_model.LogisticRegression`.

    Parameters
    ----------
    penalty : {"l2", "l1", "elasticnet", None}, default="l2"
        scikit-learn's objectives: ``C sum w loss + ||coef||^2 / 2`` (l2),
        ``C sum w loss + ||coef||_1`` (l1), ``C sum w loss + l1_ratio ||coef||_1
        + (1 - l1_ratio) ||coef||^2 / 2`` (elasticnet). L1 and elastic net are
        solved by FISTA (proximal gradient with momentum).
    C : float > 0, default=1.0
    l1_ratio : float in [0, 1] or None, default=None
        With ``penalty="elasticnet"``.
    fit_intercept : bool, default=True
    class_weight : dict, "balanced" or None, default=None
    solver : {"auto", "newton", "lbfgs", "gd", "fista"}, default="auto"
        "auto" is FISTA with an L1 term, else Newton for two classes up to
        1,000 features, else L-BFGS.
        "gd" is plain gradient descent with Barzilai-Borwein steps (the
        course's first solver; slower to converge).
    max_iter : int, default=100
    tol : float, default=1e-6
        Stop when the largest gradient entry of the objective divided by the
        total weight is at most ``tol`` (scikit-learn's ``gtol``). With an
        intercept, data far from the origin are fitted on ``X - mean``, as
        described in :class:`LinearRegression`.
    split_every, cache, progress
        As in :class:`dmlkit.KMeans`.

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    n_iter_ : int
    converged_ : bool
        Whether the largest entry of the (scaled) gradient, or of the
        gradient mapping for FISTA, reached ``tol``.
    history_ : list of dict
        Per iteration: ``objective`` (scikit-learn's objective divided by
        ``C * sum(sample_weight)``, i.e. the mean loss plus the penalty over
        ``C`` times the total weight), ``grad_norm`` (largest entry of its
        gradient), ``step``, ``seconds``, ``passes`` over the data and
        ``float64``, as in :class:`LinearRegression`.
    n_passes_ : int
        Passes over the data in all (the pass finding the classes excluded).

    Notes
    -----
    Finding the classes costs one pass over ``y``. Newton costs one pass per
    trial point (gradient and Hessian together); L-BFGS one pass per function
    evaluation (loss and gradient together). On large data (at least 2,000
    rows per parameter) Newton sums the Hessian over a sample of about
    :data:`HESSIAN_ROWS_PER_PARAM` rows per parameter, runs of 1,024
    consecutive rows spread evenly over the data (sub-sampled Newton: the
    Hessian's products are most of a Newton pass's work); the objective and
    the gradient, hence the optimum and the stopping test, always use every
    row. Near the optimum the sampled Hessian makes convergence linear, at a
    rate of about ``sqrt(p / m)`` per iteration for ``m`` sampled rows; when
    no step along its direction lowers the objective, Newton goes on with the
    whole Hessian. Data far from the origin, constant features, collinear
    features and features whose squares leave float range are handled as in
    :class:`LinearRegression` (``tol`` stays absolute here, as in
    scikit-learn: on features of order 1e-20 it is met at once).
    """

    def __init__(self, penalty: str | None = "l2", *, C: float = 1.0, l1_ratio: float | None = None,
                 fit_intercept: bool = True, class_weight: Any = None, solver: str = "auto",
                 max_iter: int = 100, tol: float = 1e-6, split_every: int | None = None,
                 cache: bool | str = "auto", progress: bool = False):
        self.penalty = penalty
        self.C = C
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.class_weight = class_weight
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.split_every = split_every
        self.cache = cache
        self.progress = progress

    def _penalty_strength(self) -> float:
        """L2 weight in ``sum_i w_i loss_i + lam/2 ||coef||^2`` (scikit-learn's objective / C)."""
        if self.penalty == "l2":
            return 1.0 / self.C
        if self.penalty == "elasticnet":
            return (1.0 - self.l1_ratio) / self.C
        return 0.0

    def _l1_strength(self) -> float:
        if self.penalty == "l1":
            return 1.0 / self.C
        if self.penalty == "elasticnet":
            return self.l1_ratio / self.C
        return 0.0

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "LogisticRegression":
        """Fit on ``X`` (array, dask, xarray or Zarr path) and labels ``y`` (or the store's ``y``)."""
        self._check_common()
        if self.penalty not in ("l2", "l1", "elasticnet", None):
            raise ValueError(f"penalty={self.penalty!r} should be 'l2', 'l1', 'elasticnet' or None")
        if self.penalty == "elasticnet" and not (
                isinstance(self.l1_ratio, numbers.Real) and 0 <= self.l1_ratio <= 1):
            raise ValueError(f"l1_ratio={self.l1_ratio!r} should be a number in [0, 1] with "
                             "penalty='elasticnet'")
        if isinstance(self.C, bool) or not isinstance(self.C, numbers.Real) or not self.C > 0:
            raise ValueError(f"C={self.C!r} should be a number > 0")
        X_in, y_in, w_in = prepare_supervised(X, y, sample_weight)
        classes, counts = find_classes(y_in, "LogisticRegression")
        self.classes_ = classes
        K = classes.size
        y_idx = y_in.map_blocks(_labels_to_index, classes, dtype=index_dtype(K))
        w_fit = class_weight_rows(self.class_weight, w_in, y_in, classes, counts)
        self._family = "binomial" if K == 2 else "multinomial"
        theta = self._run(X_in, y_idx, w_fit, X, K)
        coef, intercept = split_theta(theta, self._family, X_in.shape[1], self.fit_intercept)
        self.coef_, self.intercept_ = coef, intercept.copy()
        self.n_features_in_ = X_in.shape[1]
        return self
