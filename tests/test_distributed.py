"""KMeans on a real multi-process LocalCluster, including a worker killed mid-fit."""
from __future__ import annotations

import gc
import logging
import os
import pickle
import signal
import socket
import threading
import time
from contextlib import contextmanager

import dask
import dask.array as da
import numpy as np
import pytest
from distributed import Client, LocalCluster
from numpy.testing import assert_allclose, assert_array_equal

from dmlkit import KMeans
from dmlkit._kernels import kmeans as K
from tests.conftest import write_store

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", memory_limit="2GiB") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    centers = rng.uniform(-5, 5, size=(5, 4))
    X = (centers[rng.integers(0, 5, 30_000)] + rng.standard_normal((30_000, 4))).astype(np.float32)
    return X, write_store(tmp_path_factory.mktemp("d") / "blobs.zarr", X, chunk_rows=2000)


#: The synchronous references run as if on a machine of this many cores, not the cluster's
#: 2 threads: a cached copy's blocks, and so every sum's order, depend on the data alone.
REFERENCE_CPU_COUNT = 5


@contextmanager
def _synchronous():
    """The synchronous scheduler, on what looks like a machine of REFERENCE_CPU_COUNT cores."""
    with dask.config.set(scheduler="sync"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(dask.system, "CPU_COUNT", REFERENCE_CPU_COUNT)
        yield


def _reference(X, **kw):
    with _synchronous():
        return KMeans(5, random_state=3, **kw).fit(X)


@pytest.mark.parametrize("cache", [True, False])
def test_cluster_fit_equals_sync_fit(client, store, cache):
    X, path = store
    ref = _reference(path, cache=cache)  # same blocks, same tree: the same bits
    km = KMeans(5, random_state=3, cache=cache).fit(path)
    assert_array_equal(km.cluster_centers_, ref.cluster_centers_)
    assert km.inertia_ == ref.inertia_
    assert km.n_iter_ == ref.n_iter_
    assert_array_equal(km.labels_.compute(), ref.labels_)


def test_numpy_input_is_scattered_and_fits(client, store):
    X, _ = store
    ref = _reference(X)
    km = KMeans(5, random_state=3).fit(X)
    assert isinstance(km.labels_, np.ndarray)
    assert_allclose(km.cluster_centers_, ref.cluster_centers_, rtol=1e-6, atol=1e-6)


def _kill(pid: int, resident: bool, delay: float) -> None:
    """Kill a worker process: at once when passes are resident (they take milliseconds, so
    the next pass finds it dead), else ``delay`` seconds on, while the next pass's tasks run."""
    if not resident:
        threading.Timer(delay, os.kill, (pid, signal.SIGKILL)).start()
        return
    import psutil

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("resident", [True, False], ids=["resident", "tasks"])
def test_worker_killed_mid_fit_changes_nothing(client, store, monkeypatch, resident_calls,
                                               resident, caplog):
    caplog.set_level(logging.INFO, logger="dmlkit._resident")  # why the actors stopped
    X, path = store
    init = X[:5].astype(np.float64)
    params = dict(init=init, max_iter=12, tol=0)
    with _synchronous():
        ref = KMeans(5, cache=True, **params).fit(path)

    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    calls = {"n": 0}
    original = K.update_centers

    def update_and_sabotage(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            # kill one worker: its cached chunks (and running tasks) are lost and must be
            # recomputed from the store
            _kill(pid, resident, 0.02)
        return original(*args, **kwargs)

    monkeypatch.setattr(K, "update_centers", update_and_sabotage)
    with dask.config.set({"dmlkit.resident-passes": resident}):
        km = KMeans(5, cache=True, **params).fit(path)
    assert calls["n"] == 12
    if resident:  # passes ran on the resident actors until the kill, then as tasks
        assert resident_calls[1] and not resident_calls[-1], (resident_calls, caplog.text)
    assert_array_equal(km.cluster_centers_, ref.cluster_centers_)
    assert km.inertia_ == ref.inertia_
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it...
    assert victim not in client.scheduler_info()["workers"]  # ...as a new worker


def test_trees_of_different_fan_in_never_share_results(client, store):
    """Keys of a tree depend on its shape, so the cluster never reuses another tree's result."""
    X, path = store
    km = KMeans(5, random_state=3).fit(path)
    scores = [km.set_params(split_every=s).score(path) for s in (2, 3, 2, 3, 8, 2)]
    assert_allclose(scores, scores[0], rtol=1e-9)


@pytest.fixture(scope="module")
def classification_store(tmp_path_factory):
    from dmlkit.datasets import make_classification

    return make_classification(tmp_path_factory.mktemp("c") / "c.zarr", 20_000, 5,
                               chunk_rows=2000, random_state=1)


def test_logistic_regression_on_cluster_equals_sync(client, classification_store):
    from dmlkit import LogisticRegression

    with _synchronous():
        ref = LogisticRegression(solver="lbfgs", cache=True).fit(classification_store)
    ours = LogisticRegression(solver="lbfgs", cache=True).fit(classification_store)
    assert_array_equal(ours.coef_, ref.coef_)
    assert ours.n_passes_ == ref.n_passes_


KILL_AT_NEWTON_ITERATION = 2


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "streamed"])
@pytest.mark.parametrize("resident", [True, False], ids=["resident", "tasks"])
def test_worker_killed_during_logistic_fit_changes_nothing(client, classification_store,
                                                           monkeypatch, resident_calls, resident,
                                                           cache):
    """Cached, the actors hold the blocks; streamed (an uncompressed store), they read
    them from the store's files each pass, next to the cached labels."""
    from dmlkit import LogisticRegression

    params = dict(solver="newton", cache=cache)
    with _synchronous():
        ref = LogisticRegression(**params).fit(classification_store)
    victim = sorted(client.scheduler_info()["workers"])[0]
    pid = client.run(os.getpid, workers=[victim])[victim]
    calls = {"n": 0, "kill_at": KILL_AT_NEWTON_ITERATION}
    real_cholesky = np.linalg.cholesky

    def factor_and_sabotage(*args, **kwargs):  # one call per Newton iteration, on the client
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            _kill(pid, resident, 0.01)
        return real_cholesky(*args, **kwargs)

    monkeypatch.setattr(np.linalg, "cholesky", factor_and_sabotage)
    with dask.config.set({"dmlkit.resident-passes": resident}):
        ours = LogisticRegression(**params).fit(classification_store)
    assert calls["n"] >= 3
    if resident:
        assert any(resident_calls) and not resident_calls[-1]
    assert_array_equal(ours.coef_, ref.coef_)
    client.wait_for_workers(2, timeout=60)
    assert victim not in client.scheduler_info()["workers"]


def test_a_one_worker_cluster_whose_worker_dies_mid_fit_finishes_on_its_replacement(store):
    """While no worker runs, the lost blocks' tasks wait in the scheduler's ``no-worker``
    state; the worker the nanny starts in place of the dead one computes them again
    (which restrictions to the dead worker would prevent for ever)."""
    X, path = store
    params = dict(init=X[:5].astype(np.float64), max_iter=8, tol=0, cache=True)
    with _synchronous():
        ref = KMeans(5, **params).fit(path)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", memory_limit="2GiB") as cluster, \
            Client(cluster) as one:
        (victim,) = one.scheduler_info()["workers"]
        pid = one.run(os.getpid)[victim]
        calls = {"n": 0}
        original = K.update_centers

        def update_and_sabotage(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                _kill(pid, True, 0)  # gone before the next pass starts
            return original(*args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(K, "update_centers", update_and_sabotage)
            km = KMeans(5, **params).fit(path)
        assert calls["n"] == 8
        assert victim not in one.scheduler_info()["workers"]
    assert_array_equal(km.cluster_centers_, ref.cluster_centers_)
    assert km.inertia_ == ref.inertia_


def _restricted(keys, dask_scheduler=None) -> list:
    return [k for k in keys if k in dask_scheduler.tasks
            and dask_scheduler.tasks[k].worker_restrictions is not None]


def test_placed_blocks_lose_their_worker_restrictions_once_computed(client, store):
    from distributed import futures_of, wait

    from dmlkit import data

    X, path = store
    Xd = data.as_matrix(path)
    with placement_as_asked(client):
        (Xp,) = data.persist_placed([Xd], client)
        keys = [f.key for f in futures_of(Xp)]
        wait(futures_of(Xp))
        deadline = time.monotonic() + 10  # lifted by a callback, just after
        while client.run_on_scheduler(_restricted, keys) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.run_on_scheduler(_restricted, keys) == []
        assert len(set(client.who_has(futures_of(Xp)).values())) == 2  # placed first
    assert_array_equal(Xp.compute(), X)


def test_streamed_kmeans_passes_read_the_store_on_resident_actors(client, tmp_path,
                                                                  resident_calls):
    from dmlkit.datasets import make_blobs

    path = make_blobs(tmp_path / "b.zarr", 20_000, 4, centers=4, chunk_rows=1500,
                      random_state=0)
    params = dict(random_state=0, cache=False, max_iter=6, tol=0)
    weights = np.random.default_rng(1).uniform(0.5, 2.0, 20_000)
    for w in (None, weights):  # weights: kept in the workers' memory, read next to them
        resident_calls.clear()
        ours = KMeans(4, **params).fit(path, sample_weight=w)
        assert resident_calls and all(resident_calls)  # every pass, the first one too
        with dask.config.set({"dmlkit.resident-passes": False}):
            tasks = KMeans(4, **params).fit(path, sample_weight=w)
        with _synchronous():
            ref = KMeans(4, **params).fit(path, sample_weight=w)
        for other in (tasks, ref):
            assert_array_equal(ours.cluster_centers_, other.cluster_centers_)
            assert ours.inertia_ == other.inertia_


@pytest.mark.parametrize("mode", ["local", "sync"])
def test_sgd_on_the_cluster_equals_the_sync_fit(client, store, mode):
    """The shards, their visiting order and the tree are the same: so are the bits."""
    from dmlkit import SGDClassifier

    X, path = store
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    kw = dict(mode=mode, shard_rows=5000, shards_per_step=2, batch_size=200, max_epochs=2,
              tol=None, random_state=0)
    with dask.config.set(scheduler="sync"):
        ref = SGDClassifier(**kw).fit(X, y)
    ours = SGDClassifier(**kw).fit(X, y)
    assert_array_equal(ours.coef_, ref.coef_)
    assert_array_equal(ours.intercept_, ref.intercept_)
    assert ours.t_ == ref.t_


async def _stealing(dask_scheduler, on: bool) -> bool:
    ext = dask_scheduler.extensions.get("stealing")
    if ext is None:
        return False
    await (ext.start() if on else ext.stop())
    return True


def _released(dask_scheduler) -> int:
    """Tasks no client wants any more, not forgotten yet (run on the scheduler)."""
    return sum(1 for ts in dask_scheduler.tasks.values() if not ts.who_wants)


@contextmanager
def placement_as_asked(client):
    """The placement dmlkit asks for, which these tests check, and nothing else.

    Earlier tests' results are let go first: a fitted estimator in a reference
    cycle keeps its cached blocks until the garbage collector runs, and a block
    the cluster still holds under the same key stays where it is. The
    scheduler's work stealing is paused: it may move a block still queued to an
    idle worker (the passes tolerate that: placement is a preference).
    """
    gc.collect()
    deadline = time.monotonic() + 10
    while client.run_on_scheduler(_released) and time.monotonic() < deadline:
        time.sleep(0.01)
    paused = client.run_on_scheduler(_stealing, on=False)
    try:
        yield
    finally:
        if paused:
            client.run_on_scheduler(_stealing, on=True)


def test_cached_blocks_are_spread_evenly_next_to_their_rows(client, store):
    from distributed import futures_of, wait

    from dmlkit import data

    X, path = store
    Xd = data.as_matrix(path)
    yd = da.arange(X.shape[0], chunks=Xd.chunks[0]).astype(np.float64)
    with placement_as_asked(client):
        Xc, (yc, none), cached = data.cache(Xd, [yd, None], True, path)
        # the store's 15 chunks kept (fewer than data.CACHE_MIN_BLOCKS)
        assert cached and none is None and Xc.numblocks[0] == 15
        wait(futures_of(Xc) + futures_of(yc))
    holders = client.who_has(futures_of(Xc) + futures_of(yc))
    x_at = [holders[(Xc.name, i, 0)] for i in range(Xc.numblocks[0])]
    y_at = [holders[(yc.name, i)] for i in range(yc.numblocks[0])]
    assert x_at == y_at  # y's block lives with X's
    counts = [[w for (w,) in x_at].count(a) for a in client.scheduler_info()["workers"]]
    assert sorted(counts) == [7, 8]  # evenly over the two workers
    assert_array_equal(Xc.compute(), X)
    assert_array_equal(yc.compute(), np.arange(X.shape[0]))


def test_a_y_computed_from_X_is_placed_with_one_definition_of_each_block(client):
    """y built from X's blocks (used twice: not fused away) is persisted before X, with
    X's blocks it needs; every key reaches the scheduler with one definition."""
    from distributed import futures_of, wait

    from dmlkit import data

    base = np.random.default_rng(0).standard_normal((4000, 5))
    X = da.from_array(base, chunks=500).map_blocks(np.negative, dtype=float)
    y = X[:, 0] + X[:, 1] * X[:, 2]
    with placement_as_asked(client):
        Xp, yp = data.persist_placed([X, y], client)
        wait(futures_of(Xp) + futures_of(yp))
    logs = client.get_scheduler_logs(n=10_000)
    assert not [m for _, m in logs if "run_spec" in m and X.name in m]
    holders = client.who_has(futures_of(Xp) + futures_of(yp))
    assert all(holders[(Xp.name, i, 0)] == holders[(yp.name, i)] for i in range(8))
    assert_array_equal(yp.compute(), -base[:, 0] + base[:, 1] * base[:, 2])
    assert_array_equal(Xp.compute(), -base)


def test_a_persisted_X_stays_put_so_does_a_persisted_y_and_a_computed_one_joins_it(client,
                                                                                     store):
    from distributed import futures_of, wait

    from dmlkit import data

    X, _ = store
    Xd = da.from_array(X, chunks=(X.shape[0], 4))  # one block: as even as it gets
    yd = da.arange(X.shape[0], chunks=X.shape[0]).astype(np.float64)
    workers = sorted(client.scheduler_info()["workers"])
    Xp = client.persist(Xd, workers=workers[:1])
    yp = client.persist(yd, workers=workers[1:])  # y on the other worker
    wait([Xp, yp])
    with placement_as_asked(client):
        Xc, (yc, zc), _ = data.cache(Xp, [yp, yp + 1.0], True, Xp, block_rows=X.shape[0])
        wait(futures_of(Xc) + futures_of(yc) + futures_of(zc))
    holders = client.who_has(futures_of(Xc) + futures_of(yc) + futures_of(zc))
    assert Xc.name == Xp.name and yc.name == yp.name  # the same blocks: no copies
    assert holders[(Xc.name, 0, 0)] == (workers[0],)
    assert workers[1] in holders[(yc.name, 0)]  # (also copied where y + 1 was computed)
    assert holders[(zc.name, 0)] == (workers[0],)  # computed next to X
    assert Xc._dmlkit_slots == [(workers[0], 0)]
    assert_array_equal(Xc.compute(), X)
    assert_array_equal(yc.compute(), np.arange(X.shape[0]))
    assert_array_equal(zc.compute(), np.arange(X.shape[0]) + 1.0)


def test_a_persisted_X_is_copied_feature_major_where_it_is_placed(client, store):
    from distributed import futures_of, wait

    from dmlkit import data

    X, _ = store
    Xd = da.from_array(X, chunks=(10_000, 4))
    workers = sorted(client.scheduler_info()["workers"])
    Xp = client.persist(Xd, workers=workers[:1])  # all three blocks on one worker
    wait(Xp)
    with placement_as_asked(client):
        Xc, (), _ = data.cache(Xp, [], True, Xp, block_rows=10_000, feature_major=True)
        wait(futures_of(Xc))
    assert Xc.name != Xp.name  # copies: the caller's blocks stay as they are
    holders = client.who_has(futures_of(Xc))
    assert [holders[(Xc.name, i, 0)] for i in range(3)] == [
        (workers[0],), (workers[0],), (workers[1],)]  # evened out as without the copy
    layouts = Xc.map_blocks(lambda b: np.full((1, 1), K.feature_major(b)), dtype=bool,
                            chunks=((1,) * 3, (1,))).compute()
    assert layouts.all()
    assert_array_equal(Xc.compute(), X)
    assert all(not K.feature_major(b) for b in client.gather(futures_of(Xp)))


def test_a_persisted_X_held_unevenly_is_evened_out_and_y_joins_it(client, store):
    from distributed import futures_of, wait

    from dmlkit import data

    X, _ = store
    Xd = da.from_array(X, chunks=(10_000, 4))
    yd = da.arange(X.shape[0], chunks=10_000).astype(np.float64)
    workers = sorted(client.scheduler_info()["workers"])
    # all three of X's blocks on one worker, y's on the other
    Xp = client.persist(Xd, workers=workers[:1])
    yp = client.persist(yd, workers=workers[1:])
    wait([Xp, yp])
    with placement_as_asked(client):  # blocks kept as they are
        Xc, (yc,), _ = data.cache(Xp, [yp], True, Xp, block_rows=10_000)
        wait(futures_of(Xc) + futures_of(yc))
    holders = client.who_has(futures_of(Xc) + futures_of(yc))
    x_at = [holders[(Xc.name, i, 0)] for i in range(3)]
    assert x_at == [(workers[0],), (workers[0],), (workers[1],)]  # the last block moved
    assert x_at == [holders[(yc.name, i)] for i in range(3)]  # y moved next to X
    assert Xc._dmlkit_slots == [(workers[0], 0), (workers[0], 0), (workers[1], 0)]
    assert_array_equal(Xc.compute(), X)
    assert_array_equal(yc.compute(), np.arange(X.shape[0]))


def _big_chunks_store(tmp_path):
    """Chunks of 8 MiB, kept by the cache as they are (not joined)."""
    rng = np.random.default_rng(5)
    rows = 8 * 2**20 // (16 * 4)
    X = (rng.standard_normal((4 * rows, 16)) + rng.integers(0, 3, (4 * rows, 1)) * 4)
    y = (X[:, 0] + rng.standard_normal(4 * rows) > 4).astype(np.float32)
    return X.astype(np.float32), write_store(tmp_path / "big.zarr", X.astype(np.float32), y,
                                             chunk_rows=rows)


def test_cached_and_streamed_fits_give_the_same_bits(client, tmp_path):
    # a cached pass maps one task per worker thread, which folds the subtrees it holds, and
    # the caller the rest of the same tree: the tree of a streamed pass
    from dmlkit import LogisticRegression

    _, path = _big_chunks_store(tmp_path)
    fits = [LogisticRegression(solver="newton", cache=cache, split_every=3).fit(path)
            for cache in (False, True)]
    assert_array_equal(fits[1].coef_, fits[0].coef_)
    assert_array_equal(fits[1].intercept_, fits[0].intercept_)


def test_kmeans_caches_feature_major_and_agrees_with_a_streamed_fit(client, tmp_path):
    """K-means keeps its cached blocks in Fortran order, where its Lloyd kernel runs
    faster; its products round otherwise than a streamed fit's, to float32 rounding."""
    from dmlkit import data

    X, path = _big_chunks_store(tmp_path)
    Xc, _, cached = data.cache(data.as_matrix(path), [], True, path, feature_major=True)
    layouts = Xc.map_blocks(lambda b: np.full((1, 1), K.feature_major(b)), dtype=bool,
                            chunks=((1,) * Xc.numblocks[0], (1,))).compute()
    assert cached and layouts.all()
    assert_array_equal(Xc.compute(), X)
    del Xc
    init = X[:3].astype(np.float64)
    streamed = KMeans(3, init=init, max_iter=5, tol=0, cache=False, split_every=3).fit(path)
    cached = KMeans(3, init=init, max_iter=5, tol=0, cache=True, split_every=3).fit(path)
    assert_allclose(cached.cluster_centers_, streamed.cluster_centers_, rtol=1e-6, atol=1e-6)
    assert cached.inertia_ == pytest.approx(streamed.inertia_, rel=1e-6)
    assert_array_equal(cached.labels_.compute(), streamed.labels_.compute())


def _served(monkeypatch, method: str) -> list:
    """Records, per pass offered to ``Resident.<method>``, whether it served it."""
    from dmlkit import _resident

    served = []
    original = getattr(_resident.Resident, method)

    def spy(self, jobs):
        out = original(self, jobs)
        served.append(out is not None)
        return out

    monkeypatch.setattr(_resident.Resident, method, spy)
    return served


@pytest.fixture
def resident_calls(monkeypatch):
    """Records, per pass offered to resident actors, whether they served it."""
    return _served(monkeypatch, "run")


def _actors_alive(client) -> int:
    return sum(client.run(lambda dask_worker: len(dask_worker.state.actors)).values())


def test_cached_passes_run_on_resident_actors_with_the_same_bits(client, store, resident_calls):
    X, path = store
    params = dict(init=X[:5].astype(np.float64), max_iter=8, tol=0, cache=True)
    ours = KMeans(5, **params).fit(path)
    # the actors start next to the blocks as the cache loads them, and serve every pass,
    # the first one (which waits for the blocks) too
    assert resident_calls == [True] * ours.n_passes_
    with dask.config.set({"dmlkit.resident-passes": False}):
        tasks = KMeans(5, **params).fit(path)
    assert resident_calls == [True] * ours.n_passes_  # none offered when turned off
    with _synchronous():
        ref = KMeans(5, **params).fit(path)
    for other in (tasks, ref):
        assert_array_equal(ours.cluster_centers_, other.cluster_centers_)
        assert ours.inertia_ == other.inertia_
    gc.collect()
    deadline = time.monotonic() + 10
    while _actors_alive(client) and time.monotonic() < deadline:  # released with the fit
        time.sleep(0.05)
    assert _actors_alive(client) == 0


@pytest.fixture
def line_calls(monkeypatch):
    """Records, per pass offered to the actors' lines, whether they served it."""
    return _served(monkeypatch, "_run_lines")


def _lines_alive(client) -> int:
    def count():
        return sum(t.name == "dmlkit-resident-line" for t in threading.enumerate())

    return sum(client.run(count).values())


def test_resident_passes_go_over_lines_with_the_same_bits_and_the_lines_end_with_the_fit(
        client, store, resident_calls, line_calls):
    X, path = store
    params = dict(init=X[:5].astype(np.float64), max_iter=8, tol=0, cache=True)
    ours = KMeans(5, **params).fit(path)
    # the test cluster listens on 127.0.0.1: every pass over the actors' own lines
    assert line_calls == [True] * ours.n_passes_
    assert resident_calls == [True] * ours.n_passes_
    with dask.config.set({"dmlkit.resident-line": False}):
        actors = KMeans(5, **params).fit(path)
    assert line_calls == [True] * ours.n_passes_  # none offered when turned off
    assert resident_calls == [True] * (ours.n_passes_ + actors.n_passes_)  # by the actors
    assert_array_equal(ours.cluster_centers_, actors.cluster_centers_)
    assert ours.inertia_ == actors.inertia_
    gc.collect()
    deadline = time.monotonic() + 10
    while (_lines_alive(client) or _actors_alive(client)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lines_alive(client) == 0  # the client closed them with the fit...
    assert _actors_alive(client) == 0  # ...and the lines' threads kept no actor alive


class _Echo:
    """Stands for a BlockHolder: answers a pass with its jobs, or raises on "boom"."""

    def run(self, jobs):
        if jobs == ["boom"]:
            raise ValueError("boom")
        return jobs


def _connect(line, token):
    from dmlkit import _resident

    sock = socket.create_connection(line.address, timeout=5)
    _resident._send(sock, token)
    return sock


def test_a_line_serves_its_client_and_reports_a_kernel_error():
    from dmlkit import _resident

    holder = _Echo()
    line = _resident._Line(holder)
    sock = _connect(line, line.token)
    assert _resident._recv(sock) == b"ok"
    _resident._send(sock, pickle.dumps([("a", 1)]))
    assert pickle.loads(_resident._recv(sock)) == ("ok", [("a", 1)])
    _resident._send(sock, pickle.dumps(["boom"]))
    status, why = pickle.loads(_resident._recv(sock))
    assert status == "error" and "boom" in why
    sock.close()


def test_a_line_refuses_a_wrong_token_and_keeps_no_holder_alive():
    import weakref

    from dmlkit import _resident

    holder = _Echo()
    line = _resident._Line(holder)
    sock = _connect(line, b"x" * 32)
    with pytest.raises((EOFError, OSError)):  # closed without a word
        _resident._recv(sock)
    sock.close()
    # a line whose holder has gone answers nothing and ends
    other = _resident._Line(holder)
    ref = weakref.ref(holder)
    sock = _connect(other, other.token)
    assert _resident._recv(sock) == b"ok"
    del holder
    gc.collect()
    assert ref() is None  # the line's thread holds it weakly
    _resident._send(sock, pickle.dumps([("a", 1)]))
    with pytest.raises((EOFError, OSError)):
        _resident._recv(sock)
    sock.close()


@pytest.mark.parametrize("address, expected", [
    ("tcp://127.0.0.1:8786", True), ("tcp://127.0.0.5:1", True), ("tcp://localhost:1", True),
    ("tcp://[::1]:8786", True), ("tcp://10.0.0.3:8786", False), ("tls://127.0.0.1:8786", False),
    ("inproc://127.0.0.1/1/1", False), ("tcp://node12:8786", False)])
def test_lines_open_only_to_plain_tcp_workers_on_loopback(address, expected):
    from dmlkit import _resident

    assert _resident.loopback(address) is expected


def test_a_kernel_error_on_resident_actors_is_raised_by_the_tasks(client, store, resident_calls):
    from dmlkit import _graph, data

    X, path = store
    Xc, _, _ = data.cache(data.as_matrix(path), [], True, path)
    blocks = _graph.RowBlocks(Xc)
    centers = X[:3].astype(np.float64)
    (first,) = _graph.compute(blocks.reduce(K.lloyd_partial, K.combine_lloyd,
                                            {"centers": centers}))
    (second,) = _graph.compute(blocks.reduce(K.lloyd_partial, K.combine_lloyd,
                                             {"centers": centers}))
    assert resident_calls[-1]
    assert_array_equal(second.sums, first.sums)
    with pytest.raises(ValueError):  # centres with 3 features for 4-feature rows
        _graph.compute(blocks.reduce(K.lloyd_partial, K.combine_lloyd,
                                     {"centers": centers[:, :3]}))
    assert not resident_calls[-1]
    (again,) = _graph.compute(blocks.reduce(K.lloyd_partial, K.combine_lloyd,
                                            {"centers": centers}))
    assert_array_equal(again.sums, first.sums)  # by tasks from then on


def test_resident_passes_with_several_threads_per_worker(store, resident_calls):
    """One actor per worker maps its threads' groups in parallel: still the same bits."""
    X, path = store
    params = dict(init=X[:5].astype(np.float64), max_iter=6, tol=0, cache=True, split_every=3)
    with _synchronous():
        ref = KMeans(5, **params).fit(path)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, host="127.0.0.1",
                      dashboard_address=":0", memory_limit="2GiB") as cluster, \
            Client(cluster):
        ours = KMeans(5, **params).fit(path)
    assert sum(resident_calls) >= ours.n_passes_ - 2
    assert_array_equal(ours.cluster_centers_, ref.cluster_centers_)
    assert ours.inertia_ == ref.inertia_


@pytest.mark.parametrize("learning_rate", ["optimal", "invscaling"])
def test_sgd_on_held_blocks_finds_classes_on_the_actors(client, store, resident_calls,
                                                         learning_rate):
    """X and y persisted by the caller in shards: the classes (and eta0's sample) come from
    one resident pass before the first round; same bits as the synchronous fit."""
    from dmlkit import SGDClassifier

    X, _ = store
    labels = np.array(["left", "right", "up"])[(X[:, 0] > 0).astype(int) + (X[:, 1] > 1)]
    Xd, yd = client.persist([da.from_array(X, chunks=(5000, -1)), da.from_array(labels, 5000)])
    from distributed import wait

    wait([Xd, yd])  # in memory before the fit starts (however slow the machine)
    kw = dict(shard_rows=5000, batch_size=200, max_epochs=1, tol=None, random_state=0,
              learning_rate=learning_rate)
    ours = SGDClassifier(**kw).fit(Xd, yd)
    # the classes' pass and the 4 rounds of the epoch, all served by the actors
    assert resident_calls == [True] * 5
    with dask.config.set(scheduler="sync"):
        ref = SGDClassifier(**kw).fit(X, labels)
    assert_array_equal(ours.classes_, ["left", "right", "up"])
    assert_array_equal(ours.coef_, ref.coef_)
    assert_array_equal(ours.intercept_, ref.intercept_)


def test_joined_cached_blocks_give_the_same_bits_on_any_cluster(client, tmp_path):
    """A store of 40 small chunks: its cached copy joins them into blocks chosen from the
    data alone, so a Newton logistic fit and a K-means fit give the same bits on the two
    workers of this module, on one worker and on the synchronous scheduler."""
    from dmlkit import LogisticRegression, data
    from dmlkit.datasets import make_classification

    path = make_classification(tmp_path / "c.zarr", 20_000, 6, chunk_rows=500, random_state=2)
    assert data.cache_block_rows(data.as_matrix(path)) == 1500  # 14 blocks of 3 chunks

    def fits():
        return (LogisticRegression(solver="newton", cache=True).fit(path),
                KMeans(4, random_state=0, cache=True).fit(path))

    with _synchronous():
        ref = fits()
    two = fits()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=":0", memory_limit="2GiB") as cluster, Client(cluster):
        one = fits()
    for lr, km in (two, one):
        assert_array_equal(lr.coef_, ref[0].coef_)
        assert_array_equal(lr.intercept_, ref[0].intercept_)
        assert_array_equal(km.cluster_centers_, ref[1].cluster_centers_)
        assert km.inertia_ == ref[1].inertia_
