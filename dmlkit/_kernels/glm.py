"""Loss families of generalised linear models: per-chunk sums of loss, gradient, Hessian.

Each family computes, for one row block and the current parameters, the
weighted *sum* over the block's rows of the pointwise loss, its gradient and
(optionally) its Hessian, so partial results add up in any tree. Solvers
(``dmlkit.linear_model``) never see rows; they see these sums.

Parameters are one flat float64 vector ``theta``:

- ``"squared"`` and ``"binomial"``: ``coef`` (n_features,) then, with an
  intercept, ``intercept``.
- ``"multinomial"``: ``coef`` (n_classes, n_features) row-major, then
  ``intercept`` (n_classes,).

Matrix products run in ``X``'s dtype (float32 stays float32); every sum is
accumulated in float64.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dmlkit._kernels.kmeans import _as_float
from dmlkit._kernels.scratch import scratch
from dmlkit._kernels.stats import Moments, combine_moments, moments

#: Rows per sub-block inside a chunk.
SUB_BLOCK_ROWS = 8192
#: Largest float64 copy of a sub-block that ``glm_partial(precise=True)`` makes.
PRECISE_BUFFER_BYTES = 4 * 2**20
#: Rows per run of the Hessian's row sample (see ``glm_partial(hessian_every=...)``).
HESSIAN_RUN = 1024


class GLMPartial(NamedTuple):
    """Sums over rows: ``loss`` (float), ``grad`` (p,), ``hess`` (p, p) or None, ``weight``
    (float), ``hess_weight``, the weight of the rows the Hessian sums over (all of them,
    or a sample: see :func:`glm_partial`), and ``y_moments`` or None: ``y``'s
    :class:`~dmlkit._kernels.stats.Moments` (one column; exact for a ``y`` far from 0)."""

    loss: float
    grad: np.ndarray
    hess: np.ndarray | None
    weight: float
    hess_weight: float = 0.0
    y_moments: Moments | None = None


def combine_glm(a: GLMPartial, b: GLMPartial) -> GLMPartial:
    """Associative merge: sums (``y_moments`` by Chan et al.'s update)."""
    hess = None if a.hess is None else a.hess + b.hess
    moments = None if a.y_moments is None else combine_moments(a.y_moments, b.y_moments)
    return GLMPartial(a.loss + b.loss, a.grad + b.grad, hess, a.weight + b.weight,
                      a.hess_weight + b.hess_weight, moments)


def hessian_sample(offset: int, n: int, every: int) -> list[tuple[int, int]] | None:
    """Which of the rows ``offset .. offset + n`` the Hessian sample holds (None: all), as
    ``(start, stop)`` ranges of local row numbers.

    Global row ``i`` is in the sample when ``(i // HESSIAN_RUN) % every == 0``:
    runs of :data:`HESSIAN_RUN` consecutive rows, one run in ``every``, spread
    evenly over the data and fixed by the rows' global numbers (so by neither
    the chunking nor the blocks).
    """
    if every <= 1:
        return None
    back = (offset // HESSIAN_RUN) // every * every  # the last sampled run from offset back
    runs = range(back, (offset + n - 1) // HESSIAN_RUN + 1, every) if n else ()
    ranges = [(max(r * HESSIAN_RUN, offset) - offset, min((r + 1) * HESSIAN_RUN, offset + n) - offset)
              for r in runs]
    return [(a, b) for a, b in ranges if a < b]


FAMILIES = ("squared", "huber", "binomial", "multinomial", "hinge")


def n_outputs(family: str, n_classes: int) -> int:
    """Columns of the decision function: one per class for softmax and multi-class hinge."""
    if family == "multinomial" or (family == "hinge" and n_classes > 2):
        return n_classes
    return 1


def n_params(family: str, n_features: int, n_classes: int, fit_intercept: bool) -> int:
    """Length of ``theta``."""
    return n_outputs(family, n_classes) * (n_features + int(fit_intercept))


def split_theta(theta: np.ndarray, family: str, n_features: int, fit_intercept: bool):
    """``(coef, intercept)`` views of ``theta``: shapes (k, d) and (k,) (k=1 unless multinomial)."""
    p = n_features
    k = theta.size // (p + int(fit_intercept))
    coef = theta[: k * p].reshape(k, p)
    intercept = theta[k * p :] if fit_intercept else np.zeros(k)
    return coef, intercept


def _gram(X: np.ndarray, v: np.ndarray, fit_intercept: bool) -> np.ndarray:
    """``[X 1]^T diag(v) [X 1]`` in float64 (the products in X's dtype)."""
    d = X.shape[1]
    vx = v.astype(X.dtype, copy=False)
    out = np.empty((d + fit_intercept, d + fit_intercept))
    out[:d, :d] = (X * vx[:, None]).T @ X
    if fit_intercept:
        col = vx @ X
        out[:d, d] = out[d, :d] = col
        out[d, d] = float(v.sum())
    return out


def _binomial(z: np.ndarray, yf: np.ndarray, w: np.ndarray | None, curvature: bool):
    """:func:`pointwise` for the log loss, from one exponential ``e = exp(-|z|)``.

    ``loss = max(z, 0) + log(1 + e) - y z``; ``q = e / (1 + e)`` is the smaller
    of ``p`` and ``1 - p`` (``p`` the sigmoid of ``z``), exact to its last bits
    however far ``z`` is from 0, so ``p - y = copysign(1/2 - q, z) - (y - 1/2)``
    and the curvature ``p (1 - p) = q (1 - q)`` keep their precision.
    ``log(1 + e)`` rounds by about 1e-16 absolute, nothing against a sum of
    losses.
    """
    e = np.abs(z)
    np.negative(e, out=e)
    np.exp(e, out=e)
    t = np.add(e, 1.0)
    positive = np.maximum(z, 0.0)
    np.log(t, out=t)
    if w is None:
        loss = float(positive.sum()) + float(t.sum()) - float(yf @ z)
    else:
        loss = float(w @ positive) + float(w @ t) - float(w @ (yf * z))
    np.add(e, 1.0, out=t)
    q = np.divide(e, t, out=e)
    c = None
    if curvature:
        c = q * (1.0 - q)
        if w is not None:
            c *= w
    d = np.subtract(0.5, q, out=t)
    np.copysign(d, z, out=d)  # p - 1/2
    d -= yf
    d += 0.5  # p - y
    if w is not None:
        d *= w
    return loss, d[:, None], c


def pointwise(Z: np.ndarray, y: np.ndarray, w: np.ndarray | None, family: str,
              epsilon: float = 1.35, curvature: bool = True):
    """Weighted loss sum, its derivative in ``Z`` and (when cheap) its curvature.

    Parameters
    ----------
    Z : ndarray of shape (n, k), float64
        Decision values ``X coef^T + intercept``.
    y : ndarray of shape (n,)
        Targets (``"squared"``, ``"huber"``) or class indices 0..K-1.
    w : ndarray of shape (n,), float64, or None
        Row weights; None weighs every row 1 (and saves the products).
    family : str
        One of :data:`FAMILIES`. Pointwise losses, with ``r = z - y``:
        ``r^2 / 2`` (squared); ``r^2 / 2`` if ``|r| <= epsilon`` else
        ``epsilon |r| - epsilon^2 / 2`` (huber); ``log(1 + exp(z)) - y z``
        (binomial); ``logsumexp(z) - z_y`` (multinomial);
        ``sum_k max(0, 1 - s_k z_k)`` with ``s_k = +1`` for the row's class and
        ``-1`` otherwise, one-vs-rest (hinge; one column ``s = 2y - 1`` for two
        classes).
    epsilon : float
        Huber's threshold.
    curvature : bool, default=True
        Also return the curvature (else None: stochastic gradient steps do not
        use it).

    Returns
    -------
    loss : float
        ``sum_i w_i loss_i``.
    D : ndarray of shape (n, k)
        ``w_i d loss_i / d z_ik``.
    curvature : ndarray of shape (n,) or None
        ``w_i d^2 loss_i / d z_i^2`` for the one-column smooth families.
    """
    total = (lambda v: float(v.sum())) if w is None else (lambda v: float(w @ v))
    if family == "multinomial":
        n = Z.shape[0]
        # each row's own class, as flat indices of the classes x rows layout below
        own = np.asarray(y, dtype=np.intp) * n + np.arange(n)
        # classes x rows: the maximum and the sum over the classes then run along the rows
        # (NumPy reduces a short last axis one row at a time, tens of times slower)
        ZT = np.array(Z.T, order="C")  # a copy: Z stays as the caller gave it
        zmax = ZT.max(axis=0)
        # one exponential per entry: shifted by the row maximum, reused for the probabilities
        RT = np.subtract(ZT, zmax, out=ZT)
        picked = RT.ravel()[own]  # z_y - max z
        np.exp(RT, out=RT)
        norm = RT.sum(axis=0)
        loss = total(np.log(norm) - picked)
        RT /= norm
        RT.ravel()[own] -= 1.0
        if w is not None:
            RT *= w
        return loss, RT.T, None
    if family == "hinge":
        yi = np.asarray(y, dtype=np.int64)
        if Z.shape[1] == 1:
            S = (2.0 * yi - 1.0)[:, None]
        else:
            S = np.full(Z.shape, -1.0)
            S[np.arange(Z.shape[0]), yi] = 1.0
        margin = 1.0 - S * Z
        active = margin > 0
        loss = total(np.where(active, margin, 0.0).sum(axis=1))
        D = np.where(active, -S, 0.0)
        return loss, D if w is None else D * w[:, None], None
    z, yf = Z[:, 0], np.asarray(y, dtype=np.float64)
    if family in ("squared", "huber"):
        r = z - yf
        if family == "squared":
            loss, d, c = 0.5 * total(r * r), r, (np.ones_like(r) if w is None else w)
        else:
            small = np.abs(r) <= epsilon
            loss = total(np.where(small, 0.5 * r * r, epsilon * np.abs(r) - 0.5 * epsilon ** 2))
            d = np.clip(r, -epsilon, epsilon)
            c = small.astype(np.float64) if w is None else w * small
        return (loss, (d if w is None else w * d)[:, None],
                c if curvature else None)
    if family == "binomial":
        return _binomial(z, yf, w, curvature)
    raise ValueError(f"family={family!r} should be one of {FAMILIES}")


def glm_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, *, y: np.ndarray, theta: np.ndarray,
    family: str, fit_intercept: bool, n_classes: int = 2, hessian: bool = False,
    epsilon: float = 1.35, precise: bool = False, hessian_every: int = 1,
    shift: np.ndarray | None = None, y_shift: float = 0.0, y_moments: bool = False,
) -> GLMPartial:
    """Weighted sums of pointwise loss, gradient and optionally Hessian over a block.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
    w : ndarray of shape (n,) or None
    offset : int
        Unused (kernel signature).
    y : ndarray of shape (n,)
        Targets, or class indices 0..K-1 for the classification families.
    theta : ndarray of shape (p,), float64
    family : str
        One of :data:`FAMILIES` (see :func:`pointwise`), with
        ``z = X coef^T + intercept``.
    fit_intercept : bool
    n_classes : int
        Used by ``"multinomial"`` and ``"hinge"``.
    hessian : bool, default=False
        Also return the Hessian sum (one-column smooth families only).
    epsilon : float, default=1.35
        Huber's threshold.
    precise : bool, default=False
        Compute ``z`` and the gradient in float64 for float32 ``X`` (slower).
        By default they are float32 products, whose rounding makes the loss
        jump by about 1e-7 of its value as ``theta`` moves and leaves the
        gradient's entries uncertain by about 1e-5 of the sums of
        ``|d loss / d z| |x|``: close to the optimum, where steps lower the
        loss by less than that, a line search needs ``precise=True`` to see the
        decrease, and a solver to see the gradient vanish.
    hessian_every : int, default=1
        With ``hessian=True``, sum the Hessian over a sample of about one row in
        ``hessian_every`` only (:func:`hessian_sample`; ``offset`` places the
        block's rows); ``hess_weight`` is the sample's weight, so that
        ``hess * weight / hess_weight`` estimates the whole Hessian. Loss and
        gradient always sum over every row.
    shift : ndarray of shape (n_features,) or None, default=None
        Work on ``X - shift`` instead of ``X`` (subtracted in ``X``'s dtype,
        one sub-block at a time): ``z = (X - shift) coef^T + intercept``, and
        the gradient and Hessian are those of these parameters. For data far
        from the origin, where ``X^T X`` in any float precision has lost the
        data's spread, the caller shifts by the mean (see
        ``dmlkit.linear_model``).
    y_shift : float, default=0.0
        ``"squared"`` and ``"huber"``: fit ``y - y_shift`` (the caller's
        intercept absorbs it), so that residuals of a ``y`` far from 0 are
        not differences of large numbers.
    y_moments : bool, default=False
        Also return ``y``'s weighted moments (``GLMPartial.y_moments``, from
        :func:`~dmlkit._kernels.stats.moments`).
    """
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} should be one of {FAMILIES}")
    if y_shift and family not in ("squared", "huber"):
        raise ValueError(f"y_shift is for the regression families, not family={family!r}")
    if hessian and n_outputs(family, n_classes) > 1 or hessian and family == "hinge":
        raise ValueError(f"hessian=True is not available for family={family!r}")
    X = _as_float(X)
    n, d = X.shape
    wf = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    coef, intercept = split_theta(theta, family, d, fit_intercept)
    coef_t = np.ascontiguousarray(coef.T.astype(X.dtype))
    loss, weight = 0.0, float(wf.sum())
    grad = np.zeros(theta.size)
    k = coef.shape[0]
    g_coef, g_int = grad[: k * d].reshape(k, d), grad[k * d :]
    hess = np.zeros((d + fit_intercept, d + fit_intercept)) if hessian else None
    # the float64 copies of the sub-blocks in this thread's scratch buffer (see
    # dmlkit._kernels.scratch: a fresh one each call costs page faults in dask's workers)
    # sub-blocks: float32 products are flushed into float64 sums every few thousand rows; with
    # several outputs, fewer rows (each (rows, k) temporary under 128 KiB up to k = 16)
    step = max(1024, SUB_BLOCK_ROWS // k)
    if precise and X.dtype != np.float64:  # the float64 copy of a sub-block: at most 4 MiB
        step = max(64, min(step, PRECISE_BUFFER_BYTES // (8 * max(d, 1))))
        wide = scratch("glm.wide", (min(n, step), d), np.float64)
    else:
        wide = None
    if shift is not None:
        shift = np.asarray(shift, dtype=X.dtype)
        if shift.shape != (d,):
            raise ValueError(f"shift has shape {shift.shape}; expected ({d},)")
        shifted = scratch("glm.shifted", (min(n, step), d), X.dtype)
    sample = hessian_sample(int(offset), n, int(hessian_every)) if hessian else None
    hess_weight = weight if sample is None else float(sum(wf[a:b].sum() for a, b in sample))
    at = 0  # the first sampled run not behind the current sub-block
    for s in range(0, n, step):
        Xb, yb = X[s : s + step], y[s : s + step]
        if y_shift:
            yb = yb - y_shift
        wb = None if w is None else wf[s : s + step]
        if shift is not None:
            Xb = np.subtract(Xb, shift, out=shifted[: Xb.shape[0]])
        if wide is not None:
            Xw = wide[: Xb.shape[0]]
            np.copyto(Xw, Xb)
            Z = Xw @ coef.T + intercept  # (rows, k)
        else:
            Z = Xb @ coef_t + intercept  # the float32 products widened in the sum
        whole = hessian and sample is None
        part, D, curvature = pointwise(Z, yb, wb, family, epsilon, curvature=whole)
        loss += part
        if wide is not None:  # near the optimum the gradient's float32 rounding shows too
            g_coef += D.T @ Xw
        else:
            g_coef += D.T.astype(X.dtype) @ Xb
        if fit_intercept:
            g_int += D.sum(axis=0)
        if whole:
            hess += _gram(Xb, curvature, fit_intercept)
        elif hessian:  # the sampled runs in this sub-block: their curvature only
            while at < len(sample) and sample[at][1] <= s:  # runs (in order) ended before it
                at += 1
            for a, b in sample[at:]:
                if a >= s + Xb.shape[0]:
                    break
                a, b = max(a, s) - s, min(b, s + Xb.shape[0]) - s
                if a < b:
                    c = pointwise(Z[a:b], yb[a:b], None if wb is None else wb[a:b], family,
                                  epsilon)[2]
                    hess += _gram(Xb[a:b], c, fit_intercept)
    y_stats = moments(np.asarray(y)[:, None], w, offset) if y_moments else None
    return GLMPartial(loss, grad, hess, weight, hess_weight if hessian else 0.0, y_stats)
