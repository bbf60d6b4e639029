from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
from dask.callbacks import Callback
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.cluster import KMeans as SKKMeans

from dmlkit import KMeans
from tests.conftest import write_store


class CountComputes(Callback):
    """Counts dask computes (on the local schedulers)."""

    def __init__(self):
        super().__init__()
        self.computes = 0

    def _start(self, dsk):
        self.computes += 1


def sk_fit(X, init, max_iter=30, tol=0.0, sample_weight=None):
    return SKKMeans(init.shape[0], init=init, n_init=1, max_iter=max_iter, tol=tol).fit(
        X, sample_weight=sample_weight)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_sklearn_given_same_init(blobs, dtype):
    X = blobs[0].astype(dtype)
    init = X[[0, 1, 2, 3, 4, 5]].astype(np.float64)
    ours = KMeans(6, init=init, max_iter=30, tol=0).fit(X)
    ref = sk_fit(X, init)
    assert ours.cluster_centers_.dtype == dtype
    # float32 distances round differently from scikit-learn's: rows on a near-tie
    # may flip, which moves the centres a little
    tol = 1e-9 if dtype == np.float64 else 2e-3
    assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=tol, atol=tol)
    assert_allclose(ours.inertia_, ref.inertia_, rtol=max(tol, 1e-6) / 10)
    assert np.mean(ours.labels_ == ref.labels_) > 0.999


def test_inertia_is_true_sum_of_squared_distances(blobs):
    X = blobs[0].astype(np.float64)
    km = KMeans(6, random_state=1).fit(X)
    d2 = ((X[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)
    assert_allclose(km.inertia_, d2.min(1).sum(), rtol=1e-12)
    assert_array_equal(km.labels_, d2.argmin(1))
    assert_allclose(km.score(X), -km.inertia_, rtol=1e-12)


def test_sample_weight_matches_sklearn(blobs):
    X = blobs[0]
    w = np.random.default_rng(3).uniform(0, 3, size=X.shape[0])
    init = X[:6].astype(np.float64)
    ours = KMeans(6, init=init, max_iter=30, tol=0).fit(X, sample_weight=w)
    ref = sk_fit(X, init, sample_weight=w)
    assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-4, atol=1e-4)
    assert_allclose(ours.inertia_, ref.inertia_, rtol=1e-5)


def test_integer_weights_equal_repeated_rows(blobs):
    X = blobs[0][:3000]
    reps = np.random.default_rng(1).integers(0, 3, size=X.shape[0])
    reps[0] = 1
    init = X[:6].astype(np.float64)
    a = KMeans(6, init=init, max_iter=50, tol=0).fit(X, sample_weight=reps)
    b = KMeans(6, init=init, max_iter=50, tol=0).fit(np.repeat(X, reps, axis=0))
    assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert_allclose(a.inertia_, b.inertia_, rtol=1e-5)


@pytest.mark.parametrize("chunks", [20_000, 5000, 3001, (7000, 13, 987, 12_000)])
@pytest.mark.parametrize("split_every", [2, 3, 8])
def test_independent_of_chunking_and_split_every(blobs, chunks, split_every):
    X = blobs[0]
    if isinstance(chunks, tuple):
        chunks = (chunks, (5,))
    ref = KMeans(6, random_state=7).fit(X)
    km = KMeans(6, random_state=7, split_every=split_every).fit(da.from_array(X, chunks=chunks))
    assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert_allclose(km.inertia_, ref.inertia_, rtol=1e-6)
    assert km.n_iter_ == ref.n_iter_
    assert_array_equal(km.labels_.compute(), ref.labels_)


@pytest.mark.parametrize("init", ["k-means||", "k-means++", "random"])
def test_same_seed_same_answer_any_chunking(blobs, init):
    X = blobs[0]
    a = KMeans(6, init=init, random_state=11, max_iter=2).fit(da.from_array(X, chunks=4000))
    b = KMeans(6, init=init, random_state=11, max_iter=2).fit(da.from_array(X, chunks=2999))
    assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-5, atol=1e-5)
    assert a.history_[0]["inertia"] == pytest.approx(b.history_[0]["inertia"], rel=1e-6)
    c = KMeans(6, init=init, random_state=12, max_iter=2).fit(X)
    assert c.history_[0]["inertia"] != a.history_[0]["inertia"]  # another seed, another start


@pytest.mark.parametrize("init", ["k-means||", "k-means++"])
def test_init_quality_close_to_sklearn(blobs, init):
    X, centers = blobs
    ours = KMeans(6, init=init, random_state=0).fit(X)
    ref = SKKMeans(6, n_init=10, random_state=0).fit(X)
    assert ours.converged_
    assert ours.inertia_ <= ref.inertia_ * 1.001
    found = np.sort(ours.cluster_centers_[:, 0])
    assert_allclose(found, np.sort(centers[:, 0]), atol=0.1)


def test_kmeans_parallel_candidates_and_passes(blobs):
    X = blobs[0]
    km = KMeans(6, random_state=0, init_rounds=3).fit(X)
    # 3 rounds + 1 weighting pass + iterations + final inertia pass
    assert km.n_passes_ == 3 + 1 + km.n_iter_ + 1


def test_one_compute_and_one_read_per_iteration(tmp_path, blobs):
    X = blobs[0]
    path = write_store(tmp_path / "blobs.zarr", X, chunk_rows=2500)
    reads = []

    def read(block):
        reads.append(block.shape[0])
        return block

    lazy = da.from_zarr(path, component="X").map_blocks(read, meta=np.empty((0, 0), X.dtype))
    init = X[:6].astype(np.float64)
    counter = CountComputes()
    with counter:
        km = KMeans(6, init=init, max_iter=7, tol=0, cache=False).fit(lazy)
    n_blocks = X.shape[0] // 2500
    assert km.n_iter_ == 7 and not km.converged_
    passes = km.n_iter_ + 1  # + the exact inertia at the end
    assert km.n_passes_ == passes
    assert counter.computes == passes  # labels_ stays lazy for a dask input
    assert len(reads) == passes * n_blocks  # every pass reads every block once
    assert sum(reads) == passes * X.shape[0]
    assert len(km.history_) == 7
    assert {"iteration", "inertia", "center_shift", "seconds"} <= set(km.history_[0])


def test_history_inertia_matches_exact_inertia(blobs):
    X = blobs[0].astype(np.float64)
    init = X[:6]
    one = KMeans(6, init=init, max_iter=1, tol=0).fit(X)
    d2 = ((X[:, None, :] - init[None]) ** 2).sum(-1).min(1).sum()
    assert_allclose(one.history_[0]["inertia"], d2, rtol=1e-9)


def test_fit_from_zarr_path_xarray_and_dask_agree(tmp_path, blobs):
    from dmlkit import open_zarr

    X = blobs[0]
    path = write_store(tmp_path / "b.zarr", X, chunk_rows=3000)
    ds = open_zarr(path)
    init = X[:6].astype(np.float64)
    fits = [KMeans(6, init=init, max_iter=20).fit(obj)
            for obj in (path, ds, ds["X"], ds["X"].data, X)]
    for f in fits[1:]:
        assert_allclose(f.cluster_centers_, fits[0].cluster_centers_, rtol=1e-6)
    assert isinstance(fits[0].labels_, da.Array)
    assert isinstance(fits[-1].labels_, np.ndarray)
    assert_array_equal(fits[0].labels_.compute(), fits[-1].labels_)


def test_streaming_and_cached_agree(tmp_path, blobs):
    X = blobs[0]
    path = write_store(tmp_path / "b.zarr", X, chunk_rows=3000)
    a = KMeans(6, random_state=0, cache=False).fit(path)
    b = KMeans(6, random_state=0, cache=True).fit(path)  # re-blocked: rounding differs
    assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-6)
    assert a.inertia_ == pytest.approx(b.inertia_, rel=1e-9)


def test_predict_transform_score(blobs):
    X = blobs[0]
    km = KMeans(6, random_state=0).fit(X)
    d = ((X[:, None, :].astype(np.float64) - km.cluster_centers_[None]) ** 2).sum(-1)
    assert_array_equal(km.predict(X), d.argmin(1))
    assert_allclose(km.transform(X), np.sqrt(d), rtol=1e-3, atol=1e-3)
    lazy = km.predict(da.from_array(X, chunks=999))
    assert isinstance(lazy, da.Array)
    assert_array_equal(lazy.compute(), km.labels_)
    assert_array_equal(km.fit_predict(X), km.labels_)
    assert km.score(X) == pytest.approx(-d.min(1).sum(), rel=1e-5)


def test_empty_cluster_is_reseeded_with_farthest_row():
    X = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [30.0]])
    init = np.array([[0.1], [10.0], [100.0]])  # the third centre attracts nothing
    km = KMeans(3, init=init, max_iter=1, tol=0).fit(X)
    assert km.history_[0]["n_relocated"] == 1
    # 30.0 is farthest from its centre (10.0): it becomes the third centre
    assert_allclose(km.cluster_centers_.ravel(), [0.1, 10.05, 30.0])
    ref = sk_fit(X, init, max_iter=1)
    assert_allclose(km.cluster_centers_, ref.cluster_centers_)


def test_more_clusters_than_distinct_points():
    X = np.repeat([[0.0, 0.0], [1.0, 1.0]], 10, axis=0)
    km = KMeans(3, random_state=0).fit(X)
    assert km.inertia_ == pytest.approx(0.0, abs=1e-12)


def test_n_init_keeps_best_run(blobs):
    X = blobs[0]
    single = [KMeans(6, init="random", random_state=5, max_iter=3).fit(X).inertia_]
    best = KMeans(6, init="random", n_init=3, random_state=5, max_iter=3).fit(X)
    assert best.inertia_ <= single[0] + 1e-6


@pytest.mark.parametrize("init", ["given", "k-means||"])
def test_float32_data_far_from_the_origin(init):
    """Blobs of spread 1 at an offset of 1e4 in float32: the scores compare the rows with
    the centres relative to the centres' mean, and the sums are of the shifted rows, so
    the labels and centres are the float64 fit's (they were a scramble: ARI 0.16)."""
    rng = np.random.default_rng(1)
    C = rng.standard_normal((4, 3)) * 5
    X = C[rng.integers(0, 4, 6000)] + rng.standard_normal((6000, 3))
    X32 = (X + 1e4).astype(np.float32)
    X64 = X32.astype(np.float64)
    start = X64[:4] if init == "given" else "k-means++"
    ref = SKKMeans(4, init=start, n_init=1, max_iter=50, tol=0, random_state=0).fit(X64)
    ours = KMeans(4, init=X64[:4] if init == "given" else init, max_iter=50, tol=0,
                  random_state=0).fit(da.from_array(X32, chunks=1000))
    order = np.argsort(ours.cluster_centers_[:, 0])
    ref_order = np.argsort(ref.cluster_centers_[:, 0])
    assert_allclose(ours.cluster_centers_[order], ref.cluster_centers_[ref_order], atol=1e-3)
    assert_allclose(ours.inertia_, ref.inertia_, rtol=1e-4)


def test_integer_data_is_computed_in_float64():
    X = np.array([[1, 2], [1, 4], [1, 0], [10, 2], [10, 4], [10, 0]])
    km = KMeans(2, random_state=0).fit(X)
    assert km.cluster_centers_.dtype == np.float64
    assert sorted(km.cluster_centers_[:, 0].tolist()) == [1.0, 10.0]


def test_params_follow_sklearn_contract():
    km = KMeans(3, tol=0.5)
    assert km.get_params()["tol"] == 0.5
    km.set_params(n_clusters=4)
    assert km.n_clusters == 4
    X = np.random.default_rng(0).standard_normal((100, 2))
    assert km.fit(X) is km
    assert km.cluster_centers_.shape == (4, 2)


def test_progress_bar_runs(blobs, capsys):
    km = KMeans(6, random_state=0, progress=True).fit(blobs[0])
    err = capsys.readouterr().err
    assert "KMeans" in err and "inertia" in err
    assert km.n_iter_ >= 1


# ----------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, where", [(np.nan, "NaN"), (np.inf, "inf")])
def test_non_finite_values_name_the_chunk(blobs, bad, where):
    X = blobs[0].copy()
    X[12_345, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf in chunk 4 \(rows 12000 to 14999\) at row 12345;"):
        KMeans(6, random_state=0).fit(da.from_array(X, chunks=3000))
    with pytest.raises(ValueError, match="NaN or inf in chunk 4"):
        KMeans(6, init=X[:6].astype(float) * 0).fit(da.from_array(X, chunks=3000))


def test_one_dimensional_X():
    with pytest.raises(ValueError, match=r"X should be 2-D .* shape \(10,\)"):
        KMeans(2).fit(np.arange(10.0))


def test_too_many_clusters():
    with pytest.raises(ValueError, match="n_samples=5 should be >= n_clusters=8"):
        KMeans(8).fit(np.zeros((5, 2)))


@pytest.mark.parametrize("w, msg", [
    (np.ones(7), "sample_weight has 7 rows but X has 10"),
    (-np.ones(10), r"sample_weight should be >= 0; sample_weight\[0\]=-1.0"),
    (np.zeros(10), "zero everywhere"),
    (np.full(10, np.nan), "NaN or inf"),
])
def test_bad_sample_weight(w, msg):
    X = np.random.default_rng(0).standard_normal((10, 2))
    with pytest.raises(ValueError, match=msg):
        KMeans(2).fit(X, sample_weight=w)


def test_negative_lazy_sample_weight_found_in_first_pass():
    X = np.random.default_rng(0).standard_normal((100, 2))
    w = -da.ones(100, chunks=30)
    with pytest.raises(ValueError, match="sample_weight should be >= 0; its minimum is -1.0"):
        KMeans(2, random_state=0).fit(X, sample_weight=w)


@pytest.mark.parametrize("params, msg", [
    ({"init": "kmeans"}, "init='kmeans' should be one of"),
    ({"init": np.zeros((3, 2))}, r"init has shape \(3, 2\); expected \(n_clusters, n_features\) = \(2, 2\)"),
    ({"n_clusters": 0}, "n_clusters=0 should be an integer >= 1"),
    ({"max_iter": 0}, "max_iter=0 should be an integer >= 1"),
    ({"tol": -1}, "tol=-1 should be a number >= 0"),
    ({"split_every": 1}, "split_every=1 should be an integer >= 2"),
    ({"cache": "sometimes"}, "cache='sometimes' should be 'auto', True or False"),
    ({"random_state": "x"}, "random_state='x' should be"),
])
def test_bad_parameters(params, msg):
    X = np.random.default_rng(0).standard_normal((10, 2))
    kw = {"n_clusters": 2, **params}
    with pytest.raises(ValueError, match=msg):
        KMeans(**kw).fit(X)


def test_zarr_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Zarr store"):
        KMeans(2).fit(str(tmp_path / "missing.zarr"))
    import zarr

    g = zarr.open_group(str(tmp_path / "noX.zarr"), mode="w")
    g.create_array("Z", shape=(4, 2), dtype="f4", dimension_names=("sample", "feature"))
    with pytest.raises(ValueError, match="holds no array 'X'"):
        KMeans(2).fit(str(tmp_path / "noX.zarr"))


def test_predict_before_fit_and_feature_mismatch():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        KMeans(2).predict(np.zeros((3, 2)))
    km = KMeans(2, random_state=0).fit(np.random.default_rng(0).standard_normal((20, 3)))
    with pytest.raises(ValueError, match="X has 2 features; KMeans was fitted with n_features_in_=3"):
        km.predict(np.zeros((3, 2)))
