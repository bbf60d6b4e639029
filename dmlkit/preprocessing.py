"""Feature scaling in one tree-reduced pass."""
from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from dmlkit import _graph, data
from dmlkit._kernels.stats import combine_moments, moments


def _scale_block(X, mean, scale, inverse):
    dtype = X.dtype if X.dtype.kind == "f" else np.float64
    m, s = mean.astype(dtype), scale.astype(dtype)
    return X * s + m if inverse else (X - m) / s


class StandardScaler(TransformerMixin, BaseEstimator):
    """Standardise features by removing the mean and scaling to unit variance.

    The means and variances come from one pass over the data (weighted sums
    and sums of squared deviations per chunk, merged by the tree reduction),
    so scaling a Zarr store costs one read; ``transform`` is lazy and blockwise.
    Parameters and attributes mean what they mean in
    :class:`sklearn.preprocessing.StandardScaler`.

    When to use it: gradient descent and L-BFGS converge in fewer passes when
    the features have comparable scales, and the L2 penalty treats all
    coefficients alike only if the features do; Newton's method is not
    affected by scaling (apart from the penalty). Scaling inside the pipeline
    costs one extra pass to fit; ``transform`` adds a cheap blockwise step to
    every later pass, so for many passes over a store it can pay to write the
    scaled data once.

    Parameters
    ----------
    with_mean : bool, default=True
    with_std : bool, default=True
    split_every : int or None, default=None

    Attributes
    ----------
    mean_ : ndarray of shape (n_features,) or None
    var_ : ndarray of shape (n_features,) or None
        Population variances (ddof=0), weighted when ``sample_weight`` is given.
    scale_ : ndarray of shape (n_features,) or None
        ``sqrt(var_)``, with 1 where the variance is 0.
    n_samples_seen_ : int
    n_features_in_ : int
    """

    def __init__(self, *, with_mean: bool = True, with_std: bool = True,
                 split_every: int | None = None):
        self.with_mean = with_mean
        self.with_std = with_std
        self.split_every = split_every

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "StandardScaler":
        """Compute the means and standard deviations in one pass."""
        Xd = data.as_matrix(X)
        w = data.check_sample_weight(sample_weight, Xd)
        blocks = _graph.RowBlocks(Xd, w)
        passes = _graph.Passes(blocks, self.split_every, check=lambda s: data.check_stats(
            s, blocks.row_chunks, w is not None))
        m = passes.run(moments, combine_moments, {}, name="moments")
        mean = m.col_sum / m.weight
        var = m.col_m2 / m.weight
        # a constant column's variance is rounding noise: treat it as 0 (as scikit-learn does)
        eps = np.finfo(np.float64).eps
        n = Xd.shape[0]
        var = np.where(var <= n * eps * var + (n * mean * eps) ** 2, 0.0, var)
        self.n_samples_seen_ = int(Xd.shape[0])
        self.n_features_in_ = int(Xd.shape[1])
        self.mean_ = mean if self.with_mean else None
        self.var_ = var if self.with_std else None
        self.scale_ = np.where(var > 0, np.sqrt(var), 1.0) if self.with_std else None
        return self

    def _apply(self, X: Any, inverse: bool) -> Any:
        Xd = data.as_fitted_matrix(self, X, "n_features_in_")
        d = self.n_features_in_
        mean = self.mean_ if self.mean_ is not None else np.zeros(d)
        scale = self.scale_ if self.scale_ is not None else np.ones(d)
        dtype = Xd.dtype if Xd.dtype.kind == "f" else np.dtype(np.float64)
        out = _graph.map_rows(Xd, _scale_block, {"mean": mean, "scale": scale, "inverse": inverse},
                              dtype, n_columns=d)
        return out if data.is_lazy(X) else _graph.compute(out)[0]

    def transform(self, X: Any) -> Any:
        """``(X - mean_) / scale_``, in ``X``'s float dtype; lazy for lazy input."""
        return self._apply(X, inverse=False)

    def inverse_transform(self, X: Any) -> Any:
        """``X * scale_ + mean_``."""
        return self._apply(X, inverse=True)
