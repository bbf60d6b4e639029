"""Distributed SGD: convergence to the full-batch optimum, determinism, streaming, errors."""
from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn import linear_model as sk
from sklearn.exceptions import ConvergenceWarning

from dmlkit import LogisticRegression, Ridge, SGDClassifier, SGDRegressor
from dmlkit._kernels import sgd as kernels
from dmlkit._kernels.glm import glm_partial, pointwise
from tests.conftest import write_store

N = 6000
ALPHA = 1e-3


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N, 6)).astype(np.float32)
    beta = rng.standard_normal(6)
    z = X @ beta + 0.4
    y_reg = z + 0.3 * rng.standard_normal(N)
    y_reg[:30] += 25.0  # outliers, for Huber
    return {
        "X": X,
        "binary": (rng.random(N) < 1 / (1 + np.exp(-z))).astype(np.int64),
        "multi": np.argmax(X[:, :3] + rng.gumbel(size=(N, 3)), axis=1) * 10,  # labels 0, 10, 20
        "reg": y_reg,
        "w": rng.uniform(0.5, 2.0, N),
    }


def objective(model, X, y, alpha=ALPHA):
    """scikit-learn's SGD objective ``mean loss + alpha ||coef||^2 / 2`` at the model."""
    family = model._family
    coef = np.atleast_2d(model.coef_)
    theta = np.concatenate([coef.ravel(), np.atleast_1d(model.intercept_)])
    yy = y if family in ("squared", "huber") else np.searchsorted(model.classes_, y)
    part = glm_partial(X, None, 0, y=yy, theta=theta, family=family, fit_intercept=True,
                       n_classes=coef.shape[0] if coef.shape[0] > 1 else 2,
                       epsilon=getattr(model, "epsilon", 0.1))
    return part.loss / X.shape[0] + 0.5 * alpha * float(np.sum(coef ** 2))


#: a rate decaying as eta0 / sqrt(t + 1) converges to the optimum over many epochs
FAST = dict(shard_rows=1000, max_epochs=20, tol=None, random_state=0, learning_rate="invscaling",
            power_t=0.5)


# ------------------------------------------------------------------ kernels
@pytest.mark.parametrize("family,k", [("squared", 1), ("huber", 1), ("binomial", 1),
                                      ("multinomial", 3), ("hinge", 1), ("hinge", 3)])
def test_pointwise_derivative_is_the_loss_gradient(family, k):
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((50, k)) * 2
    y = rng.integers(0, max(k, 2), 50) if family not in ("squared", "huber") else rng.standard_normal(50)
    w = rng.uniform(0.5, 2, 50)
    loss, D, _ = pointwise(Z, y, w, family, epsilon=0.7)
    h = 1e-6
    for i, j in [(0, 0), (7, k - 1), (20, 0)]:
        Zp = Z.copy()
        Zp[i, j] += h
        numeric = (pointwise(Zp, y, w, family, epsilon=0.7)[0] - loss) / h
        assert_allclose(D[i, j], numeric, rtol=1e-4, atol=1e-5)


def test_hinge_and_huber_losses_by_hand():
    Z = np.array([[2.0], [0.5], [-1.0]])
    y = np.array([1, 1, 1])
    loss, D, _ = pointwise(Z, y, np.ones(3), "hinge")
    assert loss == pytest.approx(0 + 0.5 + 2.0)
    assert_array_equal(D[:, 0], [0.0, -1.0, -1.0])
    loss, D, _ = pointwise(np.array([[0.0], [3.0]]), np.array([0.5, 0.0]), np.ones(2), "huber", 1.0)
    assert loss == pytest.approx(0.125 + (3.0 - 0.5))
    assert_array_equal(D[:, 0], [-0.5, 1.0])


def test_permutation_depends_on_seed_pass_and_shard_only():
    a = kernels.shard_permutation(100, 3, 1, 7, True)
    assert_array_equal(a, kernels.shard_permutation(100, 3, 1, 7, True))
    assert sorted(a) == list(range(100))
    assert not np.array_equal(a, kernels.shard_permutation(100, 3, 2, 7, True))
    assert not np.array_equal(a, kernels.shard_permutation(100, 3, 1, 8, True))
    assert_array_equal(kernels.shard_permutation(5, 3, 1, 7, False), np.arange(5))


def test_local_sgd_visits_each_row_once_per_epoch():
    """The parts of an epoch cover the shard exactly: their row counts add up."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((103, 3)), rng.integers(0, 2, 103)
    common = dict(y=y, theta=np.zeros(4), family="binomial", n_classes=2, fit_intercept=True,
                  epsilon=0.0, alpha=0.0, l1_ratio=0.0,
                  schedule={"name": "constant", "eta0": 0.1}, t_start=0.0, batch_size=10,
                  n_parts=3, seed=0, pass_index=0, row_base=0, shuffle=True)
    parts = [kernels.local_sgd(X, None, 0, part=p, **common) for p in range(3)]
    assert sum(p.rows for p in parts) == 103
    assert [p.steps for p in parts] == [4, 4, 4]
    merged = kernels.combine_sgd(kernels.combine_sgd(parts[0], parts[1]), parts[2])
    other = kernels.combine_sgd(parts[0], kernels.combine_sgd(parts[1], parts[2]))
    assert_allclose(merged.theta_sum, other.theta_sum, rtol=1e-14)
    assert merged.rows == other.rows == 103


def test_local_sgd_with_one_batch_is_one_gradient_step():
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 3)), rng.integers(0, 2, 40)
    theta = rng.standard_normal(4) * 0.1
    out = kernels.local_sgd(X, None, 0, y=y, theta=theta, family="binomial", n_classes=2,
                            fit_intercept=True, epsilon=0.0, alpha=0.01, l1_ratio=0.0,
                            schedule={"name": "constant", "eta0": 0.5}, t_start=0.0,
                            batch_size=40, part=0, n_parts=1, seed=0, pass_index=0,
                            row_base=0, shuffle=False)
    g = glm_partial(X, None, 0, y=y, theta=theta, family="binomial", fit_intercept=True).grad / 40
    expected = theta - 0.5 * (g + 0.01 * np.r_[theta[:3], 0.0])
    assert_allclose(out.theta_sum / 40, expected, rtol=1e-12)


@pytest.mark.parametrize("family", ["binomial", "squared"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("l1_ratio, fit_intercept", [(0.0, True), (0.5, False)])
def test_lean_one_column_loop_makes_the_generic_updates(monkeypatch, family, weighted,
                                                         l1_ratio, fit_intercept):
    """The log loss of two classes and the squared loss take a loop of their own: the same
    updates and loss as the generic one, up to rounding."""
    rng = np.random.default_rng(3)
    X = rng.standard_normal((700, 5)).astype(np.float32)
    y = rng.integers(0, 2, 700) if family == "binomial" else rng.standard_normal(700)
    w = rng.random(700) if weighted else None
    kw = dict(y=y, theta=rng.standard_normal(6 if fit_intercept else 5) * 0.1, family=family,
              n_classes=2, fit_intercept=fit_intercept, epsilon=0.0, alpha=1e-3,
              l1_ratio=l1_ratio, schedule={"name": "invscaling", "eta0": 0.05,
                                           "power_t": 0.25, "alpha": 1e-3, "t0": 1.0},
              t_start=3.0, batch_size=64, part=1, n_parts=3, seed=0, pass_index=0,
              row_base=0, shuffle=True)
    lean = kernels.local_sgd(X, w, 0, **kw)
    monkeypatch.setattr(kernels, "ONE_COLUMN", ())
    generic = kernels.local_sgd(X, w, 0, **kw)
    assert_allclose(lean.theta_sum, generic.theta_sum, rtol=1e-12, atol=1e-14)
    assert_allclose(lean.loss, generic.loss, rtol=1e-12)
    assert (lean.rows, lean.steps, lean.bad) == (generic.rows, generic.steps, generic.bad)


def test_l1_update_soft_thresholds():
    coef, intercept = np.array([[0.5, -0.05, 0.2]]), np.array([1.0])
    kernels.apply_update(coef, intercept, np.zeros((1, 3)), np.array([0.5]), eta=1.0, alpha=0.1,
                         l1_ratio=1.0, fit_intercept=True)
    assert_allclose(coef, [[0.4, 0.0, 0.1]])
    assert_allclose(intercept, [0.5])


# ------------------------------------------------------------- convergence
@pytest.mark.parametrize("mode", ["local", "sync"])
def test_binary_log_loss_reaches_the_full_batch_optimum(problem, mode):
    X, y = problem["X"], problem["binary"]
    best = LogisticRegression(C=1 / (ALPHA * N), tol=1e-10).fit(X.astype(np.float64), y)
    f_star = objective(best, X, y)
    kw = dict(batch_size=64) if mode == "local" else dict(batch_size=250, shards_per_step=2)
    ours = SGDClassifier(alpha=ALPHA, mode=mode, **FAST, **kw).fit(X, y)
    assert objective(ours, X, y) <= f_star * (1 + 1e-4)
    assert_allclose(ours.coef_, best.coef_, atol=0.02)
    assert ours.n_iter_ == 20 and len(ours.history_) > 20
    assert (ours.predict(X) == best.predict(X)).mean() > 0.99


def test_multinomial_log_loss_reaches_the_full_batch_optimum(problem):
    X, y = problem["X"], problem["multi"]
    best = LogisticRegression(C=1 / (ALPHA * N), tol=1e-10).fit(X.astype(np.float64), y)
    ours = SGDClassifier(alpha=ALPHA, batch_size=64, **FAST).fit(X, y)
    assert_array_equal(ours.classes_, [0, 10, 20])
    assert ours.coef_.shape == (3, 6)
    assert objective(ours, X, y) <= objective(best, X, y) * (1 + 1e-4)
    proba = ours.predict_proba(X)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert (ours.predict(X) == best.predict(X)).mean() > 0.98


def test_squared_loss_reaches_ridge(problem):
    X, y = problem["X"][30:], problem["reg"][30:]  # no outliers
    best = Ridge(alpha=ALPHA * (N - 30)).fit(X.astype(np.float64), y)  # sum r^2 + a||c||^2 = 2n (mean/2 + ...)
    ours = SGDRegressor(alpha=ALPHA, batch_size=64, **FAST).fit(X, y)
    assert objective(ours, X, y) <= objective(best, X, y) * 1.005
    assert_allclose(ours.coef_, best.coef_, atol=0.02)
    assert ours.intercept_.shape == (1,)


def test_huber_resists_outliers(problem):
    X, y = problem["X"], problem["reg"]
    clean = Ridge(alpha=ALPHA * N).fit(X[30:].astype(np.float64), y[30:])
    huber = SGDRegressor(loss="huber", epsilon=1.0, alpha=ALPHA, batch_size=64, **FAST).fit(X, y)
    squared = SGDRegressor(alpha=ALPHA, batch_size=64, **FAST).fit(X, y)
    assert abs(huber.intercept_[0] - clean.intercept_) < 0.05
    assert abs(squared.intercept_[0] - clean.intercept_) > 2 * abs(huber.intercept_[0] - clean.intercept_)


@pytest.mark.parametrize("target", ["binary", "multi"])
def test_hinge_matches_sklearn_accuracy(problem, target):
    X, y = problem["X"], problem[target]
    ours = SGDClassifier(loss="hinge", alpha=ALPHA, batch_size=32, **FAST).fit(X, y)
    ref = sk.SGDClassifier(loss="hinge", alpha=ALPHA, max_iter=50, tol=None,
                           random_state=0).fit(X, y)
    assert ours.score(X, y) >= ref.score(X, y) - 0.01
    with pytest.raises(AttributeError, match="loss='hinge'"):
        ours.predict_proba(X)


@pytest.mark.parametrize("mode", ["local", "sync"])
def test_l1_penalty_zeroes_useless_features(mode):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((4000, 8)).astype(np.float32)
    y = (X[:, 0] - X[:, 1] + 0.3 * rng.standard_normal(4000) > 0).astype(int)
    ours = SGDClassifier(penalty="l1", alpha=0.01, batch_size=64, mode=mode, **FAST).fit(X, y)
    if mode == "sync":  # the exact proximal gradient method
        assert np.all(ours.coef_[0, 2:] == 0)
    else:  # an average of local models, then one proximal step
        assert np.all(np.abs(ours.coef_[0, 2:]) < 1e-2) and np.sum(ours.coef_[0, 2:] == 0) >= 4
    assert np.all(np.abs(ours.coef_[0, :2]) > 0.5)


def test_sample_weight_counts_like_repeated_rows(problem):
    """Integer weights equal repeating rows, in expectation: the optimum is the same."""
    X, y = problem["X"][:2000], problem["binary"][:2000]
    w = np.where(np.arange(2000) % 2 == 0, 2.0, 1.0)
    Xr, yr = np.vstack([X, X[::2]]), np.concatenate([y, y[::2]])
    a = SGDClassifier(alpha=ALPHA, batch_size=32, **FAST).fit(X, y, sample_weight=w)
    b = LogisticRegression(C=1 / (ALPHA * 2000), tol=1e-10).fit(Xr.astype(np.float64), yr)
    assert_allclose(a.coef_, b.coef_ * 1.0, atol=0.1)


# ------------------------------------------------------------- determinism
@pytest.mark.parametrize("mode", ["local", "sync"])
def test_same_seed_same_model_whatever_the_chunking(problem, mode):
    X, y = problem["X"], problem["binary"]
    kw = dict(mode=mode, batch_size=100, shard_rows=1000, shards_per_step=2, max_epochs=2,
              tol=None, random_state=7)
    a = SGDClassifier(**kw).fit(X, y)
    b = SGDClassifier(**kw).fit(da.from_array(X, chunks=(700, 6)), da.from_array(y, chunks=700))
    ragged = (1500, 250, 2250, 2000)
    c = SGDClassifier(**kw).fit(da.from_array(X, chunks=(ragged, 6)), da.from_array(y, chunks=(ragged,)))
    assert_array_equal(a.coef_, b.coef_)
    assert_array_equal(a.coef_, c.coef_)
    assert_array_equal(a.intercept_, c.intercept_)
    d = SGDClassifier(**dict(kw, random_state=8)).fit(X, y)
    assert not np.array_equal(a.coef_, d.coef_)


@pytest.mark.parametrize("mode", ["local", "sync"])
def test_labels_of_any_kind_give_the_same_model(problem, mode):
    X, y = problem["X"], problem["multi"]  # 0, 10, 20
    kw = dict(mode=mode, shard_rows=1000, max_epochs=1, tol=None, random_state=3)
    a = SGDClassifier(**kw).fit(X, y)
    names = np.array(["ant", "bee", "cat"])[y // 10]
    b = SGDClassifier(**kw).fit(X, names)
    assert_array_equal(b.classes_, ["ant", "bee", "cat"])
    assert_array_equal(a.coef_, b.coef_)
    assert_array_equal(b.predict(X[:50]), np.array(["ant", "bee", "cat"])[a.predict(X[:50]) // 10])


def test_split_every_changes_only_rounding(problem):
    X, y = problem["X"], problem["binary"]
    kw = dict(batch_size=100, shard_rows=500, max_epochs=2, tol=None, random_state=0)
    a = SGDClassifier(split_every=2, **kw).fit(X, y)
    b = SGDClassifier(split_every=8, **kw).fit(X, y)
    assert_allclose(a.coef_, b.coef_, rtol=1e-10)


def test_streamed_from_zarr_equals_in_memory(problem, tmp_path):
    X, y = problem["X"], problem["binary"]
    path = write_store(tmp_path / "s.zarr", X, y, chunk_rows=1000)
    kw = dict(batch_size=100, shard_rows=1000, max_epochs=2, tol=None, random_state=0)
    a = SGDClassifier(cache=False, **kw).fit(path)
    b = SGDClassifier(**kw).fit(X, y)
    assert_array_equal(a.coef_, b.coef_)


# ---------------------------------------------------------------- streaming
def test_partial_fit_on_whole_windows_equals_one_epoch_of_fit(problem):
    X, y = problem["X"], problem["binary"]
    kw = dict(mode="sync", shuffle=False, shard_rows=500, shards_per_step=2, batch_size=50,
              random_state=0)
    whole = SGDClassifier(max_epochs=1, tol=None, **kw).fit(X, y)
    stream = SGDClassifier(**kw)
    for start in range(0, N, 2000):  # 2000 rows: two windows of two shards
        stream.partial_fit(X[start : start + 2000], y[start : start + 2000], classes=[0, 1])
    assert_array_equal(stream.coef_, whole.coef_)
    assert stream.t_ == whole.t_
    assert stream.n_iter_ == 3


def test_partial_fit_learns_from_a_growing_zarr_store(problem, tmp_path):
    import zarr

    X, y = problem["X"], problem["binary"]
    path = write_store(tmp_path / "grow.zarr", X[:1000], y[:1000], chunk_rows=1000)
    model = SGDClassifier(alpha=ALPHA, batch_size=50, shard_rows=1000, random_state=0,
                          learning_rate="invscaling", power_t=0.5)
    seen = 0
    losses = []
    for start in range(0, N, 1000):
        if start:  # a new chunk arrives: append it to the store
            g = zarr.open_group(path, mode="r+")
            g["X"].append(X[start : start + 1000])
            g["y"].append(y[start : start + 1000])
        from dmlkit import open_zarr

        ds = open_zarr(path)
        new = ds.isel(sample=slice(seen, None))
        model.partial_fit(new["X"], new["y"], classes=[0, 1])
        seen = ds.sizes["sample"]
        losses.append(objective(model, X, y))
    assert seen == N and model.n_iter_ == 6 and model.t_ == 6 * 20  # 20 updates per 1000 rows
    best = LogisticRegression(C=1 / (ALPHA * N), tol=1e-10).fit(X.astype(np.float64), y)
    assert max(losses) <= objective(best, X, y) * 1.01


def test_partial_fit_regressor_continues(problem):
    X, y = problem["X"], problem["reg"]
    m = SGDRegressor(alpha=ALPHA, batch_size=50, shard_rows=1000, random_state=0)
    m.partial_fit(X[:3000], y[:3000])
    first = m.coef_.copy()
    m.partial_fit(X[3000:], y[3000:])
    assert m.n_iter_ == 2 and not np.array_equal(first, m.coef_)
    assert [h["epoch"] for h in m.history_] == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]
    with pytest.raises(ValueError, match="X has 3 features; this model was fitted on 6"):
        m.partial_fit(X[:10, :3], y[:10])


# ------------------------------------------------------------------- errors
def test_convergence_warning_and_stopping(problem):
    X, y = problem["X"], problem["binary"]
    with pytest.warns(ConvergenceWarning, match="max_epochs=1"):
        SGDClassifier(max_epochs=1, shard_rows=1000).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        m = SGDClassifier(learning_rate="constant", tol=1e-3, n_iter_no_change=2, max_epochs=50,
                          shard_rows=1000, random_state=0).fit(X, y)
    assert m.converged_ and m.n_iter_ < 50


@pytest.mark.parametrize("params,match", [
    ({"loss": "squared_hinge"}, "loss='squared_hinge' should be one of"),
    ({"learning_rate": "fast"}, "learning_rate='fast' should be one of"),
    ({"eta0": 0.0}, "eta0=0.0 should be a finite number > 0"),
    ({"eta0": -1}, "eta0=-1 should be"),
    ({"learning_rate": "optimal", "alpha": 0.0}, "needs alpha > 0"),
    ({"batch_size": 0}, "batch_size=0 should be an integer >= 1"),
    ({"mode": "async"}, "mode='async' should be one of"),
    ({"sync_every": 0}, r"sync_every=0 should be a number in \(0, 1\]"),
    ({"penalty": "l3"}, "penalty='l3' should be one of"),
    ({"max_epochs": 0}, "max_epochs=0 should be an integer >= 1"),
])
def test_bad_parameters(problem, params, match):
    with pytest.raises(ValueError, match=match):
        SGDClassifier(**params).fit(problem["X"], problem["binary"])


def test_bad_input(problem):
    X, y = problem["X"].copy(), problem["binary"]
    X[4321, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or inf .* in row 4321"):
        SGDClassifier(shard_rows=1000, max_epochs=1, tol=None).fit(X, y)
    with pytest.raises(ValueError, match="NaN or inf .* in row 4321"):
        SGDClassifier(mode="sync", shard_rows=1000, max_epochs=1, tol=None).fit(X, y)
    w = np.ones(N)
    w[17] = -1
    with pytest.raises(ValueError, match=r"sample_weight should be >= 0; sample_weight\[17\]"):
        SGDClassifier(shard_rows=1000, max_epochs=1, tol=None).fit(problem["X"], y, sample_weight=w)
    lazy_w = da.from_array(w, chunks=1000)
    with pytest.raises(ValueError, match="negative.* in row 17"):
        SGDClassifier(shard_rows=1000, max_epochs=1, tol=None).fit(problem["X"], y,
                                                                   sample_weight=lazy_w)
    with pytest.raises(ValueError, match="single class"):
        SGDClassifier().fit(problem["X"], np.zeros(N))


def test_partial_fit_errors(problem):
    X, y = problem["X"], problem["binary"]
    with pytest.raises(ValueError, match="classes must be passed on the first call"):
        SGDClassifier().partial_fit(X, y)
    with pytest.raises(ValueError, match=r"labels \[2\] that are not in classes \[0, 1\]"):
        SGDClassifier().partial_fit(X, np.where(y == 1, 2, 0), classes=[0, 1])
    m = SGDClassifier(shard_rows=1000).partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="differs from the classes of the first call"):
        m.partial_fit(X, y, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="'balanced' needs the whole data"):
        SGDClassifier(class_weight="balanced").partial_fit(X, y, classes=[0, 1])


def test_class_weight_is_a_per_row_weight(problem):
    X, y = problem["X"], problem["binary"]
    kw = dict(batch_size=100, shard_rows=1000, max_epochs=2, tol=None, random_state=0)
    a = SGDClassifier(class_weight={0: 1.0, 1: 3.0}, **kw).fit(X, y)
    b = SGDClassifier(**kw).fit(X, y, sample_weight=np.where(y == 1, 3.0, 1.0))
    assert_array_equal(a.coef_, b.coef_)
    counts = np.bincount(y)
    balanced = SGDClassifier(class_weight="balanced", **kw).fit(X, y)
    c = SGDClassifier(**kw).fit(X, y, sample_weight=(N / (2.0 * counts))[y])
    assert_array_equal(balanced.coef_, c.coef_)


def test_progress_bar_and_history(problem, capsys):
    X, y = problem["X"], problem["binary"]
    m = SGDClassifier(progress=True, shard_rows=1000, max_epochs=2, tol=None, random_state=0,
                      sync_every=0.5).fit(X, y)
    assert "SGDClassifier" in capsys.readouterr().err
    assert [h["epoch"] for h in m.history_] == [0.5, 1.0, 1.5, 2.0]
    assert all(h["rows"] == N // 2 for h in m.history_)
    assert all(np.isfinite(h["loss"]) and h["seconds"] >= 0 for h in m.history_)


@pytest.mark.parametrize("cls", [SGDRegressor, SGDClassifier])
def test_auto_step_warns_on_data_sgd_would_crawl_on(cls):
    rng = np.random.default_rng(0)
    B = rng.standard_normal((6000, 3))
    y = B @ [1.0, -2.0, 0.5]
    y = y if cls is SGDRegressor else (y > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", ConvergenceWarning)
        cls(random_state=0, max_epochs=2).fit(B, y)  # standardised: silent
        cls(random_state=0, max_epochs=2, eta0=0.01).fit(B + 1e4, y)  # no sample: silent
    cases = [(B + 1e4, "feature . sits far from the origin"),
             (B * [1.0, 1e-5, 1.0], "spreads differ by a factor of 1.0.e\\+05"),
             (B * 1e-20, "intercept's column of ones counting as 1")]
    for X, match in cases:
        with pytest.warns(UserWarning, match=match + ".*standardise X"):
            cls(random_state=0, max_epochs=2).fit(X, y)
