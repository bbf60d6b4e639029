"""Linear, ridge and logistic regression against scikit-learn."""
from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn import linear_model as sk
from sklearn.exceptions import ConvergenceWarning

from dmlkit import LinearRegression, LogisticRegression, Ridge
from dmlkit._kernels.glm import glm_partial, pointwise


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4000, 5))
    beta = rng.standard_normal(5)
    p = 1 / (1 + np.exp(-(X @ beta + 0.3)))
    return {
        "X": X,
        "binary": (rng.random(4000) < p).astype(int),
        "multi": np.argmax(X[:, :3] + rng.gumbel(size=(4000, 3)), axis=1),
        "reg": X @ beta + 0.5 + rng.standard_normal(4000),
        "w": rng.uniform(0.5, 2.0, 4000),
    }


TIGHT = {"tol": 1e-10, "max_iter": 200}


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_logistic_matches_sklearn(problem, solver, fit_intercept, weighted):
    X, y = problem["X"], problem["binary"]
    w = problem["w"] if weighted else None
    ours = LogisticRegression(C=0.5, solver=solver, fit_intercept=fit_intercept, **TIGHT).fit(
        X, y, sample_weight=w)
    ref = sk.LogisticRegression(C=0.5, fit_intercept=fit_intercept, solver="newton-cholesky",
                                tol=1e-12, max_iter=1000).fit(X, y, sample_weight=w)
    assert ours.coef_.shape == (1, 5) and ours.intercept_.shape == (1,)
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-6, atol=1e-7)
    assert_allclose(ours.intercept_, ref.intercept_, atol=1e-7)
    # L-BFGS stops on the objective's rounding before a gradient of 1e-10: it says so
    assert ours.converged_ == (solver == "newton" or np.abs(ours.history_[-1]["grad_norm"]) <= 1e-10)
    assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-7)
    assert_array_equal(ours.predict(X), ref.predict(X))


@pytest.mark.parametrize("C", [0.1, 10.0])
def test_multinomial_matches_sklearn(problem, C):
    X, y = problem["X"], problem["multi"]
    ours = LogisticRegression(C=C, **TIGHT).fit(X, y)
    ref = sk.LogisticRegression(C=C, tol=1e-12, max_iter=2000).fit(X, y)
    assert ours.coef_.shape == (3, 5)
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-5, atol=1e-6)
    assert_allclose(ours.intercept_, ref.intercept_, atol=1e-6)
    assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)


def test_no_penalty_matches_sklearn(problem):
    X, y = problem["X"], problem["binary"]
    ours = LogisticRegression(penalty=None, **TIGHT).fit(X, y)
    ref = sk.LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12).fit(X, y)
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-6, atol=1e-7)


def test_class_weight_equals_sample_weight(problem):
    X, y = problem["X"], problem["binary"]
    a = LogisticRegression(class_weight={0: 2.0, 1: 0.5}, **TIGHT).fit(X, y)
    b = LogisticRegression(**TIGHT).fit(X, y, sample_weight=np.where(y == 0, 2.0, 0.5))
    assert_allclose(a.coef_, b.coef_, rtol=1e-9)
    bal = LogisticRegression(class_weight="balanced", **TIGHT).fit(X, y)
    ref = sk.LogisticRegression(class_weight="balanced", solver="newton-cholesky",
                                tol=1e-12).fit(X, y)
    assert_allclose(bal.coef_, ref.coef_, rtol=1e-6, atol=1e-7)


def test_string_labels(problem):
    X = problem["X"]
    y = np.array(["cat", "dog", "emu"])[problem["multi"]]
    ours = LogisticRegression(**TIGHT).fit(X, y)
    assert_array_equal(ours.classes_, ["cat", "dog", "emu"])
    ref = sk.LogisticRegression(tol=1e-12, max_iter=2000).fit(X, y)
    assert_array_equal(ours.predict(X), ref.predict(X))


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_and_least_squares_match_sklearn(problem, solver, fit_intercept):
    X, y, w = problem["X"], problem["reg"], problem["w"]
    r = Ridge(alpha=3.0, solver=solver, fit_intercept=fit_intercept, **TIGHT).fit(
        X, y, sample_weight=w)
    ref = sk.Ridge(alpha=3.0, fit_intercept=fit_intercept).fit(X, y, sample_weight=w)
    assert_allclose(r.coef_, ref.coef_, rtol=1e-7, atol=1e-8)
    assert r.intercept_ == pytest.approx(ref.intercept_, abs=1e-8)
    ols = LinearRegression(solver=solver, fit_intercept=fit_intercept, **TIGHT).fit(X, y)
    ref = sk.LinearRegression(fit_intercept=fit_intercept).fit(X, y)
    assert_allclose(ols.coef_, ref.coef_, rtol=1e-7, atol=1e-8)
    assert_allclose(ols.predict(X), ref.predict(X), atol=1e-7)


def test_least_squares_newton_takes_two_passes(problem):
    ols = LinearRegression(solver="newton").fit(problem["X"], problem["reg"])
    assert ols.n_passes_ == 2 and ols.n_iter_ == 1


def test_newton_one_pass_per_iteration(problem):
    m = LogisticRegression(solver="newton", tol=1e-8).fit(problem["X"], problem["binary"])
    passes = [h["passes"] for h in m.history_]
    assert passes[0] == 2  # the start point, then the first step
    assert all(p == 1 for p in passes[1:])  # full Newton steps: one pass each
    assert m.n_passes_ == sum(passes)
    assert {"objective", "grad_norm", "step", "seconds", "passes", "float64"} <= set(m.history_[0])
    objectives = [h["objective"] for h in m.history_]
    assert all(b <= a for a, b in zip(objectives, objectives[1:]))


@pytest.mark.parametrize("chunks", [4000, 777, (1000, 10, 2990)])
@pytest.mark.parametrize("split_every", [2, 8])
def test_independent_of_chunking(problem, chunks, split_every):
    X, y = problem["X"], problem["multi"]
    ref = LogisticRegression(**TIGHT).fit(X, y)
    Xd = da.from_array(X, chunks=(chunks, 5))
    yd = da.from_array(y, chunks=(Xd.chunks[0],))
    ours = LogisticRegression(split_every=split_every, **TIGHT).fit(Xd, yd)
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-7, atol=1e-9)
    assert isinstance(ours.predict(Xd), da.Array)


def test_fit_from_zarr_store_reads_y_from_it(tmp_path):
    from dmlkit.datasets import make_classification

    path = make_classification(tmp_path / "c.zarr", 6000, 4, chunk_rows=1000, random_state=0)
    import dmlkit

    ds = dmlkit.open_zarr(path)
    ours = LogisticRegression(C=100.0).fit(path)  # float32 data: the default tol
    ref = sk.LogisticRegression(C=100.0, solver="newton-cholesky").fit(
        ds["X"].values, ds["y"].values)
    assert ours.converged_ and ours.coef_.dtype == np.float64
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-4, atol=1e-5)
    true = ds["coef"].values
    assert np.corrcoef(ours.coef_.ravel(), true.ravel())[0, 1] > 0.95


def test_max_iter_reached_warns(problem):
    with pytest.warns(ConvergenceWarning, match="did not converge in max_iter=1"):
        m = LogisticRegression(solver="lbfgs", max_iter=1).fit(problem["X"], problem["binary"])
    assert not m.converged_


def test_glm_kernel_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((300, 3)), rng.integers(0, 3, 300)
    theta = rng.standard_normal(12) * 0.3
    kw = dict(y=y, family="multinomial", fit_intercept=True, n_classes=3)
    g = glm_partial(X, None, 0, theta=theta, **kw).grad
    eps = 1e-6
    num = [(glm_partial(X, None, 0, theta=theta + eps * e, **kw).loss
            - glm_partial(X, None, 0, theta=theta - eps * e, **kw).loss) / (2 * eps)
           for e in np.eye(12)]
    assert_allclose(g, num, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_log_loss_pointwise_against_scipy_far_from_zero(weighted):
    from scipy.special import expit

    z = np.concatenate([np.linspace(-800, 800, 201), [-40, -1e-9, 0.0, 1e-9, 40]])
    y = np.arange(z.size) % 2
    w = np.linspace(0.5, 2, z.size) if weighted else None
    loss, D, c = pointwise(z[:, None], y, w, "binomial")
    wf = np.ones(z.size) if w is None else w
    p = expit(z)
    assert_allclose(loss, wf @ (np.logaddexp(0.0, z) - y * z), rtol=1e-14)
    assert_allclose(D[:, 0], wf * (p - y), rtol=0, atol=4e-16)
    # the curvature keeps its relative precision in the tails (p (1 - p) ~ exp(-|z|))
    e = np.exp(-np.abs(z))
    assert_allclose(c, wf * e / (1 + e) ** 2, rtol=1e-14, atol=1e-300)
    assert (c[np.abs(z) < 700] > 0).all()


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("n_classes", [2, 3, 11])
def test_softmax_pointwise_against_scipy(weighted, n_classes):
    from scipy.special import logsumexp, softmax

    rng = np.random.default_rng(4)
    Z = rng.standard_normal((500, n_classes)) * 30  # rows whose probabilities underflow too
    y = rng.integers(0, n_classes, 500)
    w = rng.uniform(0.5, 2, 500) if weighted else None
    given = Z.copy()
    loss, D, c = pointwise(Z, y, w, "multinomial")
    wf = np.ones(500) if w is None else w
    onehot = np.eye(n_classes)[y]
    assert_allclose(loss, wf @ (logsumexp(Z, axis=1) - Z[np.arange(500), y]), rtol=1e-13)
    assert_allclose(D, wf[:, None] * (softmax(Z, axis=1) - onehot), rtol=1e-12, atol=1e-15)
    assert c is None and D.shape == Z.shape
    assert_array_equal(Z, given)  # the decision values are left as they were


@pytest.mark.parametrize("family, n_classes", [("binomial", 2), ("multinomial", 3)])
def test_precise_kernel_loss_is_the_float64_loss_of_float32_rows(family, n_classes):
    rng = np.random.default_rng(2)
    X = (rng.standard_normal((5000, 8)) * 3).astype(np.float32)
    y = rng.integers(0, n_classes, 5000)
    p = (n_classes if family == "multinomial" else 1) * 9
    theta = rng.standard_normal(p) * 0.3
    kw = dict(y=y, family=family, fit_intercept=True, n_classes=n_classes)
    exact = glm_partial(X.astype(np.float64), None, 0, theta=theta, **kw).loss
    precise = glm_partial(X, None, 0, theta=theta, precise=True, **kw).loss
    fast = glm_partial(X, None, 0, theta=theta, **kw).loss
    assert abs(precise - exact) <= 1e-12 * abs(exact)
    assert abs(fast - exact) <= 1e-5 * abs(exact)  # float32 products: close, not exact
    # a step far below float32 resolution still moves the precise loss the right way
    g = glm_partial(X, None, 0, theta=theta, precise=True, **kw).grad
    step = theta - 1e-9 * g / np.abs(g).max()
    assert glm_partial(X, None, 0, theta=step, precise=True, **kw).loss < precise


def test_multinomial_on_float32_data_converges_to_the_default_tol(tmp_path):
    from dmlkit.datasets import make_classification

    path = str(tmp_path / "c4.zarr")
    make_classification(path, 20_000, 16, n_classes=4, class_sep=0.5, chunk_rows=2000,
                        random_state=0)
    for chunks in (2000, 10_000):  # different blockings round differently
        X = da.from_zarr(path, component="X").rechunk((chunks, 16))
        y = da.from_zarr(path, component="y").rechunk(chunks)
        m = LogisticRegression().fit(X, y)
        assert m.converged_ and m.history_[-1]["grad_norm"] <= m.tol
        # float32 passes first; float64 ones from where the gradient is small, to the end
        flags = [h["float64"] for h in m.history_]
        assert not flags[0] and flags[-1] and flags == sorted(flags)


# ----------------------------------------------------------------- bad input
def test_single_class():
    with pytest.raises(ValueError, match=r"y has a single class \(\[1\]\)"):
        LogisticRegression().fit(np.zeros((5, 2)), np.ones(5, dtype=int))


def test_y_not_aligned():
    with pytest.raises(ValueError, match="y has 4 rows but X has 5"):
        LogisticRegression().fit(np.zeros((5, 2)), [0, 1, 0, 1])


def test_y_wrong_shape():
    with pytest.raises(ValueError, match=r"y should be 1-D"):
        LogisticRegression().fit(np.zeros((5, 2)), np.zeros((5, 3)))


def test_non_finite_values_name_the_chunk(problem):
    X = problem["X"].copy()
    X[2500, 1] = np.nan
    Xd = da.from_array(X, chunks=(1000, 5))
    with pytest.raises(ValueError, match=r"X or y contains NaN or inf in chunk 2"):
        LogisticRegression().fit(Xd, problem["binary"])
    y = problem["reg"].copy()
    y[10] = np.inf
    with pytest.raises(ValueError, match=r"X or y contains NaN or inf in chunk 0"):
        Ridge().fit(problem["X"], y)


@pytest.mark.parametrize("params, msg", [
    ({"C": 0}, "C=0 should be a number > 0"),
    ({"C": -1.0}, "C=-1.0 should be a number > 0"),
    ({"penalty": "l1", "solver": "lbfgs"}, "solver='lbfgs' cannot handle an L1 penalty"),
    ({"penalty": "l3"}, "penalty='l3' should be 'l2', 'l1', 'elasticnet' or None"),
    ({"penalty": "elasticnet"}, "l1_ratio=None should be a number in"),
    ({"solver": "sgd"}, "solver='sgd' should be one of"),
    ({"tol": 0}, "tol=0 should be a number > 0"),
])
def test_bad_parameters(problem, params, msg):
    with pytest.raises(ValueError, match=msg):
        LogisticRegression(**params).fit(problem["X"], problem["binary"])


def test_newton_refuses_multinomial(problem):
    with pytest.raises(ValueError, match="use solver='lbfgs' for more than two classes"):
        LogisticRegression(solver="newton").fit(problem["X"], problem["multi"])


def test_ridge_negative_alpha(problem):
    with pytest.raises(ValueError, match="alpha=-1 should be a number >= 0"):
        Ridge(alpha=-1).fit(problem["X"], problem["reg"])


@pytest.mark.parametrize("target", ["binary", "multi"])
def test_gradient_descent_reaches_the_same_optimum(problem, target):
    X, y = problem["X"], problem[target]
    gd = LogisticRegression(solver="gd", tol=1e-8, max_iter=1000).fit(X, y)
    ref = LogisticRegression(solver="lbfgs", **TIGHT).fit(X, y)
    assert gd.converged_
    assert_allclose(gd.coef_, ref.coef_, rtol=1e-5, atol=1e-6)
    # Barzilai-Borwein steps need no extra pass: about one pass per iteration
    assert gd.n_passes_ <= 1.2 * gd.n_iter_ + 2


@pytest.mark.parametrize("target", ["binary", "multi"])
@pytest.mark.parametrize("penalty, l1_ratio", [("l1", None), ("elasticnet", 0.5)])
def test_l1_and_elastic_net_match_sklearn(problem, target, penalty, l1_ratio):
    X, y = problem["X"], problem[target]
    C = 0.05 if target == "multi" else 0.002  # strong enough to zero some coefficients
    ours = LogisticRegression(penalty=penalty, l1_ratio=l1_ratio, C=C, tol=1e-9,
                              max_iter=5000).fit(X, y)
    ref = sk.LogisticRegression(C=C, l1_ratio=1.0 if penalty == "l1" else l1_ratio,
                                solver="saga", tol=1e-12, max_iter=100000).fit(X, y)
    assert ours.converged_
    assert_allclose(ours.coef_, ref.coef_, atol=1e-6)
    assert_allclose(ours.intercept_, ref.intercept_, atol=1e-6)
    assert_array_equal(ours.coef_ == 0, np.abs(ref.coef_) < 1e-8)  # the same sparsity
    assert (ours.coef_ == 0).any()
    assert ours.n_passes_ <= ours.n_iter_ + 2  # FISTA: one pass per iteration


def test_precision_floor_is_reported_not_called_max_iter(tmp_path):
    from dmlkit.datasets import make_classification

    path = make_classification(tmp_path / "c.zarr", 20_000, 4, chunk_rows=5000, random_state=0)
    with pytest.warns(ConvergenceWarning, match="no step lowers the objective"):
        m = LogisticRegression(solver="newton", tol=1e-18, max_iter=100).fit(path)
    assert m.n_iter_ < 100 and not m.converged_


def test_class_numbers_take_the_smallest_integer_that_holds_them():
    from dmlkit.linear_model import _labels_to_index, index_dtype

    assert [index_dtype(k) for k in (2, 126, 127, 32766, 32767)] == \
        [np.int8, np.int8, np.int16, np.int16, np.int32]
    classes = np.arange(126) * 2.0
    idx = _labels_to_index(np.array([0.0, 250.0, 999.0]), classes)  # 999 is no class
    assert idx.dtype == np.int8 and idx.tolist() == [0, 125, 126]


def test_sampled_hessian_ranges_are_the_rows_of_the_sample():
    from dmlkit._kernels.glm import HESSIAN_RUN, hessian_sample

    for offset, n, every in [(0, 5000, 2), (700, 3000, 3), (1023, 1, 2), (5000, 0, 4),
                             (3 * HESSIAN_RUN + 5, 9 * HESSIAN_RUN, 40)]:
        mask = np.zeros(n, dtype=bool)
        for a, b in hessian_sample(offset, n, every):
            assert 0 <= a < b <= n and not mask[a:b].any()
            mask[a:b] = True
        assert_array_equal(mask, (np.arange(offset, offset + n) // HESSIAN_RUN) % every == 0)
    assert hessian_sample(0, 10, 1) is None


def test_sampled_hessian_sums_over_its_rows_whatever_the_blocks():
    from dmlkit._kernels.glm import HESSIAN_RUN, combine_glm

    rng = np.random.default_rng(3)
    n, offset, every = 5 * HESSIAN_RUN, 700, 3
    X, w = rng.standard_normal((n, 4)), rng.uniform(0.5, 2.0, n)
    y = (rng.random(n) < 0.4).astype(int)
    theta = rng.standard_normal(5) * 0.3
    kw = dict(y=y, theta=theta, family="binomial", fit_intercept=True, hessian=True)
    whole = glm_partial(X, w, offset, hessian_every=every, **kw)
    rows = ((offset + np.arange(n)) // HESSIAN_RUN) % every == 0
    assert 0 < rows.sum() < n
    Xa = np.c_[X, np.ones(n)][rows]
    p = 1 / (1 + np.exp(-(Xa @ theta)))
    assert_allclose(whole.hess, (Xa * (w[rows] * p * (1 - p))[:, None]).T @ Xa, rtol=1e-10)
    assert whole.hess_weight == pytest.approx(w[rows].sum())
    full = glm_partial(X, w, offset, **kw)  # loss and gradient: every row either way
    assert whole.loss == full.loss
    assert_array_equal(whole.grad, full.grad)
    cut = 1500
    halves = combine_glm(
        glm_partial(X[:cut], w[:cut], offset, hessian_every=every, **dict(kw, y=y[:cut])),
        glm_partial(X[cut:], w[cut:], offset + cut, hessian_every=every, **dict(kw, y=y[cut:])))
    assert_allclose(halves.hess, whole.hess, rtol=1e-10)
    assert halves.hess_weight == pytest.approx(whole.hess_weight)


@pytest.mark.parametrize("chunks", [30_000, 7_000])
def test_newton_with_a_sampled_hessian_matches_sklearn(chunks):
    from dmlkit import linear_model as lm

    rng = np.random.default_rng(4)
    n = 30_000
    X = rng.standard_normal((n, 5))
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ rng.standard_normal(5) - 0.2)))).astype(int)
    w = rng.uniform(0.5, 2.0, n)
    assert lm.hessian_every("binomial", n, 6) == 5  # one row in 5 (runs of 1,024 rows)
    Xd, yd, wd = (da.from_array(v, chunks=chunks) for v in (X, y, w))
    ours = LogisticRegression(C=0.5, solver="newton", **TIGHT).fit(Xd, yd, sample_weight=wd)
    ref = sk.LogisticRegression(C=0.5, solver="newton-cholesky", tol=1e-12,
                                max_iter=1000).fit(X, y, sample_weight=w)
    assert ours.converged_
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-6, atol=1e-7)
    assert_allclose(ours.intercept_, ref.intercept_, atol=1e-7)


def test_only_newton_samples_the_hessian_and_it_recovers_from_a_poor_sample():
    from dmlkit._kernels.glm import HESSIAN_RUN

    rng = np.random.default_rng(5)
    n = 24 * HESSIAN_RUN  # p = 3 parameters: a sample of one run in 8
    X = rng.standard_normal((n, 2))
    in_sample = (np.arange(n) // HESSIAN_RUN) % 8 == 0
    X[in_sample, 1] *= 1e-3  # the second feature barely varies in the sample
    y = (rng.random(n) < 1 / (1 + np.exp(-(X @ [1.0, 0.5])))).astype(int)
    ref = sk.LogisticRegression(C=1.0, solver="newton-cholesky", tol=1e-12,
                                max_iter=1000).fit(X, y)
    for solver in ("newton", "gd", "lbfgs"):
        ours = LogisticRegression(C=1.0, solver=solver, tol=1e-8, max_iter=500).fit(X, y)
        assert ours.converged_, solver
        assert_allclose(ours.coef_, ref.coef_, rtol=1e-5, atol=1e-6)
    # FISTA's step is 1 / (the largest curvature): from every row, never a sample
    l1 = LogisticRegression(penalty="l1", C=1.0, solver="fista", tol=1e-6, max_iter=5000)
    l1.fit(X, y)
    assert l1.converged_ and np.isfinite(l1.coef_).all()
    assert not any(k.startswith("_fista") for k in vars(l1))  # the fit's blocks are not kept


# ----------------------------------------------------------- data far from the origin
@pytest.fixture(scope="module")
def far():
    rng = np.random.default_rng(1)
    B = rng.standard_normal((5000, 4))
    return {"B": B, "reg": B @ [1.0, -2.0, 0.5, 3.0] + 7 + 0.1 * rng.standard_normal(5000),
            "binary": (B @ [1.0, -2.0, 0.5, 3.0] + 0.5 * rng.standard_normal(5000) > 0
                       ).astype(int)}


@pytest.mark.parametrize("offset,dtype", [(1e4, np.float32), (1e8, np.float64)])
@pytest.mark.parametrize("solver", ["newton", "lbfgs", "gd"])
def test_least_squares_far_from_the_origin_matches_centred_data(far, offset, dtype, solver):
    """X^T X of such data has lost the spread (float32 at 1e4, float64 at 1e8): the fit
    works on X - mean. The reference: the same rows, centred exactly in float64."""
    X = (far["B"] + offset).astype(dtype)
    exact = X.astype(np.float64)
    mean = exact.mean(axis=0)
    for ours, ref in [(LinearRegression(solver=solver, max_iter=500), sk.LinearRegression()),
                      (Ridge(alpha=30.0, solver=solver, max_iter=500), sk.Ridge(alpha=30.0))]:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            ours.fit(X, far["reg"])
        ref.fit(exact - mean, far["reg"])
        assert ours.converged_
        assert_allclose(ours.coef_, ref.coef_, rtol=1e-6)
        # the intercept is that of X, not of X - mean: the prediction at the mean
        assert ours.intercept_ + ours.coef_ @ mean == pytest.approx(ref.intercept_, abs=1e-6)
        assert ours.score(X, far["reg"]) == pytest.approx(ref.score(exact - mean, far["reg"]),
                                                         abs=1e-6)


@pytest.mark.parametrize("offset,dtype", [(1e4, np.float32), (1e8, np.float64)])
@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_logistic_far_from_the_origin_matches_centred_data(far, offset, dtype, solver):
    X = (far["B"] + offset).astype(dtype)
    exact = X.astype(np.float64)
    mean = exact.mean(axis=0)
    ours = LogisticRegression(solver=solver, tol=1e-8).fit(X, far["binary"])
    ref = sk.LogisticRegression(solver="newton-cholesky", tol=1e-12).fit(
        exact - mean, far["binary"])
    assert ours.converged_
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-5)
    assert_allclose(ours.intercept_ + ours.coef_ @ mean, ref.intercept_, atol=1e-6)
    # (the decision function subtracts numbers near 1e4 or 1e8: compare it centred)
    assert_allclose(ours.coef_ @ (exact - mean).T + (ours.intercept_ + ours.coef_ @ mean)[:, None],
                    ref.decision_function(exact - mean)[None, :], rtol=1e-5, atol=1e-5)


def test_far_from_the_origin_costs_one_more_pass(far):
    near = LinearRegression().fit(far["B"], far["reg"])
    shifted = LinearRegression().fit(far["B"] + 1e8, far["reg"])
    assert (near.n_passes_, shifted.n_passes_) == (2, 3)
    # ten standard deviations from the origin: still the origin's pass count
    assert LinearRegression().fit(far["B"] + 5.0, far["reg"]).n_passes_ == 2


def test_glm_kernel_shift_moves_the_intercept_and_sums_y_moments():
    rng = np.random.default_rng(3)
    X = rng.standard_normal((3000, 3)) + [5.0, -2.0, 0.0]
    y = (rng.random(3000) < 0.4).astype(np.int8)
    w = rng.uniform(0.5, 2.0, 3000)
    shift = np.array([5.0, -2.0, 1.0])
    theta = np.array([0.3, -0.2, 0.1, 0.7])
    moved = theta.copy()
    moved[-1] += shift @ theta[:3]  # the same decision values on X - shift
    kw = dict(y=y, family="binomial", fit_intercept=True, hessian=True)
    plain = glm_partial(X, w, 0, theta=theta, **kw)
    part = glm_partial(X, w, 0, theta=moved, shift=shift, **kw)
    assert part.loss == pytest.approx(plain.loss, rel=1e-12)
    D = plain.grad[-1]  # sum of w dloss/dz, the same at the same decision values
    assert part.grad[-1] == pytest.approx(D, rel=1e-12)
    assert_allclose(part.grad[:3], plain.grad[:3] - shift * D, rtol=1e-10, atol=1e-10)
    J = np.eye(4)
    J[3, :3] = -shift  # the change of variables from theta on X - shift to theta on X
    assert_allclose(part.hess, J.T @ plain.hess @ J, rtol=1e-9, atol=1e-9)
    assert plain.y_moments is None


def test_y_moments_merge_exactly_far_from_zero():
    from dmlkit._kernels.glm import combine_glm

    rng = np.random.default_rng(4)
    X = rng.standard_normal((5000, 2))
    y = 1e9 + rng.standard_normal(5000)
    w = rng.uniform(0.5, 2.0, 5000)
    kw = dict(family="squared", fit_intercept=True, theta=np.zeros(3), y_moments=True)
    parts = [glm_partial(X[a:b], w[a:b], a, y=y[a:b], **kw)
             for a, b in [(0, 1000), (1000, 1001), (1001, 5000)]]
    weight, (total,), (m2,) = combine_glm(combine_glm(parts[0], parts[1]), parts[2]).y_moments
    mean = np.average(y, weights=w)
    assert weight == pytest.approx(w.sum()) and total / weight == pytest.approx(mean, rel=1e-15)
    assert m2 == pytest.approx(w @ (y - mean) ** 2, rel=1e-7)  # (raw sums of squares: off by more than m2)


def test_constant_features_get_coefficient_zero_as_in_sklearn(far):
    """A constant feature is collinear with the intercept; scikit-learn's centring gives it 0."""
    X = np.column_stack([far["B"], np.full(5000, 0.1)])
    for dtype in [np.float64, np.float32]:
        Xt = X.astype(dtype)
        for solver in ["newton", "lbfgs", "gd"]:
            ours = LinearRegression(solver=solver, max_iter=500).fit(Xt, far["reg"])
            ref = sk.LinearRegression().fit(Xt.astype(np.float64), far["reg"])
            assert ours.converged_ and ours.coef_[-1] == 0.0
            assert_allclose(ours.coef_, ref.coef_, rtol=1e-6, atol=1e-9)
            assert ours.intercept_ == pytest.approx(ref.intercept_, rel=1e-7)
        log = LogisticRegression(penalty=None, tol=1e-8).fit(Xt, far["binary"])
        assert log.converged_ and log.coef_[0, -1] == 0.0
        ref = sk.LogisticRegression(penalty=None, solver="lbfgs", tol=1e-12, max_iter=1000).fit(
            Xt[:, :4].astype(np.float64), far["binary"])
        assert_allclose(log.predict_proba(Xt), ref.predict_proba(Xt[:, :4]), atol=1e-6)
    # also when the other features are far from the origin (the fit then shifts)
    ours = LinearRegression().fit(np.column_stack([far["B"] + 1e6, np.ones(5000)]), far["reg"])
    assert ours.converged_ and ours.coef_[-1] == 0.0


def test_y_far_from_zero_still_meets_tol(far):
    """tol is relative to y's standard deviation, computed exactly about its mean."""
    y = far["reg"] + 1e7
    for dtype in [np.float64, np.float32]:
        X = far["B"].astype(dtype)
        ref = sk.LinearRegression().fit(X.astype(np.float64), y)
        for solver in ["newton", "lbfgs"]:
            ours = LinearRegression(solver=solver).fit(X, y)
            assert ours.converged_
            assert_allclose(ours.coef_, ref.coef_, rtol=1e-8)


@pytest.mark.parametrize("factor", [1e19, 1e-23])
def test_newton_hands_over_to_lbfgs_where_float32_squares_leave_their_range(far, factor):
    X = (far["B"] * factor).astype(np.float32)
    ref = sk.LinearRegression().fit(X.astype(np.float64), far["reg"])
    ours = LinearRegression(solver="newton").fit(X, far["reg"])
    assert ours.converged_
    assert_allclose(ours.coef_ * factor, ref.coef_ * factor, rtol=1e-6)
    assert ours.n_passes_ == sum(h["passes"] for h in ours.history_)


@pytest.mark.parametrize("cls,target", [(LinearRegression, "reg"), (LogisticRegression, "binary")])
def test_history_counts_the_shifting_pass(far, cls, target):
    for solver in ["newton", "lbfgs"]:
        m = cls(solver=solver).fit(far["B"] + 1e8, far[target])
        assert m.n_passes_ == sum(h["passes"] for h in m.history_)


def test_predictions_far_from_the_origin_keep_their_digits(far):
    X = (far["B"] + 1e4).astype(np.float32)
    ours = LinearRegression().fit(X, far["reg"])
    exact = X.astype(np.float64)
    ref = sk.LinearRegression().fit(exact - exact.mean(axis=0), far["reg"])
    assert_allclose(ours.predict(X), ref.predict(exact - exact.mean(axis=0)), atol=1e-6)
    import dask.array as da

    lazy = ours.predict(da.from_array(X, chunks=(1000, 4))).compute()
    assert_allclose(lazy, ours.predict(X), atol=1e-9)


@pytest.mark.parametrize("factor", [1e-20, 1e-4, 1e6, 1e20])
def test_least_squares_tol_is_relative_to_the_scale_of_y_and_x(far, factor):
    """tol is that of the standardised problem: y (or X) in other units, the same fit."""
    ref = LinearRegression().fit(far["B"], far["reg"])
    for solver in ["newton", "lbfgs", "gd"]:
        scaled_y = LinearRegression(solver=solver, max_iter=500).fit(far["B"], far["reg"] * factor)
        assert scaled_y.converged_ and scaled_y.n_iter_ >= 1
        assert_allclose(scaled_y.coef_ / factor, ref.coef_, rtol=1e-6)
        if solver == "gd":  # (plain gradient steps: the intercept and X * 1e20 differ in
            continue        # curvature by 1e40, which no step size serves)
        scaled_x = LinearRegression(solver=solver, max_iter=500).fit(far["B"] * factor, far["reg"])
        assert scaled_x.converged_
        assert_allclose(scaled_x.coef_ * factor, ref.coef_, rtol=1e-6)
    constant = LinearRegression().fit(far["B"], np.full(5000, 3.0))
    assert constant.converged_ and constant.intercept_ == pytest.approx(3.0)
    assert_allclose(constant.coef_, 0.0, atol=1e-12)


def test_least_squares_on_float32_reaches_the_default_tol(far):
    """The float32 products' rounding no longer hides the last digits: a pass in float64
    refines the normal equations' solution."""
    X = far["B"].astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ours = LinearRegression().fit(X, far["reg"])
    ref = sk.LinearRegression().fit(X.astype(np.float64), far["reg"])
    assert ours.converged_ and ours.n_passes_ <= 4
    assert_allclose(ours.coef_, ref.coef_, rtol=1e-9)


def test_duplicated_columns_get_the_minimum_norm_step(far):
    """A duplicated column makes the Hessian singular (barely positive definite after
    float32 rounding): Newton takes the minimum-norm step, as scikit-learn's lstsq."""
    X = np.column_stack([far["B"], far["B"][:, 0]])
    for dtype in [np.float64, np.float32]:
        Xt = X.astype(dtype)
        ours = LinearRegression(solver="newton").fit(Xt, far["reg"])
        ref = sk.LinearRegression().fit(Xt.astype(np.float64), far["reg"])
        assert ours.converged_
        assert_allclose(ours.coef_, ref.coef_, rtol=1e-6, atol=1e-9)
        assert ours.coef_[0] == pytest.approx(ours.coef_[-1], rel=1e-6)
        log = LogisticRegression(penalty=None, solver="newton", tol=1e-8).fit(Xt, far["binary"])
        ref = sk.LogisticRegression(penalty=None, tol=1e-12, max_iter=1000).fit(
            Xt[:, :4].astype(np.float64), far["binary"])
        assert log.converged_ and log.coef_[0, 0] == pytest.approx(log.coef_[0, -1], rel=1e-6)
        assert_allclose(log.predict_proba(Xt), ref.predict_proba(Xt[:, :4]), atol=1e-6)


@pytest.mark.parametrize("solver,penalty", [("gd", "l2"), ("auto", "l1")])
def test_step_size_solvers_refuse_squares_out_of_float32_range(far, solver, penalty):
    X = (far["B"] * 1e19).astype(np.float32)
    with pytest.raises(ValueError, match=f"solver='{'fista' if penalty == 'l1' else solver}'.*"
                                         "overflow or underflow float32.*solver='lbfgs'"):
        LogisticRegression(solver=solver, penalty=penalty).fit(X, far["binary"])


def test_fista_multinomial_far_from_the_origin_counts_its_passes(far):
    y = np.digitize(far["B"][:, 0], [-0.5, 0.5])
    m = LogisticRegression(penalty="l1", max_iter=20).fit(far["B"] + 1e6, y)
    assert m.n_passes_ == sum(h["passes"] for h in m.history_)


def test_a_refit_stopped_by_its_warning_keeps_the_last_fit_whole(far):
    m = LinearRegression().fit(far["B"] + 1e6, far["reg"])
    wide = np.column_stack([far["B"], far["B"][:, :1] ** 2]) + 1e6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        with pytest.raises(ConvergenceWarning):
            m.set_params(solver="gd", max_iter=1).fit(wide, far["reg"])
    assert m.coef_.shape == (4,)
    assert_allclose(m.predict(far["B"][:3] + 1e6),
                    LinearRegression().fit(far["B"] + 1e6, far["reg"]).predict(far["B"][:3] + 1e6))


def test_the_bits_do_not_depend_on_the_blas_threads(tmp_path):
    """A multi-threaded BLAS may split a product's sum among its threads; kernels run on one
    BLAS thread wherever they run, so the thread count of the process that computes (here
    the client's, on the synchronous and the threaded schedulers) changes nothing."""
    import dask
    from threadpoolctl import threadpool_info, threadpool_limits

    from dmlkit.datasets import make_classification

    path = make_classification(tmp_path / "c.zarr", 20_000, 32, chunk_rows=2000, random_state=0)
    fits = []
    for scheduler in ("sync", "threads"):
        for threads in (1, 2):
            with threadpool_limits(threads, user_api="blas"), dask.config.set(scheduler=scheduler):
                if {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"} \
                        != {threads}:
                    pytest.skip(f"BLAS does not take {threads} threads here")
                fits.append(LogisticRegression(cache=False).fit(path))
    for other in fits[1:]:
        assert_array_equal(other.coef_, fits[0].coef_)
        assert_array_equal(other.intercept_, fits[0].intercept_)
