"""Stochastic gradient descent on one shard: row orders, learning rates, local steps.

A *shard* is a fixed range of ``shard_rows`` consecutive rows (the last may be
shorter), named by its first row's global number (rows are numbered on across
``partial_fit`` calls). The order in which an epoch visits a shard's rows
comes from ``(seed, pass_index, shard)`` alone, so the
arithmetic of a fit depends on the data and the parameters, never on how the
store is chunked or which worker runs what.

Two kinds of partial results, both sums so that they combine in any tree:

- :func:`local_sgd` runs mini-batch SGD over a slice of its shard's rows,
  starting from the current parameters, and returns ``rows * theta_local``
  (local SGD: the tree reduction averages the local models, weighted by rows).
- :func:`step_partial` returns the loss and gradient sums of one mini-batch
  slice (synchronous SGD: the reduced gradient makes one update).

Every row a pass visits is checked for NaN and inf (local SGD checks a whole
shard in the first of its calls over it); the global index of the first bad
row travels with the result.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from dmlkit._kernels.glm import GLMPartial, combine_glm, glm_partial, pointwise, split_theta
from dmlkit._kernels.kmeans import _as_float

SCHEDULES = ("constant", "optimal", "invscaling", "adaptive")


def shard_permutation(n: int, seed: int, pass_index: int, shard: int, shuffle: bool) -> np.ndarray:
    """The order in which pass ``pass_index`` visits the ``n`` rows of the shard whose
    first global row is ``shard`` (read-only).

    Every round of an epoch of local SGD reads another slice of the same order:
    the last :data:`PERMUTATIONS_KEPT` orders are kept (drawing one costs about
    as much as a fifth of a round's SGD on the shard).
    """
    if not shuffle:
        order = np.arange(n)
        order.setflags(write=False)
        return order
    return _permutation(int(n), int(seed), int(pass_index), int(shard))


#: Shard orders kept by :func:`shard_permutation` (per process: a worker's shards).
PERMUTATIONS_KEPT = 64


@functools.lru_cache(maxsize=PERMUTATIONS_KEPT)
def _permutation(n: int, seed: int, pass_index: int, shard: int) -> np.ndarray:
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(pass_index, shard))
    order = np.random.Generator(np.random.PCG64(seq)).permutation(n)
    order.setflags(write=False)
    return order


def shard_order(n_shards: int, seed: int, pass_index: int, shuffle: bool,
                first_row: int = 0) -> np.ndarray:
    """The order in which pass ``pass_index`` visits ``n_shards`` shards from global row
    ``first_row`` on."""
    if not shuffle:
        return np.arange(n_shards)
    seq = np.random.SeedSequence(entropy=seed, spawn_key=(int(pass_index), 2**63, int(first_row)))
    return np.random.Generator(np.random.PCG64(seq)).permutation(n_shards)


def permute_rows(block: np.ndarray, offset: int, *, seed: int, pass_index: int, row_base: int,
                 shuffle: bool) -> np.ndarray:
    """``block`` (one whole shard starting at local row ``offset``) in its visiting order."""
    return block[shard_permutation(block.shape[0], seed, pass_index, row_base + offset, shuffle)]


def optimal_t0(family: str, alpha: float) -> float:
    """Offset of the "optimal" schedule ``1 / (alpha (t0 + t))`` (Bottou's heuristic).

    As in scikit-learn: a typical weight ``sqrt(1 / sqrt(alpha))`` sets the
    first learning rate ``typw / max(1, |dloss(-typw, 1)|)``, and ``t0`` makes
    the schedule start there.
    """
    typw = np.sqrt(1.0 / np.sqrt(alpha))
    if family in ("squared",):
        slope = typw + 1.0
    elif family == "huber":
        slope = 1.0  # |d huber| <= epsilon; scikit-learn caps the slope at 1 too
    else:  # log loss and hinge: |dloss| <= 1
        slope = 1.0
    eta0 = typw / max(1.0, slope)
    return 1.0 / (eta0 * alpha)


def learning_rate(schedule: dict, t: float) -> float:
    """Learning rate of update ``t`` (0-based) under ``schedule``.

    ``schedule`` holds ``name`` (one of :data:`SCHEDULES`), ``eta0``,
    ``power_t``, ``alpha`` and ``t0``: ``eta0`` (constant, adaptive),
    ``eta0 / (t + 1)^power_t`` (invscaling), ``1 / (alpha (t0 + t))`` (optimal).
    """
    name = schedule["name"]
    if name in ("constant", "adaptive"):
        return schedule["eta0"]
    if name == "invscaling":
        return schedule["eta0"] / (t + 1.0) ** schedule["power_t"]
    return 1.0 / (schedule["alpha"] * (schedule["t0"] + t))


def apply_update(coef: np.ndarray, intercept: np.ndarray, g_coef: np.ndarray, g_int: np.ndarray,
                 eta: float, alpha: float, l1_ratio: float, fit_intercept: bool,
                 l1_state: dict | None = None) -> None:
    """One SGD update, in place.

    ``coef -= eta (g_coef + alpha (1 - l1_ratio) coef)``, then the L1 part
    ``alpha l1_ratio ||coef||_1``: with ``l1_state`` (``{"u": 0.0, "q":
    zeros_like(coef)}`` at the start of a run) by the cumulative penalty of
    Tsuruoka, Tsujii and Ananiadou (2009), as scikit-learn does, which clips
    weights that only gradient noise keeps away from zero; without it, by one
    soft-thresholding at ``eta alpha l1_ratio`` (the proximal step). The
    intercept takes the plain gradient step.
    """
    l2, l1 = alpha * (1.0 - l1_ratio), alpha * l1_ratio
    if l2:
        coef *= 1.0 - eta * l2
    coef -= eta * g_coef
    if l1 and l1_state is None:
        np.copysign(np.maximum(np.abs(coef) - eta * l1, 0.0), coef, out=coef)
    elif l1:
        l1_state["u"] += eta * l1
        u, q = l1_state["u"], l1_state["q"]
        before = coef.copy()
        np.copyto(coef, np.maximum(0.0, coef - (u + q)), where=before > 0)
        np.copyto(coef, np.minimum(0.0, coef + (u - q)), where=before < 0)
        q += coef - before
    if fit_intercept:
        intercept -= eta * g_int


def new_l1_state(coef: np.ndarray) -> dict:
    """The cumulative L1 penalty's state at the start of a run (see :func:`apply_update`)."""
    return {"u": 0.0, "q": np.zeros_like(coef)}


class SGDPartial(NamedTuple):
    """Sums over shards: ``theta_sum`` (rows-weighted local parameters), ``rows``,
    ``loss`` (weighted loss of each row before the update that used it),
    ``steps`` (the most local updates any shard made) and ``bad`` (first
    global row holding NaN or inf, or -1)."""

    theta_sum: np.ndarray
    rows: int
    loss: float
    steps: int
    bad: int


def _first_bad(bad_a: int, bad_b: int) -> int:
    if bad_a < 0:
        return bad_b
    if bad_b < 0:
        return bad_a
    return min(bad_a, bad_b)


def combine_sgd(a: SGDPartial, b: SGDPartial) -> SGDPartial:
    """Associative merge (sums, a maximum and a minimum)."""
    return SGDPartial(a.theta_sum + b.theta_sum, a.rows + b.rows, a.loss + b.loss,
                      max(a.steps, b.steps), _first_bad(a.bad, b.bad))


def class_index(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The class numbers of labels ``y`` (their positions in the sorted ``classes``).

    Raises
    ------
    ValueError
        If ``y`` holds labels that are not in ``classes``.
    """
    idx = np.searchsorted(classes, y)
    bad = (idx >= classes.size) | (classes[np.minimum(idx, classes.size - 1)] != y)
    if bad.any():
        raise ValueError(f"y holds labels {np.unique(y[bad]).tolist()} that are not in classes "
                         f"{classes.tolist()}")
    return idx


def _slice(n: int, part: int, n_parts: int) -> slice:
    return slice(part * n // n_parts, (part + 1) * n // n_parts)


def _all_finite(v: np.ndarray) -> bool:
    """No NaN or inf in ``v``: its sum is finite (one pass, no temporary), else a closer look
    (a sum can also overflow)."""
    return v.dtype.kind != "f" or bool(np.isfinite(v.sum())) or bool(np.isfinite(v).all())


def _bad_row(X, y, w, index: np.ndarray, start: int) -> int:
    """Global index of the first row of ``X[index]`` with NaN or inf (in X, y or w) or w < 0, else -1."""
    ok = np.isfinite(X).all(axis=1)
    if y is not None and y.dtype.kind == "f":
        ok &= np.isfinite(y)
    if w is not None:
        ok &= np.isfinite(w) & (w >= 0)
    if ok.all():
        return -1
    return int(start + index[~ok].min())


def local_sgd(
    X: np.ndarray, w: np.ndarray | None, offset: int, *, y: np.ndarray, theta: np.ndarray,
    family: str, n_classes: int, fit_intercept: bool, epsilon: float, alpha: float,
    l1_ratio: float, schedule: dict, t_start: float, batch_size: int, part: int, n_parts: int,
    seed: int, pass_index: int, row_base: int, shuffle: bool, classes: np.ndarray | None = None,
) -> SGDPartial:
    """Mini-batch SGD over slice ``part`` of ``n_parts`` of this shard's rows in visiting order.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
        One shard (``offset`` its first row in this input, ``row_base + offset`` its
        global row number, which names it).
    w, y : ndarray of shape (n,)
        Weights (or None) and targets, or labels with ``classes``.
    theta : ndarray of shape (p,)
        Starting parameters (see :mod:`dmlkit._kernels.glm`).
    schedule : dict
        See :func:`learning_rate`; update ``j`` of this call uses
        ``learning_rate(schedule, t_start + j)``.
    batch_size : int
        Rows per local update; the gradient is ``sum_i w_i grad_i / rows``.
    classes : ndarray or None
        Sorted class labels: ``y`` holds labels, turned into class numbers here
        (:func:`class_index`), only for the rows this call visits.

    Returns
    -------
    SGDPartial
        ``theta_sum = rows * theta_local``.
    """
    X = _as_float(X)
    n, d = X.shape
    index = shard_permutation(n, seed, pass_index, row_base + offset, shuffle)[
        _slice(n, part, n_parts)]
    w = None if w is None else np.asarray(w, dtype=np.float64)
    ys = y[index]
    ws = None if w is None else w[index]
    m = index.size
    # the pass's first call over a shard checks all of it (the others visit the same rows):
    # the whole shard at once is cheaper than row by row; rows only when something is wrong
    if part == 0 and not (_all_finite(X) and _all_finite(y)
                          and (w is None or (_all_finite(w) and (w >= 0).all()))):
        bad = _bad_row(X, y, w, np.arange(n), row_base + offset)
        if bad >= 0:
            return SGDPartial(m * theta, m, 0.0, 0, bad)
    if m == 0:
        return SGDPartial(m * theta, m, 0.0, 0, -1)
    if classes is not None:
        ys = class_index(ys, classes)
    X = np.ascontiguousarray(X)
    buffer = np.empty((min(batch_size, m), d), dtype=X.dtype)
    theta = theta.copy()
    coef, intercept = split_theta(theta, family, d, fit_intercept)
    if not fit_intercept:
        intercept = np.zeros(coef.shape[0])
    l1_state = new_l1_state(coef) if alpha * l1_ratio else None
    args = (X, index, ys, ws, coef, intercept, buffer, batch_size, schedule, float(t_start),
            alpha, l1_ratio, fit_intercept, l1_state)
    if family in ONE_COLUMN:
        loss, steps = _one_column_steps(*args, family=family)
    else:
        loss, steps = _steps(*args, family=family, epsilon=epsilon)
    return SGDPartial(m * theta, m, loss, steps, -1)


#: Families whose mini-batch steps take the lean loop of :func:`_one_column_steps`.
ONE_COLUMN = ("binomial", "squared")


def _steps(X, index, ys, ws, coef, intercept, buffer, batch_size, schedule, t, alpha, l1_ratio,
           fit_intercept, l1_state, *, family, epsilon):
    """Mini-batch steps over the rows ``X[index]``, updating ``coef`` and ``intercept`` in
    place; returns (loss of each row before its step, summed; number of steps)."""
    coef_t = coef.T.astype(X.dtype)
    loss, steps = 0.0, 0
    for s in range(0, index.size, batch_size):
        rows = index[s : s + batch_size]
        # gathered a mini-batch at a time into one buffer: cheaper than one big gather
        Xb = np.take(X, rows, axis=0, out=buffer if rows.size == buffer.shape[0] else None)
        yb = ys[s : s + batch_size]
        wb = None if ws is None else ws[s : s + batch_size]
        Z = (Xb @ coef_t).astype(np.float64)
        Z += intercept
        part_loss, D, _ = pointwise(Z, yb, wb, family, epsilon, curvature=False)
        loss += part_loss
        D *= 1.0 / Xb.shape[0]
        g_coef = D.T.astype(X.dtype) @ Xb
        apply_update(coef, intercept, g_coef, D.sum(axis=0), learning_rate(schedule, t),
                     alpha, l1_ratio, fit_intercept, l1_state)
        coef_t = coef.T.astype(X.dtype)
        t += 1.0
        steps += 1
    return loss, steps


def _one_column_steps(X, index, ys, ws, coef, intercept, buffer, batch_size, schedule, t, alpha,
                      l1_ratio, fit_intercept, l1_state, *, family):
    """:func:`_steps` for the log loss of two classes and the squared loss, in fewer NumPy
    calls per mini-batch (the derivative is ``p - y`` or ``z - y``).

    The same updates up to the last bits (``p`` comes from scipy's
    ``expit``). The decision values of every visited row are kept, and the
    loss of the rows (each before the step that used it) is summed once at
    the end.
    """
    m = index.size
    z_all = np.empty(m)
    d_all = np.empty(m)
    yf = np.asarray(ys, dtype=np.float64)
    c = coef[0]
    c_x = c.astype(X.dtype)
    steps = 0
    for s in range(0, m, batch_size):
        rows = index[s : s + batch_size]
        b = rows.size
        Xb = np.take(X, rows, axis=0, out=buffer if b == buffer.shape[0] else None)
        z = np.add(Xb @ c_x, intercept[0], out=z_all[s : s + b])
        d = d_all[s : s + b]
        if family == "binomial":
            expit(z, out=d)
            d -= yf[s : s + b]
        else:
            np.subtract(z, yf[s : s + b], out=d)
        if ws is not None:
            d *= ws[s : s + b]
        d *= 1.0 / b
        apply_update(coef, intercept, d.astype(X.dtype) @ Xb, d.sum(), learning_rate(schedule, t),
                     alpha, l1_ratio, fit_intercept, l1_state)
        c_x = c.astype(X.dtype)
        t += 1.0
        steps += 1
    loss = pointwise(z_all[:, None], ys, ws, family, curvature=False)[0] if m else 0.0
    return loss, steps


class StepPartial(NamedTuple):
    """Sums over the mini-batch slices of one synchronous step."""

    glm: GLMPartial
    rows: int
    bad: int


def combine_step(a: StepPartial, b: StepPartial) -> StepPartial:
    return StepPartial(combine_glm(a.glm, b.glm), a.rows + b.rows, _first_bad(a.bad, b.bad))


def step_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, *, y: np.ndarray, theta: np.ndarray,
    family: str, n_classes: int, fit_intercept: bool, epsilon: float, step: int, n_steps: int,
    seed: int, pass_index: int, row_base: int, shuffle: bool, classes: np.ndarray | None = None,
) -> StepPartial:
    """Loss and gradient sums of slice ``step`` of ``n_steps`` of a shard already in visiting
    order (``y`` holds labels with ``classes``, as in :func:`local_sgd`)."""
    n = X.shape[0]
    sl = _slice(n, step, n_steps)
    Xs, ys = X[sl], y[sl]
    ws = None if w is None else np.asarray(w, dtype=np.float64)[sl]
    index = np.arange(sl.start, sl.stop)
    bad = _bad_row(Xs, ys, ws, index, 0)
    if bad >= 0:  # map back to the global row through the visiting order
        shard = row_base + offset
        bad = int(shard + shard_permutation(n, seed, pass_index, shard, shuffle)[bad])
        empty = GLMPartial(0.0, np.zeros(theta.size), None, 0.0)
        return StepPartial(empty, 0, bad)
    if classes is not None:
        ys = class_index(ys, classes)
    part = glm_partial(Xs, ws, offset, y=ys, theta=theta, family=family,
                       fit_intercept=fit_intercept, n_classes=n_classes, epsilon=epsilon)
    return StepPartial(part, Xs.shape[0], -1)
