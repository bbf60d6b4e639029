"""NearestNeighbors, KNeighborsClassifier and KNeighborsRegressor against scikit-learn."""
from __future__ import annotations

import gc
import os

import dask
import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn import neighbors as skn
from sklearn.datasets import load_digits

from dmlkit import KNeighborsClassifier, KNeighborsRegressor, NearestNeighbors
from dmlkit.neighbors import recall_at_k
from tests.conftest import write_store


@pytest.fixture(scope="module")
def points():
    """2,000 x 6 float64 rows and 150 queries (no exact ties)."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((2000, 6)), rng.standard_normal((150, 6))


def sk_nn(X, k, metric="euclidean"):
    return skn.NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(X)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
@pytest.mark.parametrize("k", [1, 5, 17])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kneighbors_equals_sklearn(points, metric, k, dtype):
    X, Q = (a.astype(dtype) for a in points)
    d, i = NearestNeighbors(n_neighbors=k, metric=metric).fit(da.from_array(X, chunks=600)) \
        .kneighbors(Q)
    sd, si = sk_nn(X, k, metric).kneighbors(Q)
    assert isinstance(d, np.ndarray) and d.dtype == np.float64 and i.dtype == np.int64
    assert_array_equal(i, si)
    # scikit-learn rounds float32 distances in float32; ours are exact in float64
    assert_allclose(d, sd, rtol=1e-6 if dtype == np.float32 else 1e-9, atol=1e-6)


@pytest.mark.parametrize("chunks", [2000, 500, 333, (700, 13, 987, 300)])
@pytest.mark.parametrize("split_every", [2, 3, 8])
def test_independent_of_chunking_and_split_every(points, chunks, split_every):
    X, Q = points
    ref_d, ref_i = sk_nn(X, 9).kneighbors(Q)
    Xd = da.from_array(X, chunks=(chunks, 6))
    Qd = da.from_array(Q, chunks=40)
    d, i = NearestNeighbors(9, split_every=split_every).fit(Xd).kneighbors(Qd)
    assert isinstance(i, da.Array) and i.chunks[0] == Qd.chunks[0]
    d, i = dask.compute(d, i)
    assert_array_equal(i, ref_i)
    assert_allclose(d, ref_d, rtol=1e-12)


def test_k_larger_than_a_chunk_and_k_equal_n(points):
    X, Q = points[0][:60], points[1]
    nn = NearestNeighbors(25).fit(da.from_array(X, chunks=10))
    assert_array_equal(nn.kneighbors(Q, return_distance=False), sk_nn(X, 25).kneighbors(Q)[1])
    d, i = nn.kneighbors(Q, n_neighbors=60)
    sd, si = sk_nn(X, 60).kneighbors(Q)
    assert_array_equal(i, si)
    assert_allclose(d, sd, rtol=1e-12)
    assert_array_equal(np.sort(i, axis=1), np.tile(np.arange(60), (len(Q), 1)))


@pytest.mark.parametrize("scale, dtype", [(1e-30, np.float64), (1e-20, np.float32),
                                          (1e20, np.float32), (1e100, np.float64)])
@pytest.mark.parametrize("algorithm", ["brute", "ivf"])
# the quantizer's K-means on float32 squares past float32's range overflows, as
# scikit-learn's does; IVF probing every list stays exact all the same
@pytest.mark.filterwarnings("ignore::RuntimeWarning:dmlkit._kernels.kmeans")
def test_values_far_outside_float32_comfort_give_the_exact_neighbours(points, scale, dtype,
                                                                       algorithm):
    """Rows whose squares overflow (or underflow) float32 are scaled by a power of two
    for the float32 comparisons; queries very far from the data take every row."""
    X, Q = ((a * scale).astype(dtype) for a in points)
    # some queries far away from every row: 1e40 times the data's spread makes float32
    # products with the scaled rows overflow (where the dtype holds such queries)
    far = [1e25, 1e40, 1e40] if dtype == np.float64 else (
        [1e15, 1e40, 1e40] if scale < 1 else [1e15, 1e15, 1e15])
    Q = np.concatenate([Q, (Q[:3] * np.array(far)[:, None]).astype(dtype)])
    kw = dict(algorithm=algorithm, n_lists=8, n_probe=8) if algorithm == "ivf" else {}
    d, i = NearestNeighbors(7, **kw).fit(da.from_array(X, chunks=700)).kneighbors(Q)
    sd, si = sk_nn(X.astype(np.float64), 7).kneighbors(Q.astype(np.float64))
    assert_array_equal(i[:-3], si[:-3])
    assert_allclose(d, sd, rtol=1e-6)
    # the far queries: distances that differ in the last float64 digits (or not at all);
    # every row was compared: the k smallest of dmlkit's exact float64 distances to all
    # rows, ties to the lower index
    from dmlkit._kernels.knn import exact_distances

    for q, got in zip(Q[-3:], i[-3:]):
        exact = exact_distances(np.broadcast_to(q, X.shape), X.astype(np.float64),
                                "euclidean")
        assert_array_equal(got, np.lexsort((np.arange(len(X)), exact))[:7])


def test_duplicates_ties_go_to_the_lower_index():
    rng = np.random.default_rng(3)
    X = rng.integers(0, 3, size=(400, 2)).astype(np.float64)  # 9 distinct rows, many ties
    Q = rng.integers(0, 3, size=(30, 2)).astype(np.float64)
    d, i = NearestNeighbors(20).fit(da.from_array(X, chunks=37)).kneighbors(Q)
    D = ((Q[:, None] - X[None]) ** 2).sum(-1) ** 0.5
    expected = np.argsort(D, axis=1, kind="stable")[:, :20]  # stable: lower index first
    assert_array_equal(i, expected)
    sd, _ = sk_nn(X, 20).kneighbors(Q)  # scikit-learn breaks ties its own way
    assert_allclose(d, sd, atol=1e-12)


def test_queries_are_the_training_set(points):
    X = points[0]
    d, i = NearestNeighbors(4).fit(X).kneighbors(X)
    assert_array_equal(i[:, 0], np.arange(len(X)))  # self is neighbour 0
    assert_array_equal(d[:, 0], 0.0)


def test_no_query_excludes_self_like_sklearn(points):
    X = points[0]
    d, i = NearestNeighbors(5).fit(da.from_array(X, chunks=300)).kneighbors()
    assert isinstance(d, da.Array)  # the fitted X was lazy
    sd, si = sk_nn(X, 5).kneighbors()
    assert_array_equal(i.compute(), si)
    assert_allclose(d.compute(), sd, rtol=1e-12)
    # more duplicates than neighbours: the first duplicate is dropped, never the sample alone
    Xdup = np.zeros((6, 2))
    _, idup = NearestNeighbors(3).fit(Xdup).kneighbors()
    assert not (idup == np.arange(6)[:, None]).any()
    assert_array_equal(idup, [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2], [1, 2, 3], [1, 2, 3]])


@pytest.mark.parametrize("mode", ["connectivity", "distance"])
def test_kneighbors_graph_equals_sklearn(points, mode):
    X, Q = points
    G = NearestNeighbors(6).fit(X).kneighbors_graph(Q, mode=mode)
    S = sk_nn(X, 6).kneighbors_graph(Q, mode=mode)
    assert G.format == "csr" and G.shape == (len(Q), len(X))
    assert_allclose(G.toarray(), S.toarray(), rtol=1e-12)
    G = NearestNeighbors(6).fit(X).kneighbors_graph(None, mode=mode)
    assert_allclose(G.toarray(), sk_nn(X, 6).kneighbors_graph(None, mode=mode).toarray(),
                    rtol=1e-12)


def test_zarr_store_and_lazy_queries(tmp_path, points):
    X, Q = (a.astype(np.float32) for a in points)
    path = write_store(tmp_path / "x.zarr", X, chunk_rows=450)
    nn = NearestNeighbors(7, cache=False).fit(path)
    assert isinstance(nn._fit_X, da.Array)  # the rows stay in the store
    d, i = nn.kneighbors(da.from_array(Q, chunks=64))
    assert isinstance(d, da.Array) and isinstance(i, da.Array)
    assert_array_equal(i.compute(), sk_nn(X, 7).kneighbors(Q)[1])
    # one tile per (data chunk, query block); each chunk is read from the store once
    graph = dict(i.__dask_optimize__(i.__dask_graph__(), i.__dask_keys__()))
    names = [key[0] for key in graph if isinstance(key, tuple)]
    assert sum("-tile-" in name for name in names) == 5 * 3
    assert sum(name.startswith("open_dataset-X") for name in names) == 5


def test_classifier_on_digits_equals_sklearn():
    """Digits are integers 0..16: some queries have exact ties at the 5th neighbour.

    There scikit-learn's choice depends on its heap; ours is the lower row
    index. Everywhere else the answers are identical.
    """
    X, y = load_digits(return_X_y=True)
    X_train, y_train, X_test, y_test = X[:1400], y[:1400], X[1400:], y[1400:]
    D = np.sort(((X_test[:, None] - X_train[None]) ** 2).sum(-1), axis=1)
    untied = D[:, 4] < D[:, 5]
    assert 0 < (~untied).sum() < 10
    stable = np.argsort(((X_test[:, None] - X_train[None]) ** 2).sum(-1), axis=1,
                        kind="stable")[:, :5]
    for weights in ("uniform", "distance"):
        ours = KNeighborsClassifier(5, weights=weights).fit(da.from_array(X_train, chunks=300),
                                                            y_train)
        ref = skn.KNeighborsClassifier(5, weights=weights, algorithm="brute").fit(X_train, y_train)
        assert_array_equal(ours.classes_, ref.classes_)
        assert_array_equal(ours.kneighbors(X_test)[1], stable)
        proba = ours.predict_proba(X_test)
        assert_allclose(proba[untied], ref.predict_proba(X_test)[untied], atol=1e-12)
        assert_array_equal(ours.predict(X_test)[untied], ref.predict(X_test)[untied])
        assert_array_equal(ours.predict(X_test), ours.classes_[proba.argmax(axis=1)])
        assert abs(ours.score(X_test, y_test) - ref.score(X_test, y_test)) <= 2 / len(y_test)
        assert ours.score(X_test, y_test) > 0.95
    lazy = ours.predict(da.from_array(X_test, chunks=100))
    assert isinstance(lazy, da.Array)
    assert_array_equal(lazy.compute(), ours.predict(X_test))


def test_classifier_string_labels_and_self_prediction(points):
    X = points[0][:300]
    y = np.where(X[:, 0] > 0, "pos", "neg")
    ours = KNeighborsClassifier(3).fit(X, y)
    ref = skn.KNeighborsClassifier(3, algorithm="brute").fit(X, y)
    assert_array_equal(ours.predict(points[1]), ref.predict(points[1]))
    assert_array_equal(ours.predict(), ref.predict(None))  # each row without itself


@pytest.mark.parametrize("weights", ["uniform", "distance", lambda d: np.exp(-d)])
def test_regressor_equals_sklearn(points, weights):
    X, Q = points
    y = X @ np.arange(6.0) + np.sin(X[:, 0])
    ours = KNeighborsRegressor(8, weights=weights).fit(da.from_array(X, chunks=700), y)
    ref = skn.KNeighborsRegressor(8, weights=weights, algorithm="brute").fit(X, y)
    assert_allclose(ours.predict(Q), ref.predict(Q), rtol=1e-12)
    y_q = Q @ np.arange(6.0)
    assert_allclose(ours.score(Q, y_q), ref.score(Q, y_q), rtol=1e-12)


def test_targets_from_the_store(tmp_path, points):
    X = points[0].astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    path = write_store(tmp_path / "xy.zarr", X, y, chunk_rows=500)
    ours = KNeighborsClassifier(5).fit(path)  # y from the store
    ref = skn.KNeighborsClassifier(5, algorithm="brute").fit(X, y)
    assert_array_equal(ours.predict(points[1].astype(np.float32)),
                       ref.predict(points[1].astype(np.float32)))


def test_errors(points):
    X, Q = points
    nn = NearestNeighbors(5).fit(X[:10])
    with pytest.raises(ValueError, match="n_neighbors=11 should be <= n_samples_fit=10"):
        nn.kneighbors(Q, n_neighbors=11)
    with pytest.raises(ValueError,
                       match="n_neighbors=10 should be < n_samples_fit=10 when Q is None"):
        nn.kneighbors(None, n_neighbors=10)
    with pytest.raises(ValueError, match="Q has 5 features; NearestNeighbors was fitted with "
                                         "n_features_in_=6"):
        nn.kneighbors(Q[:, :5])
    with pytest.raises(ValueError, match="metric='manhattan' should be one of"):
        NearestNeighbors(metric="manhattan").fit(X)
    with pytest.raises(ValueError, match="algorithm='kd_tree' should be one of"):
        NearestNeighbors(algorithm="kd_tree").fit(X)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"n_neighbors={bad!r} should be an integer >= 1"):
            NearestNeighbors(bad).fit(X)
    with pytest.raises(ValueError, match="weights='gaussian' should be"):
        KNeighborsClassifier(weights="gaussian").fit(X, X[:, 0] > 0)
    with pytest.raises(ValueError, match="mode='weights' should be one of"):
        nn.kneighbors_graph(Q, mode="weights")
    with pytest.raises(ValueError, match=r"Q should be 2-D .* got shape \(6,\)"):
        nn.kneighbors(Q[0])
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError, match="NearestNeighbors instance is not fitted"):
        NearestNeighbors().kneighbors(Q)


def test_non_finite_values_are_named(points):
    X, Q = points[0].copy(), points[1].copy()
    X[1234, 2] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or inf in chunk 2 \(rows 1000 to 1499\)"):
        NearestNeighbors().fit(da.from_array(X, chunks=500))
    nn = NearestNeighbors().fit(points[0])
    Q[17, 0] = np.inf
    with pytest.raises(ValueError, match="Q contains NaN or inf in row 17"):
        nn.kneighbors(Q)
    d, i = nn.kneighbors(da.from_array(Q, chunks=10))  # lazy: raised when computed
    with pytest.raises(ValueError, match="Q contains NaN or inf in row 17"):
        i.compute()
    y = np.arange(2000.0)
    y[5] = np.nan
    with pytest.raises(ValueError, match="X or y contains NaN or inf in chunk 0"):
        KNeighborsRegressor().fit(points[0], y)


def test_progress_bar_gives_the_same_answer(points, capsys):
    X, Q = points
    d, i = NearestNeighbors(3, progress=True).fit(X).kneighbors(Q)
    assert_array_equal(i, sk_nn(X, 3).kneighbors(Q)[1])
    assert "NearestNeighbors" in capsys.readouterr().err


# --------------------------------------------------------------------------- IVF


@pytest.fixture(scope="module")
def clustered():
    rng = np.random.default_rng(7)
    centers = rng.uniform(-10, 10, size=(8, 8))
    X = (centers[rng.integers(0, 8, 6000)] + rng.standard_normal((6000, 8))).astype(np.float32)
    Q = (centers[rng.integers(0, 8, 200)] + rng.standard_normal((200, 8))).astype(np.float32)
    return X, Q


def zarr_chunks(path, name):
    import zarr

    a = zarr.open_group(str(path), mode="r")[name]
    full, rest = divmod(a.shape[0], a.chunks[0])
    return [a.chunks[0]] * full + ([rest] if rest else [])


def test_ivf_every_list_probed_equals_exact(clustered, tmp_path):
    X, Q = clustered
    exact_d, exact_i = sk_nn(X, 10).kneighbors(Q)
    path = tmp_path / "index.zarr"
    ivf = NearestNeighbors(10, algorithm="ivf", n_lists=30, n_probe=30, index_path=path,
                           random_state=0).fit(da.from_array(X, chunks=1000))
    assert ivf.index_path_ == str(path) and os.path.isdir(path)
    assert ivf.cluster_centers_.shape == (30, 8) and ivf.list_sizes_.sum() == 6000
    # the searched blocks are the store's: rows sorted by list inside each
    assert ivf._ivf["list"].chunks == (tuple(zarr_chunks(path, "list")),)
    for block in ivf._ivf["list"].blocks:
        assert (np.diff(block.compute()) >= 0).all()
    d, i = ivf.kneighbors(Q)
    assert_array_equal(i, exact_i)
    assert_allclose(d, exact_d, rtol=1e-6)
    # fewer lists probed: approximate, recall grows with n_probe
    recalls = [recall_at_k(ivf.set_params(n_probe=p).kneighbors(Q)[1], exact_i)
               for p in (1, 4, 12)]
    assert recalls[0] < 1.0 and recalls == sorted(recalls) and recalls[-1] > 0.95
    # the store: rows sorted by list inside each block, the original row numbers a permutation
    import zarr

    g = zarr.open_group(str(path), mode="r")
    assert_array_equal(np.sort(g["index"][:]), np.arange(6000))
    assert_array_equal(g["X"][:], X[g["index"][:]])
    # refitting into the same folder replaces the index; a foreign folder is refused
    NearestNeighbors(algorithm="ivf", n_lists=5, index_path=path).fit(X)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not an index written by dmlkit"):
        NearestNeighbors(algorithm="ivf", index_path=tmp_path / "other").fit(X)


def test_ivf_probes_chosen_in_other_blocks_give_the_same_answer(clustered, monkeypatch):
    """With more worker threads than query blocks, the probes are chosen in blocks of
    their own: joined whole inside the tiles when the queries are one block, rechunked
    to the queries' blocks otherwise. Every way gives the same bits."""
    from dmlkit import _graph, data

    X, Q = clustered
    Q = np.concatenate([Q] * 10)  # 2,000 queries
    monkeypatch.setattr(data, "_total_threads", lambda: 2)
    ivf = NearestNeighbors(10, algorithm="ivf", n_lists=30, n_probe=4,
                           random_state=0).fit(da.from_array(X, chunks=1000))
    assert ivf._ivf["rows"].numblocks[0] == 2  # one block per thread
    seen = []
    tiles = _graph.tiles

    def spy(X_, queries, *args, whole=(), **kw):
        seen.append((queries[0].numblocks[0], len(whole),
                     any("rechunk" in str(k) for k in queries[-1].__dask_graph__())))
        return tiles(X_, queries, *args, whole=whole, **kw)

    monkeypatch.setattr(_graph, "tiles", spy)
    results = []
    for threads in (1, 2, 64):
        monkeypatch.setattr(data, "_total_threads", lambda: threads)
        results.append(ivf.kneighbors(Q))
    assert seen[0][1] == 0 and not seen[0][2]  # probes from the queries' own blocks
    assert seen[1] == (1, 1, False)  # one query block: the probes joined whole
    assert seen[2][0] > 1 and seen[2][1] == 0 and seen[2][2]  # rechunked to the queries'
    for d, i in results[1:]:
        assert_array_equal(i, results[0][1])
        assert_array_equal(d, results[0][0])


def test_ivf_temporary_index_is_removed(clustered):
    X, _ = clustered
    ivf = NearestNeighbors(algorithm="ivf", n_lists=10, random_state=0).fit(X)
    folder = os.path.dirname(ivf.index_path_)
    assert os.path.isdir(folder)
    del ivf
    gc.collect()
    assert not os.path.exists(folder)


def test_ivf_classifier_and_cosine(clustered):
    X, Q = clustered
    y = (X[:, 0] > 0).astype(int)
    clf = KNeighborsClassifier(5, algorithm="ivf", n_lists=20, n_probe=20, random_state=1).fit(X, y)
    ref = skn.KNeighborsClassifier(5, algorithm="brute").fit(X, y)
    assert_array_equal(clf.predict(Q), ref.predict(Q))
    cos = NearestNeighbors(5, algorithm="ivf", metric="cosine", n_lists=20, n_probe=20,
                           random_state=1).fit(X)
    assert_array_equal(cos.kneighbors(Q)[1], sk_nn(X, 5, "cosine").kneighbors(Q)[1])
    with pytest.raises(ValueError, match="n_lists=7000 should be <= n_samples=6000"):
        NearestNeighbors(algorithm="ivf", n_lists=7000).fit(X)
    with pytest.raises(ValueError, match="n_probe=0 should be an integer >= 1"):
        NearestNeighbors(algorithm="ivf", n_probe=0).fit(X)


def test_recall_at_k():
    assert recall_at_k([[1, 2], [3, -1]], [[2, 1], [3, 4]]) == 0.75
    with pytest.raises(ValueError, match="the same shape"):
        recall_at_k([[1, 2]], [[1, 2, 3]])


# ------------------------------------------------------------------ real cluster


@pytest.mark.cluster
def test_on_a_local_cluster_equals_sync(tmp_path, clustered):
    from distributed import Client, LocalCluster

    X, Q = clustered
    path = write_store(tmp_path / "c.zarr", X, chunk_rows=1000)
    with dask.config.set(scheduler="sync"):
        ref_d, ref_i = NearestNeighbors(6, split_every=2).fit(path).kneighbors(Q)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", memory_limit="1GiB") as cluster, Client(cluster):
        nn = NearestNeighbors(6, split_every=2, progress=True).fit(path)
        d, i = nn.kneighbors(Q)  # NumPy queries, the bar follows futures
        assert_array_equal(i, ref_i)
        assert_array_equal(d, ref_d)
        d, i = nn.kneighbors(da.from_array(Q, chunks=50))
        assert_array_equal(i.compute(), ref_i)
        ivf = NearestNeighbors(6, algorithm="ivf", n_lists=16, n_probe=16,
                               index_path=tmp_path / "ivf.zarr", random_state=0).fit(path)
        assert_array_equal(ivf.kneighbors(Q)[1], ref_i)
