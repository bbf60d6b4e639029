"""Distributed stochastic gradient descent: local SGD with model averaging, or synchronous mini-batches.

The rows are cut into *shards* of ``shard_rows`` consecutive rows, whatever
the store's chunking. An epoch visits the shards in a freshly shuffled order
and the rows of each shard in a freshly shuffled order, both drawn from
``random_state``, the epoch and the shard's number alone: the same seed gives
the same model for every chunking and every cluster.

``mode="local"`` (local SGD, model averaging): every shard runs mini-batch SGD
over its next ``sync_every`` fraction of rows, starting from the current
parameters; the tree reduction averages the local models, weighted by rows.
One round, one pass over the shards, per ``sync_every`` of an epoch.

``mode="sync"`` (synchronous mini-batch SGD): ``shards_per_step`` shards at a
time are read once (in their visiting order, held in memory); every step,
each contributes the gradient of its next ``batch_size`` rows, the tree
reduction sums them and one update is made. A step touches only those rows.

Which wins: local SGD makes one update per mini-batch on every shard at once
and synchronises once per round, so it needs few, cheap rounds and makes
the most progress per pass; it is the default. Synchronous SGD is the exact
mini-batch method (the same updates as one process would make with batches
``shards_per_step`` times larger), costs one round trip to the scheduler per
update, and suits non-convex or badly conditioned problems where averaged
local models can disagree, or a cluster with fast round trips.
"""
from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Any

import dask
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning

from dmlkit import _graph, data
from dmlkit._kernels import sgd as kernels
from dmlkit._kernels.glm import n_params, split_theta
from dmlkit._progress import progress_bar
from dmlkit.kmeans import _integer_seed
from dmlkit.linear_model import (
    FAR_FROM_ORIGIN,
    LinearClassifierMixin,
    LinearRegressorMixin,
    check_classes,
    class_weight_rows,
    find_classes,
    prepare_supervised,
)
from dmlkit._kernels.stats import block_label_counts, combine_label_counts

#: Rows of the sample that sets ``eta0="auto"``.
CURVATURE_SAMPLE_ROWS = 8192
_MODES = ("local", "sync")
_PENALTIES = ("l2", "l1", "elasticnet", None)


def _curvature_sample(X: np.ndarray, offset: int, seed: int, row_base: int,
                      shuffle: bool, fit_intercept: bool) -> tuple[np.ndarray, int]:
    """``(G, m)``: the Gram matrix ``A^T A`` (float64) of the finite rows ``A`` (with a
    column of ones for the intercept) among the first :data:`CURVATURE_SAMPLE_ROWS` rows
    of a shard in its first epoch's order, and their number.

    Computed where the shard is: only a small matrix travels, and the caller
    does no product (whose BLAS threads would compete with the workers').
    """
    order = kernels.shard_permutation(X.shape[0], seed, 0, row_base + offset, shuffle)
    A = np.asarray(_graph.aligned(X)[order[:CURVATURE_SAMPLE_ROWS]], dtype=np.float64)
    A = A[np.isfinite(A).all(axis=1)]
    if fit_intercept:
        A = np.hstack([A, np.ones((A.shape[0], 1))])
    return A.T @ A, A.shape[0]


def _block_curvature_sample(X: np.ndarray, w, offset: int, *, y=None, start: int, seed: int,
                            row_base: int, shuffle: bool, fit_intercept: bool):
    """:func:`_curvature_sample` of the block that starts at global row ``start``, None for
    the others (a pass's kernel; combined by :func:`_first_found`)."""
    if offset != start:
        return None
    return _curvature_sample(X, offset, seed, row_base, shuffle, fit_intercept)


def _first_found(a, b):
    return a if a is not None else b


#: ``eta0="auto"`` warns when its sample shows a feature far from the origin (as the linear
#: models judge it, with an intercept) or features whose spreads differ by more than this.
SCALE_SPREAD = 1e3


def _badly_scaled(gram: np.ndarray, m: int, fit_intercept: bool) -> str | None:
    """What makes SGD crawl on this sample (from :func:`_curvature_sample`), or None.

    SGD's step is bounded by the largest curvature: along directions whose
    curvature is much smaller (features of smaller spread; with an intercept,
    the spread of data far from the origin, dwarfed by the mean), it barely
    moves. Only features that vary in the sample count.
    """
    if m < 2:
        return None
    d = gram.shape[0] - int(fit_intercept)
    second = np.diag(gram)[:d] / m
    if fit_intercept:
        mean = gram[:d, d] / m
        var = np.maximum(second - mean * mean, 0.0)
    else:
        mean, var = np.zeros(d), second
    varies = var > (1e-6 * np.abs(mean)) ** 2
    if not varies.any():
        return None
    std = np.sqrt(var)
    far = varies & (mean * mean > FAR_FROM_ORIGIN * var)
    if far.any():
        j = int(np.flatnonzero(far)[np.argmax(np.abs(mean[far]) / std[far])])
        return (f"feature {j} sits far from the origin (mean {mean[j]:.3g}, standard deviation "
                f"{std[j]:.3g})")
    # (the intercept's column of ones is a direction too, of spread 1)
    spread = np.append(std[varies], 1.0) if fit_intercept else std[varies]
    if spread.max() > SCALE_SPREAD * spread.min():
        return (f"the features' spreads differ by a factor of {spread.max() / spread.min():.3g} "
                f"(standard deviations from {spread.min():.3g} to {spread.max():.3g}"
                + (", the intercept's column of ones counting as 1)" if fit_intercept else ")"))
    return None


def _curvature_bound(gram: np.ndarray, m: int, family: str) -> float:
    """An estimate of the largest curvature of the mean loss, from a sample's Gram matrix.

    ``c * lambda_max(G / m)`` with ``G = A^T A`` over ``m`` rows ``A``
    (:func:`_curvature_sample`) and ``c`` the loss's largest second
    derivative: 1/4 (log loss), 1/2 (softmax, Bohning's bound), 1 otherwise.
    """
    lam = float(np.linalg.eigvalsh(gram / max(m, 1))[-1])
    c = {"binomial": 0.25, "multinomial": 0.5}.get(family, 1.0)
    return max(c * lam, 1e-12)


class _BaseSGD(BaseEstimator):
    """What the two estimators share: validation, the epochs, the two modes."""

    # ------------------------------------------------------------ validation
    def _check_params(self) -> None:
        def integer(name, low):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
                raise ValueError(f"{name}={v!r} should be an integer >= {low}")

        def positive(name, allow_zero=False):
            v = getattr(self, name)
            ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v) and (
                v >= 0 if allow_zero else v > 0)
            if not ok:
                raise ValueError(f"{name}={v!r} should be a finite number {'>=' if allow_zero else '>'} 0")

        if self.penalty not in _PENALTIES:
            raise ValueError(f"penalty={self.penalty!r} should be one of {_PENALTIES}")
        positive("alpha", allow_zero=True)
        if self.penalty == "elasticnet" and not (
                isinstance(self.l1_ratio, numbers.Real) and 0 <= self.l1_ratio <= 1):
            raise ValueError(f"l1_ratio={self.l1_ratio!r} should be a number in [0, 1]")
        if self.learning_rate not in kernels.SCHEDULES:
            raise ValueError(f"learning_rate={self.learning_rate!r} should be one of "
                             f"{kernels.SCHEDULES}")
        if self.learning_rate == "optimal" and not self.alpha > 0:
            raise ValueError("learning_rate='optimal' needs alpha > 0 (its rate is "
                             "1 / (alpha (t0 + t)))")
        if not (isinstance(self.eta0, str) and self.eta0 == "auto"):
            positive("eta0")
        positive("power_t", allow_zero=True)
        if self.batch_size is not None:
            integer("batch_size", 1)
        integer("max_epochs", 1)
        if self.tol is not None:
            positive("tol", allow_zero=True)
        integer("n_iter_no_change", 1)
        if not isinstance(self.shuffle, bool):
            raise ValueError(f"shuffle={self.shuffle!r} should be True or False")
        if not isinstance(self.fit_intercept, bool):
            raise ValueError(f"fit_intercept={self.fit_intercept!r} should be True or False")
        if self.mode not in _MODES:
            raise ValueError(f"mode={self.mode!r} should be one of {_MODES}")
        if not (isinstance(self.sync_every, numbers.Real) and 0 < self.sync_every <= 1):
            raise ValueError(f"sync_every={self.sync_every!r} should be a number in (0, 1]")
        integer("shard_rows", 1)
        integer("shards_per_step", 1)
        _graph.check_split_every(self.split_every)

    def _alpha_l1_ratio(self) -> tuple[float, float]:
        if self.penalty is None:
            return 0.0, 0.0
        ratio = {"l2": 0.0, "l1": 1.0}.get(self.penalty, self.l1_ratio)
        return float(self.alpha), float(ratio)

    def _batch(self) -> int:
        if self.batch_size is not None:
            return int(self.batch_size)
        return 512 if self.mode == "local" else 8192

    # ---------------------------------------------------------------- state
    def _start(self, blocks: _graph.RowBlocks, n_features: int, n_classes: int,
               sample: tuple | None = None, seed: int | None = None) -> None:
        """Fresh parameters, counters and learning rate; assumes validated parameters.

        ``sample`` is :meth:`_eta0_sample`'s result when already computed, drawn
        with ``seed`` (else a seed is drawn from ``random_state`` here).
        """
        self._seed = _integer_seed(self.random_state) if seed is None else seed
        self._theta = np.zeros(n_params(self._family, n_features, n_classes, self.fit_intercept))
        self.t_ = 0.0
        self.n_iter_ = 0
        self._rows_seen = 0
        self.history_ = []
        self._best_loss, self._no_improvement = np.inf, 0
        self._l1_state = None  # sync mode's cumulative L1 penalty
        self.n_features_in_ = n_features
        self._eta0 = self._initial_eta0(blocks, sample)

    def _auto_eta0(self) -> bool:
        return (isinstance(self.eta0, str) and self.eta0 == "auto"
                and self.learning_rate != "optimal")

    def _eta0_sample(self, X_in, seed: int) -> Any:
        """What ``eta0="auto"`` is estimated from, lazily: :func:`_curvature_sample`
        of the first shard of a fresh fit's first epoch with ``seed`` (None when
        ``eta0`` is not "auto")."""
        if not self._auto_eta0():
            return None
        start = self._first_shard(-(-X_in.shape[0] // self.shard_rows), seed) * self.shard_rows
        # on a worker that holds the shard: only the sample's Gram matrix travels
        return dask.delayed(_curvature_sample, pure=True)(
            X_in[start : start + self.shard_rows], start, seed, 0, self.shuffle,
            self.fit_intercept)

    def _first_shard(self, n_shards: int, seed: int, first_row: int = 0) -> int:
        """The shard a first epoch visits first (whose rows set ``eta0="auto"``)."""
        return int(kernels.shard_order(n_shards, seed, 0, self.shuffle, first_row)[0])

    def _initial_eta0(self, blocks: _graph.RowBlocks, sample: tuple | None = None) -> float:
        if not (isinstance(self.eta0, str) and self.eta0 == "auto"):
            return float(self.eta0)
        if self.learning_rate == "optimal":
            return 0.0  # not used: the rate is 1 / (alpha (t0 + t))
        # 1 / (a bound on the curvature) from the first rows of the first shard visited
        if sample is None:
            first = self._first_shard(blocks.n_blocks, self._seed, self._rows_seen)
            sample, = _graph.compute(dask.delayed(_curvature_sample, pure=True)(
                blocks.X.blocks[first], int(blocks.offsets[first]), self._seed,
                self._rows_seen, self.shuffle, self.fit_intercept))
        why = _badly_scaled(*sample, self.fit_intercept)
        if why is not None:
            warnings.warn(f"{type(self).__name__}: {why}; SGD's steps, bounded by the largest "
                          "curvature, then barely move the model in the other directions: "
                          "standardise X first (dmlkit.StandardScaler)", UserWarning,
                          stacklevel=4)
        return 1.0 / _curvature_bound(*sample, self._family)

    def _schedule(self) -> dict:
        alpha, _ = self._alpha_l1_ratio()
        return {"name": self.learning_rate, "eta0": self._eta0, "power_t": float(self.power_t),
                "alpha": alpha,
                "t0": kernels.optimal_t0(self._family, alpha) if alpha > 0 else 0.0}

    # ---------------------------------------------------------------- epochs
    def _blocks(self, X_in, y_fit, w_fit, source):
        Xd, (yd, wd), _ = data.cache(X_in, [y_fit, w_fit], self.cache, source,
                                     block_rows=self.shard_rows)
        return _graph.RowBlocks(Xd, wd, yd)

    def _common(self, pass_index: int) -> dict:
        return {"family": self._family, "n_classes": self._n_classes,
                "classes": getattr(self, "classes_", None),
                "fit_intercept": self.fit_intercept, "epsilon": float(self._epsilon()),
                "seed": self._seed, "pass_index": pass_index, "row_base": self._rows_seen,
                "shuffle": self.shuffle}

    def _epsilon(self) -> float:
        return 0.0

    def _check_bad(self, bad: int) -> None:
        if bad >= 0:
            raise ValueError(f"X, y or sample_weight contains NaN or inf (or sample_weight "
                             f"is negative) in row {bad}; clean or impute the data first")

    def _epoch(self, blocks: _graph.RowBlocks, pass_index: int, bar) -> float:
        """One pass over ``blocks``; returns the mean loss of the rows before their update."""
        run = self._local_epoch if self.mode == "local" else self._sync_epoch
        self._epoch_base = self.n_iter_  # history_'s epochs count on across partial_fit calls
        loss, rows = run(blocks, pass_index, bar)
        self.n_iter_ += 1
        return loss / max(rows, 1)

    def _local_epoch(self, blocks, pass_index, bar):
        alpha, l1_ratio = self._alpha_l1_ratio()
        n_parts = math.ceil(1.0 / self.sync_every - 1e-9)
        loss = rows = 0.0
        for part in range(n_parts):
            t0 = time.perf_counter()
            params = dict(self._common(pass_index), theta=self._theta, alpha=alpha,
                          l1_ratio=l1_ratio, schedule=self._schedule(), t_start=self.t_,
                          batch_size=self._batch(), part=part, n_parts=n_parts)
            result, = _graph.compute(blocks.reduce(kernels.local_sgd, kernels.combine_sgd, params,
                                                   self.split_every, name="local-sgd"))
            self._check_bad(result.bad)
            if result.rows:
                self._theta = result.theta_sum / result.rows
                if l1_ratio and alpha:
                    # an average of sparse models is not sparse: one proximal step on it
                    theta = self._theta
                    coef, intercept = split_theta(theta, self._family, self.n_features_in_,
                                                  self.fit_intercept)
                    kernels.apply_update(coef, intercept, 0.0, 0.0,
                                         kernels.learning_rate(self._schedule(), self.t_),
                                         alpha * l1_ratio, 1.0, False)
            self.t_ += result.steps
            loss, rows = loss + result.loss, rows + result.rows
            self._record(result.loss, result.rows, self._epoch_base + (part + 1) / n_parts,
                         time.perf_counter() - t0, bar)
        return loss, rows

    def _sync_epoch(self, blocks, pass_index, bar):
        alpha, l1_ratio = self._alpha_l1_ratio()
        common = self._common(pass_index)
        order = kernels.shard_order(blocks.n_blocks, self._seed, pass_index, self.shuffle,
                                    self._rows_seen)
        permute = {k: common[k] for k in ("seed", "pass_index", "row_base", "shuffle")}
        d = self.n_features_in_
        loss = rows = 0.0
        done_rows, total_rows = 0, sum(blocks.row_chunks)
        for start in range(0, order.size, self.shards_per_step):
            t0 = time.perf_counter()
            window = blocks.select(order[start : start + self.shards_per_step],
                                   kernels.permute_rows, permute)
            n_steps = max(1, math.ceil(max(window.row_chunks) / self._batch()))
            for step in range(n_steps):
                params = dict(common, theta=self._theta, step=step, n_steps=n_steps)
                result, = _graph.compute(window.reduce(kernels.step_partial, kernels.combine_step,
                                                       params, self.split_every, name="sgd-step"))
                self._check_bad(result.bad)
                if result.rows:
                    theta = self._theta.copy()
                    coef, intercept = split_theta(theta, self._family, d, self.fit_intercept)
                    g = result.glm.grad / result.rows
                    g_coef, g_int = split_theta(g, self._family, d, self.fit_intercept)
                    if l1_ratio and alpha and self._l1_state is None:
                        self._l1_state = kernels.new_l1_state(coef)
                    kernels.apply_update(coef, intercept, g_coef, g_int,
                                         kernels.learning_rate(self._schedule(), self.t_),
                                         alpha, l1_ratio, self.fit_intercept, self._l1_state)
                    self._theta = theta
                    self.t_ += 1
                loss, rows = loss + result.glm.loss, rows + result.rows
                done_rows += result.rows
                self._record(result.glm.loss, result.rows, self._epoch_base + done_rows / total_rows,
                             time.perf_counter() - t0, bar)
                t0 = time.perf_counter()
            del window  # releases the shards held in memory
        return loss, rows

    def _record(self, loss, rows, epoch, seconds, bar):
        self.history_.append({"round": len(self.history_) + 1, "epoch": float(epoch),
                              "loss": float(loss / max(rows, 1)), "rows": int(rows),
                              "eta": float(kernels.learning_rate(self._schedule(),
                                                                  max(self.t_ - 1.0, 0.0))),
                              "seconds": float(seconds)})
        if bar is not None:
            bar.n = round(epoch, 3)
            bar.set_postfix_str(f"loss {self.history_[-1]['loss']:.5g}")
            bar.refresh()

    def _after_epoch(self, loss: float) -> bool:
        """scikit-learn's stopping rule on the epoch's loss; True when converged."""
        if self.tol is None:
            return False
        if loss > self._best_loss - self.tol:
            self._no_improvement += 1
        else:
            self._no_improvement = 0
        self._best_loss = min(self._best_loss, loss)
        if self._no_improvement >= self.n_iter_no_change:
            if self.learning_rate == "adaptive" and self._eta0 > 1e-6:
                self._eta0 /= 5.0
                self._no_improvement = 0
                return False
            return True
        return False

    def _fit(self, blocks: _graph.RowBlocks) -> None:
        """The epochs of ``fit``; assumes validated input and a fresh :meth:`_start`."""
        bar = progress_bar(self.progress, total=self.max_epochs, desc=type(self).__name__)
        self.converged_ = False
        try:
            for epoch in range(self.max_epochs):
                loss = self._epoch(blocks, epoch, bar if self.progress else None)
                if self._after_epoch(loss):
                    self.converged_ = True
                    break
        finally:
            bar.close()
        self._rows_seen = sum(blocks.row_chunks)  # a later partial_fit numbers its rows on
        self._set_coef()
        if self.tol is not None and not self.converged_:
            warnings.warn(
                f"{type(self).__name__} reached max_epochs={self.max_epochs} before the "
                f"epoch loss stopped improving by tol={self.tol} for n_iter_no_change="
                f"{self.n_iter_no_change} epochs; increase max_epochs or tol",
                ConvergenceWarning, stacklevel=3)

    def _partial(self, blocks: _graph.RowBlocks, n_rows: int) -> None:
        """One pass over newly arrived rows, continuing the model and the counters
        (those of ``fit`` too: ``partial_fit`` after ``fit`` fine-tunes)."""
        self._epoch(blocks, 0, None)
        self._rows_seen += n_rows
        self._set_coef()

    def _set_coef(self) -> None:
        coef, intercept = split_theta(self._theta, self._family, self.n_features_in_,
                                      self.fit_intercept)
        self._set_fitted(coef.copy(), intercept.copy())


_COMMON_DOC = """
    penalty : {"l2", "l1", "elasticnet", None}, default="l2"
        The objective is ``sum_i w_i loss_i / n + alpha R(coef)`` with
        ``R = ||coef||^2 / 2`` (l2), ``||coef||_1`` (l1) or
        ``l1_ratio ||coef||_1 + (1 - l1_ratio) ||coef||^2 / 2`` (elasticnet),
        as in scikit-learn. L1 is applied by the cumulative penalty of
        Tsuruoka et al. (2009), as scikit-learn does (in local mode over each
        shard's run, then one soft-thresholding of the average). The
        intercept is not penalised.
    alpha : float >= 0, default=1e-4
    l1_ratio : float in [0, 1], default=0.15
    fit_intercept : bool, default=True
    max_epochs : int, default=10
        Passes over the data at most.
    tol : float or None, default=1e-3
        Stop when the epoch's mean loss has not improved by ``tol`` on the
        best so far for ``n_iter_no_change`` epochs in a row (for
        ``learning_rate="adaptive"``: divide the rate by 5 instead, and stop
        once it is below 1e-6). None runs ``max_epochs`` epochs.
    n_iter_no_change : int, default=5
    shuffle : bool, default=True
        Shuffle the shards and the rows inside each shard every epoch.
    random_state : int, RandomState or None, default=None
    learning_rate : {"invscaling", "constant", "optimal", "adaptive"}, default="invscaling"
        Rate of update ``t`` (updates counted per shard in local mode, per
        step in sync mode): ``eta0 / (t + 1)^power_t`` (invscaling),
        ``eta0`` (constant, adaptive), ``1 / (alpha (t0 + t))`` with
        scikit-learn's ``t0`` (optimal). Unlike scikit-learn, an update uses
        the mean gradient of a mini-batch, so "optimal", tuned for one row
        per update, starts too high and is not the default for classifiers
        (scikit-learn's); "invscaling" from ``eta0="auto"`` with
        ``power_t=0.25`` (scikit-learn's regressor default) reached 0.03% of
        the optimum in one epoch on 2 million rows, and 0.2% on 160,000.
    eta0 : float or "auto", default="auto"
        "auto" is ``1 / L``, with ``L`` the largest curvature of the mean loss
        estimated from 8,192 rows of the first shard visited (a quarter of the
        largest eigenvalue of their second moment for the log loss): the step
        with which gradient descent is sure to decrease the objective (half its
        stability limit ``2 / L``). Not read for "optimal". The same rows show
        data SGD would crawl on: a feature far from the origin (mean beyond
        10 standard deviations, with an intercept) or spreads differing by
        more than 1,000 times (the intercept's column counting as 1) give a
        ``UserWarning`` to standardise X.
    power_t : float, default=0.25
    batch_size : int or None, default=None
        Rows per update: per local update in local mode (None: 512), per
        shard per step in sync mode (None: 8,192).
    mode : {"local", "sync"}, default="local"
        See the module's documentation.
    sync_every : float in (0, 1], default=0.25
        Local mode: the fraction of an epoch between two averagings.
    shard_rows : int, default=100_000
        Rows per shard. Results depend on it, not on the store's chunks;
        matching the store's chunk rows avoids reading a chunk twice.
    shards_per_step : int, default=8
        Sync mode: shards read at a time and contributing to each step.
    split_every : int or None, default=None
    cache : {"auto", True, False}, default="auto"
        As in :class:`dmlkit.KMeans`.
    progress : bool, default=False
"""

_ATTRIBUTES_DOC = """
    n_iter_ : int
        Epochs run (``fit``) or passes made (``partial_fit``, one per call).
    t_ : float
        Updates made: the learning rate's clock.
    converged_ : bool
    history_ : list of dict
        Per communication round: ``round``, ``epoch`` (progress in epochs,
        counting on across ``partial_fit`` calls), ``loss`` (mean weighted loss
        of the round's rows, each taken before the update that used it: a
        progressive estimate of the training loss at no extra cost), ``rows``,
        ``eta`` (the rate of the round's last update) and ``seconds``.
    n_features_in_ : int
"""


class SGDClassifier(ClassifierMixin, LinearClassifierMixin, _BaseSGD):
    """Linear classification by distributed stochastic gradient descent.

    Parameters
    ----------
    loss : {"log_loss", "hinge"}, default="log_loss"
        Logistic regression (binary; multinomial softmax for more than two
        classes, where scikit-learn fits one-vs-rest) or a linear SVM
        (one-vs-rest for more than two classes, as scikit-learn).
    class_weight : dict, "balanced" or None, default=None
        Multiplies ``sample_weight``; "balanced" needs ``fit`` (the counts).
    """ + _COMMON_DOC + """
    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    coef_ : ndarray of shape (1, n_features) or (n_classes, n_features)
    intercept_ : ndarray of shape (1,) or (n_classes,)
    """ + _ATTRIBUTES_DOC + """
    Notes
    -----
    Local mode reads every shard once per round (``1 / sync_every`` rounds
    per epoch: from memory when cached, else from the store). Sync mode reads
    every shard once per epoch and makes one round trip per update. Finding the
    classes costs one pass over ``y``; ``eta0="auto"`` reads one shard. On
    blocks the workers already hold (and without ``class_weight``), both come
    from one pass of the resident actors that then run the rounds.
    """

    def __init__(self, loss: str = "log_loss", *, penalty: str | None = "l2", alpha: float = 1e-4,
                 l1_ratio: float = 0.15, fit_intercept: bool = True, max_epochs: int = 10,
                 tol: float | None = 1e-3, n_iter_no_change: int = 5, shuffle: bool = True,
                 random_state: Any = None, learning_rate: str = "invscaling",
                 eta0: float | str = "auto", power_t: float = 0.25, batch_size: int | None = None,
                 mode: str = "local", sync_every: float = 0.25, shard_rows: int = 100_000,
                 shards_per_step: int = 8, class_weight: Any = None,
                 split_every: int | None = None, cache: bool | str = "auto",
                 progress: bool = False):
        self.loss = loss
        self.penalty = penalty
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.max_epochs = max_epochs
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.shuffle = shuffle
        self.random_state = random_state
        self.learning_rate = learning_rate
        self.eta0 = eta0
        self.power_t = power_t
        self.batch_size = batch_size
        self.mode = mode
        self.sync_every = sync_every
        self.shard_rows = shard_rows
        self.shards_per_step = shards_per_step
        self.class_weight = class_weight
        self.split_every = split_every
        self.cache = cache
        self.progress = progress

    _LOSSES = ("log_loss", "hinge")

    def _check_loss(self) -> None:
        if self.loss not in self._LOSSES:
            raise ValueError(f"loss={self.loss!r} should be one of {self._LOSSES}")

    def _set_family(self, n_classes: int) -> None:
        self._n_classes = n_classes
        self._family = "hinge" if self.loss == "hinge" else (
            "binomial" if n_classes == 2 else "multinomial")

    def _set_fitted(self, coef, intercept) -> None:
        self.coef_, self.intercept_ = coef, intercept

    def _labelled(self, X, y, sample_weight, classes, counts):
        """``X``, the labels (the kernels turn those they visit into class numbers) and the
        row weights."""
        X_in, y_in, w_in = prepare_supervised(X, y, sample_weight)
        w_fit = class_weight_rows(self.class_weight, w_in, y_in, classes, counts)
        return X_in, y_in, w_fit

    def _held_classes(self, blocks: _graph.RowBlocks, seed: int):
        """``(classes, counts, sample)`` from one pass of the workers' resident actors
        over blocks they hold (``sample``: :meth:`_eta0_sample`'s, or None)."""
        passes = [blocks.reduce(block_label_counts, combine_label_counts, None,
                                self.split_every, name="classes")]
        if self._auto_eta0():
            first = self._first_shard(blocks.n_blocks, seed)
            passes.append(blocks.reduce(
                _block_curvature_sample, _first_found,
                {"start": int(blocks.offsets[first]), "seed": seed, "row_base": 0,
                 "shuffle": self.shuffle, "fit_intercept": self.fit_intercept},
                self.split_every, name="eta0-sample"))
        (classes, counts), *sample = _graph.compute(*passes)
        check_classes(classes, "SGDClassifier")
        return classes, counts, (sample[0] if sample else None)

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "SGDClassifier":
        """Fit from scratch on ``X`` (array, dask, xarray or Zarr path) and labels ``y``."""
        self._check_params()
        self._check_loss()
        X_in, y_in, w_in = prepare_supervised(X, y, sample_weight)
        seed = _integer_seed(self.random_state)  # drawn once per fit
        blocks = None
        if self.class_weight is None:
            # the row weights do not depend on the classes: the blocks come first, and
            # where the workers hold them already, one pass of their actors finds the classes
            blocks = self._blocks(X_in, y_in, w_in, X)
        if blocks is not None and blocks.held():
            classes, counts, sample = self._held_classes(blocks, seed)
        else:
            # the step size's sample rows come in the same round trip as the classes
            lazy = self._eta0_sample(X_in, seed)
            classes, counts, *sample = find_classes(y_in, "SGDClassifier",
                                                    *([lazy] if lazy is not None else []))
            sample = sample[0] if sample else None
        self.classes_ = classes
        self._set_family(classes.size)
        if blocks is None:
            w_fit = class_weight_rows(self.class_weight, w_in, y_in, classes, counts)
            blocks = self._blocks(X_in, y_in, w_fit, X)
        self._start(blocks, X_in.shape[1], classes.size, sample, seed)
        self._fit(blocks)
        return self

    def partial_fit(self, X: Any, y: Any = None, classes: Any = None,
                    sample_weight: Any = None) -> "SGDClassifier":
        """One pass over new rows, continuing from the current model.

        ``classes`` (every class the stream will hold) is required on the first
        call and must match ``classes_`` afterwards. Rows are numbered on from
        the rows of earlier calls, so a stream fed in whole windows of
        ``shards_per_step * shard_rows`` rows with ``mode="sync"`` and
        ``shuffle=False`` makes exactly the updates of one epoch of ``fit`` on
        all of it. Each call counts as one epoch in ``n_iter_`` and
        ``history_``; ``tol``, ``n_iter_no_change`` and the "adaptive" rate's
        divisions apply to ``fit`` only.
        """
        first = not hasattr(self, "_theta")
        if first:
            self._check_params()
            self._check_loss()
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit "
                                 "(every class the stream will contain)")
            classes = np.unique(np.asarray(classes))
            if classes.size < 2:
                raise ValueError(f"classes={classes.tolist()} should hold at least 2 classes")
            if isinstance(self.class_weight, str):
                raise ValueError("class_weight='balanced' needs the whole data; use fit, or "
                                 "pass a dict of class weights")
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)),
                                                        self.classes_):
            raise ValueError(f"classes={np.asarray(classes).tolist()} differs from the classes "
                             f"of the first call {self.classes_.tolist()}")
        cls = classes if first else self.classes_
        X_in, y_fit, w_fit = self._labelled(X, y, sample_weight, cls, np.ones(cls.size))
        if not first and X_in.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X_in.shape[1]} features; this model was fitted on "
                             f"{self.n_features_in_}")
        blocks = self._blocks(X_in, y_fit, w_fit, X)
        if first:
            self.classes_ = cls
            self._set_family(cls.size)
            self._start(blocks, X_in.shape[1], cls.size)
            self.converged_ = False
        self._partial(blocks, X_in.shape[0])
        return self

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities (``loss="log_loss"`` only)."""
        if self.loss != "log_loss":
            raise AttributeError(f"probability estimates are not available for loss={self.loss!r}; "
                                 "use loss='log_loss'")
        return super().predict_proba(X)


class SGDRegressor(RegressorMixin, LinearRegressorMixin, _BaseSGD):
    """Linear regression by distributed stochastic gradient descent.

    Parameters
    ----------
    loss : {"squared_error", "huber"}, default="squared_error"
        ``(y - z)^2 / 2``, or Huber's loss: quadratic up to ``epsilon``,
        linear beyond (robust to outliers).
    epsilon : float > 0, default=0.1
        Huber's threshold.
    """ + _COMMON_DOC + """
    Attributes
    ----------
    coef_ : ndarray of shape (n_features,)
    intercept_ : ndarray of shape (1,)
    """ + _ATTRIBUTES_DOC + """
    Notes
    -----
    As :class:`SGDClassifier`, without the pass over ``y``.
    """

    def __init__(self, loss: str = "squared_error", *, penalty: str | None = "l2",
                 alpha: float = 1e-4, l1_ratio: float = 0.15, fit_intercept: bool = True,
                 max_epochs: int = 10, tol: float | None = 1e-3, n_iter_no_change: int = 5,
                 shuffle: bool = True, random_state: Any = None, learning_rate: str = "invscaling",
                 eta0: float | str = "auto", power_t: float = 0.25, epsilon: float = 0.1,
                 batch_size: int | None = None, mode: str = "local", sync_every: float = 0.25,
                 shard_rows: int = 100_000, shards_per_step: int = 8,
                 split_every: int | None = None, cache: bool | str = "auto",
                 progress: bool = False):
        self.loss = loss
        self.penalty = penalty
        self.alpha = alpha
        self.l1_ratio = l1_ratio
        self.fit_intercept = fit_intercept
        self.max_epochs = max_epochs
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.shuffle = shuffle
        self.random_state = random_state
        self.learning_rate = learning_rate
        self.eta0 = eta0
        self.power_t = power_t
        self.epsilon = epsilon
        self.batch_size = batch_size
        self.mode = mode
        self.sync_every = sync_every
        self.shard_rows = shard_rows
        self.shards_per_step = shards_per_step
        self.split_every = split_every
        self.cache = cache
        self.progress = progress

    _LOSSES = ("squared_error", "huber")

    def _check_loss(self) -> None:
        if self.loss not in self._LOSSES:
            raise ValueError(f"loss={self.loss!r} should be one of {self._LOSSES}")
        if self.loss == "huber" and not (isinstance(self.epsilon, numbers.Real)
                                         and self.epsilon > 0):
            raise ValueError(f"epsilon={self.epsilon!r} should be a number > 0")
        self._n_classes = 1
        self._family = "squared" if self.loss == "squared_error" else "huber"

    def _epsilon(self) -> float:
        return float(self.epsilon)

    def _set_fitted(self, coef, intercept) -> None:
        self.coef_, self.intercept_ = coef[0], intercept

    def _targets(self, X, y, sample_weight):
        X_in, y_in, w_in = prepare_supervised(X, y, sample_weight)
        if y_in.dtype.kind not in "fiub":
            raise TypeError(f"y.dtype={y_in.dtype} is not numeric")
        return X_in, y_in, w_in

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "SGDRegressor":
        """Fit from scratch on ``X`` (array, dask, xarray or Zarr path) and targets ``y``."""
        self._check_params()
        self._check_loss()
        X_in, y_in, w_in = self._targets(X, y, sample_weight)
        blocks = self._blocks(X_in, y_in, w_in, X)
        self._start(blocks, X_in.shape[1], 1)
        self._fit(blocks)
        return self

    def partial_fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> "SGDRegressor":
        """One pass over new rows, continuing from the current model (see
        :meth:`SGDClassifier.partial_fit`)."""
        first = not hasattr(self, "_theta")
        if first:
            self._check_params()
            self._check_loss()
        X_in, y_in, w_in = self._targets(X, y, sample_weight)
        if not first and X_in.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X_in.shape[1]} features; this model was fitted on "
                             f"{self.n_features_in_}")
        blocks = self._blocks(X_in, y_in, w_in, X)
        if first:
            self._start(blocks, X_in.shape[1], 1)
            self.converged_ = False
        self._partial(blocks, X_in.shape[0])
        return self


__all__ = ["SGDClassifier", "SGDRegressor"]
