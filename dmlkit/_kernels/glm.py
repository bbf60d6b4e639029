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

#: Rows per sub-block inside a chunk.
SUB_BLOCK_ROWS = 8192


class GLMPartial(NamedTuple):
    """Sums over rows: ``loss`` (float), ``grad`` (p,), ``hess`` (p, p) or None, ``weight`` (float)."""

    loss: float
    grad: np.ndarray
    hess: np.ndarray | None
    weight: float


def combine_glm(a: GLMPartial, b: GLMPartial) -> GLMPartial:
    """Associative merge: everything is a sum."""
    hess = None if a.hess is None else a.hess + b.hess
    return GLMPartial(a.loss + b.loss, a.grad + b.grad, hess, a.weight + b.weight)


def n_params(family: str, n_features: int, n_classes: int, fit_intercept: bool) -> int:
    """Length of ``theta``."""
    k = n_classes if family == "multinomial" else 1
    return k * (n_features + int(fit_intercept))


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


def glm_partial(
    X: np.ndarray, w: np.ndarray | None, offset: int, *, y: np.ndarray, theta: np.ndarray,
    family: str, fit_intercept: bool, n_classes: int = 2, hessian: bool = False,
) -> GLMPartial:
    """Weighted sums of pointwise loss, gradient and optionally Hessian over a block.

    Parameters
    ----------
    X : ndarray of shape (n, n_features)
    w : ndarray of shape (n,) or None
    offset : int
        Unused (kernel signature).
    y : ndarray of shape (n,)
        Targets (``"squared"``), 0/1 (``"binomial"``) or class indices 0..K-1
        (``"multinomial"``).
    theta : ndarray of shape (p,), float64
    family : {"squared", "binomial", "multinomial"}
        Pointwise losses: ``(z - y)^2 / 2``; ``log(1 + exp(z)) - y z``;
        ``logsumexp(z) - z_y``, with ``z = X coef^T + intercept``.
    fit_intercept : bool
    n_classes : int
        Used by ``"multinomial"``.
    hessian : bool, default=False
        Also return the Hessian sum (``"squared"`` and ``"binomial"``).
    """
    if family not in ("squared", "binomial", "multinomial"):
        raise ValueError(f"family={family!r} should be 'squared', 'binomial' or 'multinomial'")
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
    # sub-blocks: float32 products are flushed into float64 sums every few thousand rows
    for s in range(0, n, SUB_BLOCK_ROWS):
        Xb, wb, yb = X[s : s + SUB_BLOCK_ROWS], wf[s : s + SUB_BLOCK_ROWS], y[s : s + SUB_BLOCK_ROWS]
        Z = (Xb @ coef_t).astype(np.float64) + intercept  # (rows, k)
        if family == "multinomial":
            yi = np.asarray(yb, dtype=np.int64)
            rows = np.arange(Xb.shape[0])
            # one exponential per entry: shifted by the row maximum, reused for the probabilities
            zmax = Z.max(axis=1)
            R = Z - zmax[:, None]
            np.exp(R, out=R)
            total = R.sum(axis=1)
            loss += float(wb @ (np.log(total) - (Z[rows, yi] - zmax)))
            R /= total[:, None]
            R[rows, yi] -= 1.0
            R *= wb[:, None]
            g_coef += R.T.astype(X.dtype) @ Xb
            if fit_intercept:
                g_int += R.sum(axis=0)
            continue
        z, yf = Z[:, 0], np.asarray(yb, dtype=np.float64)
        if family == "squared":
            r = z - yf
            loss += 0.5 * float(wb @ (r * r))
            curvature = wb
        else:
            # one exp serves both the log loss and the probability
            e = np.exp(-np.abs(z))
            loss += float(wb @ (np.maximum(z, 0.0) + np.log1p(e) - yf * z))
            inv = 1.0 / (1.0 + e)
            p = np.where(z >= 0, inv, e * inv)
            r = p - yf
            curvature = wb * p * (1.0 - p)
        wr = wb * r
        g_coef[0] += wr.astype(X.dtype) @ Xb
        if fit_intercept:
            g_int += wr.sum()
        if hessian:
            hess += _gram(Xb, curvature, fit_intercept)
    return GLMPartial(loss, grad, hess, weight)
