"""Tests of dmlkit.datasets: store layout, determinism, ground truth, errors, CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
import zarr
from numpy.testing import assert_allclose, assert_array_equal

from dmlkit import datasets
from dmlkit.datasets import (
    SIZES,
    dataset_path,
    ensure_dataset,
    make_blobs,
    make_classification,
    make_regression,
)

MAKERS = [make_blobs, make_classification, make_regression]
TRUTH = {  # array name: dimension names
    "make_blobs": {"centers": ("cluster", "feature")},
    "make_classification": {"coef": ("class", "feature"), "intercept": ("class",)},
    "make_regression": {"coef": ("feature",), "intercept": ()},
}


def _files(path) -> dict[str, bytes]:
    """Every file of a store, by relative path."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            full = os.path.join(root, f)
            out[os.path.relpath(full, path)] = open(full, "rb").read()
    return out


def _load(path):
    g = zarr.open_group(path, mode="r")
    return g, g["X"][:], g["y"][:]


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_layout(make, tmp_path):
    path = make(tmp_path / "d.zarr", 1000, 5, chunk_rows=300, random_state=1)
    assert path == str(tmp_path / "d.zarr")
    g, X, y = _load(path)
    assert g.metadata.zarr_format == 3
    assert g["X"].shape == (1000, 5) and g["X"].chunks == (300, 5)
    assert g["y"].shape == (1000,) and g["y"].chunks == (300,)
    assert g["X"].metadata.dimension_names == ("sample", "feature")
    assert g["y"].metadata.dimension_names == ("sample",)
    assert X.dtype == np.float32
    assert y.dtype == (np.float32 if make is make_regression else np.int64)
    assert np.isfinite(X).all() and X.std() > 0.5
    for name, dims in TRUTH[make.__name__].items():
        assert (g[name].metadata.dimension_names or ()) == dims  # 0-d: None
    assert sorted(g.array_keys()) == sorted(["X", "y", *TRUTH[make.__name__]])
    attrs = g.attrs.asdict()
    assert attrs["generator"] == make.__name__.removeprefix("make_")
    assert (attrs["n_samples"], attrs["n_features"], attrs["chunk_rows"]) == (1000, 5, 300)
    assert attrs["params"]["random_state"] == 1 and attrs["params"]["dtype"] == "float32"
    # every chunk is a file, including the ragged last one
    assert sorted(os.listdir(os.path.join(path, "X", "c"))) == ["0", "1", "2", "3"]


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_opens_with_xarray(make, tmp_path):
    import dask.array as da
    import xarray as xr

    path = make(tmp_path / "d.zarr", 1000, 5, chunk_rows=300, random_state=1)
    ds = xr.open_zarr(path, consolidated=False, chunks={})
    assert ds["X"].dims == ("sample", "feature") and ds["y"].dims == ("sample",)
    assert ds.sizes["sample"] == 1000 and ds.sizes["feature"] == 5
    assert isinstance(ds["X"].data, da.Array) and isinstance(ds["y"].data, da.Array)
    assert ds["X"].data.chunks == ((300, 300, 300, 100), (5,))
    assert ds["y"].dtype == _load(path)[2].dtype  # no fill-value masking of labels 0
    assert_array_equal(ds["y"].values, _load(path)[2])
    assert ds.attrs["generator"] == make.__name__.removeprefix("make_")


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_same_arguments_same_bytes(make, tmp_path):
    a = make(tmp_path / "a.zarr", 1000, 5, chunk_rows=300, random_state=7)
    b = make(tmp_path / "b.zarr", 1000, 5, chunk_rows=300, random_state=7)
    c = make(tmp_path / "c.zarr", 1000, 5, chunk_rows=300, random_state=8)
    fa, fb = _files(a), _files(b)
    assert "X/c/3/0" in fa and "y/c/3" in fa and fa == fb
    assert_array_equal(_load(a)[1], _load(b)[1])
    assert not np.array_equal(_load(a)[1], _load(c)[1])


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_chunk_rows(make, tmp_path):
    """Other chunkings are valid stores with the same ground truth (the rows differ)."""
    a = make(tmp_path / "a.zarr", 1000, 5, chunk_rows=1000, random_state=3)
    b = make(tmp_path / "b.zarr", 1000, 5, chunk_rows=7, random_state=3)
    c = make(tmp_path / "c.zarr", 1000, 5, chunk_rows=5000, random_state=3)
    ga, gb, gc = (zarr.open_group(p, mode="r") for p in (a, b, c))
    assert gb["X"].chunks == (7, 5) and gb["y"].chunks == (7,)
    assert gc["X"].chunks == (1000, 5) and gc.attrs["chunk_rows"] == 1000  # clipped
    assert gc.attrs["params"]["chunk_rows"] == 5000  # as given
    assert_array_equal(ga["X"][:], gc["X"][:])
    assert np.isfinite(gb["X"][:]).all()
    for name in TRUTH[make.__name__]:
        assert_array_equal(ga[name][...], gb[name][...])


def test_chunk_seeds_are_spawned(tmp_path):
    """Chunk i is drawn from SeedSequence(random_state).spawn(n_chunks)[i] alone."""
    path = make_regression(tmp_path / "r.zarr", 100, 3, chunk_rows=40, random_state=5)
    X = zarr.open_group(path, mode="r")["X"][:]
    for i, child in enumerate(np.random.SeedSequence(5).spawn(3)):
        rows = X[40 * i:40 * (i + 1)]
        expected = np.random.default_rng(child).standard_normal(rows.shape, dtype=np.float32)
        assert_array_equal(rows, expected)


def test_random_state_none_is_recorded(tmp_path):
    a = make_blobs(tmp_path / "a.zarr", 500, 3, chunk_rows=100)
    seed = zarr.open_group(a, mode="r").attrs["params"]["random_state"]
    assert isinstance(seed, int) and 0 <= seed < 2**63
    b = make_blobs(tmp_path / "b.zarr", 500, 3, chunk_rows=100, random_state=seed)
    assert _files(a) == _files(b)


def test_blobs_ground_truth(tmp_path):
    path = make_blobs(tmp_path / "b.zarr", 20_000, 6, centers=4, cluster_std=0.5,
                      chunk_rows=3000, random_state=0)
    g, X, y = _load(path)
    centers = g["centers"][:]
    assert centers.shape == (4, 6)
    assert (centers >= -10).all() and (centers <= 10).all()
    assert np.bincount(y).min() > 4000  # every centre used, about evenly
    for k in range(4):
        assert_allclose(X[y == k].mean(axis=0), centers[k], atol=0.05)
        assert_allclose(X[y == k].std(axis=0), 0.5, rtol=0.1)
    given = [[0.0, 0.0], [5.0, 5.0]]
    path = make_blobs(tmp_path / "c.zarr", 2000, 2, centers=given, cluster_std=0.0,
                      chunk_rows=500, random_state=0)
    g, X, y = _load(path)
    assert_array_equal(X, np.asarray(given, np.float32)[y])


def test_classification_recovers_coef(tmp_path):
    from sklearn.linear_model import LogisticRegression

    path = make_classification(tmp_path / "c.zarr", 5000, 10, chunk_rows=1000,
                               random_state=0)
    g, X, y = _load(path)
    coef, intercept = g["coef"][:], g["intercept"][:]
    assert coef.shape == (1, 10) and intercept.shape == (1,)
    assert_allclose(np.linalg.norm(coef), 4.0, rtol=1e-6)  # 4 * class_sep
    assert set(np.unique(y)) == {0, 1}
    model = LogisticRegression(C=1e6, max_iter=1000).fit(X, y)
    assert np.corrcoef(model.coef_[0], coef[0])[0, 1] > 0.9
    big = np.abs(coef[0]) > 0.5
    assert_array_equal(np.sign(model.coef_[0][big]), np.sign(coef[0][big]))
    assert_allclose(model.intercept_, intercept, atol=0.3)


def test_classification_multiclass_and_flip_y(tmp_path):
    from sklearn.linear_model import LogisticRegression

    kw = dict(n_classes=3, n_informative=4, chunk_rows=1500, random_state=2)
    a = make_classification(tmp_path / "a.zarr", 6000, 8, **kw)
    b = make_classification(tmp_path / "b.zarr", 6000, 8, flip_y=0.3, **kw)
    g, X, y = _load(a)
    coef = g["coef"][:]
    assert coef.shape == (3, 8) and (np.abs(coef).sum(axis=0) > 0).sum() == 4
    assert_allclose(coef.sum(axis=0), 0, atol=1e-6)  # softmax rows sum to zero
    assert set(np.unique(y)) == {0, 1, 2}
    model = LogisticRegression(C=1e6, max_iter=1000).fit(X, y)
    assert np.corrcoef(model.coef_.ravel(), coef.ravel())[0, 1] > 0.9
    # flip_y changes only labels: a uniformly drawn class differs 2/3 of the time
    _, Xb, yb = _load(b)
    assert_array_equal(X, Xb)
    assert abs((y != yb).mean() - 0.3 * 2 / 3) < 0.03


def test_regression_recovers_coef(tmp_path):
    path = make_regression(tmp_path / "r.zarr", 5000, 10, n_informative=4, noise=0.5,
                           bias=3.0, chunk_rows=999, random_state=0)
    g, X, y = _load(path)
    coef, intercept = g["coef"][:], g["intercept"][...]
    assert coef.shape == (10,) and intercept.shape == () and float(intercept) == 3.0
    assert np.count_nonzero(coef) == 4
    A = np.column_stack([X, np.ones(len(X))]).astype(np.float64)
    sol, *_ = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)
    assert_allclose(sol[:-1], coef, atol=0.03)
    assert_allclose(sol[-1], 3.0, atol=0.03)
    assert_allclose(np.std(y - A @ sol), 0.5, rtol=0.05)


@pytest.mark.parametrize("make", MAKERS, ids=lambda f: f.__name__)
def test_float64(make, tmp_path):
    path = make(tmp_path / "d.zarr", 500, 4, chunk_rows=200, dtype="float64", random_state=0)
    g, X, y = _load(path)
    assert X.dtype == np.float64
    assert y.dtype == (np.float64 if make is make_regression else np.int64)
    for name in TRUTH[make.__name__]:
        assert g[name].dtype == np.float64
    assert g.attrs["params"]["dtype"] == "float64"


def test_memory_is_bounded(tmp_path):
    """Writing 40 chunks holds only a few of them in memory at once."""
    rows, d = 5000, 8
    chunk_bytes = rows * (d * 4 + 8)
    tracemalloc.start()
    try:
        make_classification(tmp_path / "c.zarr", 40 * rows, d, chunk_rows=rows,
                            random_state=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * chunk_bytes, peak / chunk_bytes


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(n_samples=0), ValueError, r"n_samples=0 should be >= 1"),
    (dict(n_samples=2.5), TypeError, r"n_samples=2.5 should be an int"),
    (dict(n_features=0), ValueError, r"n_features=0 should be >= 1"),
    (dict(chunk_rows=0), ValueError, r"chunk_rows=0 should be >= 1"),
    (dict(dtype="int8"), ValueError, r"dtype='int8' should be 'float32' or 'float64'"),
    (dict(dtype="nonsense"), ValueError, r"dtype='nonsense' should be"),
    (dict(random_state=-1), ValueError, r"random_state=-1 should be None or an int >= 0"),
    (dict(random_state=np.random.default_rng()), ValueError, r"random_state=Generator"),
    (dict(centers=0), ValueError, r"centers=0 should be >= 1"),
    (dict(centers=[[1.0, 2.0]]), ValueError, r"shape \(n_centers, n_features=3\)"),
    (dict(cluster_std=-1), ValueError, r"cluster_std=-1.0 should be >= 0"),
    (dict(center_box=(1, 1)), ValueError, r"center_box=\(1, 1\) should be finite"),
])
def test_bad_blobs_arguments(kwargs, exc, match, tmp_path):
    args = dict(n_samples=10, n_features=3) | kwargs
    with pytest.raises(exc, match=match):
        make_blobs(tmp_path / "d.zarr", **args)
    assert not os.path.exists(tmp_path / "d.zarr")


@pytest.mark.parametrize("make, kwargs, match", [
    (make_classification, dict(n_classes=1), r"n_classes=1 should be >= 2"),
    (make_classification, dict(n_informative=4), r"n_informative=4 should be <= 3"),
    (make_classification, dict(flip_y=1.5), r"flip_y=1.5 should be <= 1.0"),
    (make_classification, dict(class_sep=float("nan")), r"class_sep=nan should be finite"),
    (make_regression, dict(noise=-0.1), r"noise=-0.1 should be >= 0"),
    (make_regression, dict(n_informative=0), r"n_informative=0 should be >= 1"),
])
def test_bad_model_arguments(make, kwargs, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        make(tmp_path / "d.zarr", 10, 3, **kwargs)


def test_existing_path(tmp_path):
    path = tmp_path / "d.zarr"
    make_blobs(path, 100, 2, random_state=0)
    with pytest.raises(FileExistsError, match=r"d\.zarr.*overwrite=True"):
        make_blobs(path, 100, 2, random_state=1)
    make_regression(path, 50, 3, random_state=1, overwrite=True)
    assert zarr.open_group(path, mode="r")["X"].shape == (50, 3)
    assert [p for p in os.listdir(tmp_path) if p != "d.zarr"] == []  # no leftovers
    # an empty directory is fine; a directory that is not a store is never deleted
    (tmp_path / "empty").mkdir()
    make_blobs(tmp_path / "empty", 10, 2, random_state=0)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"other.*not a Zarr v3 store"):
        make_blobs(other, 10, 2, random_state=0, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep"


def test_sizes_and_dataset_path(tmp_path):
    assert list(SIZES) == ["tiny", "small", "medium", "large"]
    assert [s.n_samples for s in SIZES.values()] == [20_000, 200_000, 2_000_000, 200_000_000]
    assert all(s.n_features == 32 for s in SIZES.values())
    assert SIZES["tiny"].n_samples % SIZES["tiny"].chunk_rows == 0
    assert dataset_path("data", "blobs", "tiny") == os.path.join("data", "blobs-tiny.zarr")
    with pytest.raises(ValueError, match=r"size='huge' should be one of"):
        dataset_path("data", "blobs", "huge")
    with pytest.raises(ValueError, match=r"name='moons' should be one of"):
        ensure_dataset("moons", "tiny", out=tmp_path)


def test_ensure_dataset(tmp_path):
    path = ensure_dataset("classification", "tiny", out=tmp_path)
    assert path == dataset_path(tmp_path, "classification", "tiny")
    g = zarr.open_group(path, mode="r")
    assert g["X"].shape == (20_000, 32) and g["X"].chunks == (2_000, 32)
    assert g["coef"].shape == (1, 32) and g.attrs["params"]["random_state"] == 0
    before = os.stat(os.path.join(path, "X", "c", "0")).st_mtime_ns
    assert ensure_dataset("classification", "tiny", out=tmp_path) == path  # reused
    assert os.stat(os.path.join(path, "X", "c", "0")).st_mtime_ns == before
    # a store made with other parameters is regenerated, with a warning
    make_classification(path, 20_000, 32, chunk_rows=5_000, random_state=0, overwrite=True)
    with pytest.warns(UserWarning, match="other parameters"):
        ensure_dataset("classification", "tiny", out=tmp_path)
    assert zarr.open_group(path, mode="r")["X"].chunks == (2_000, 32)


def test_cli(tmp_path):
    cmd = [sys.executable, "-m", "dmlkit.datasets", "all", "--size", "tiny",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 3
    for name, line in zip(datasets.DATASETS, lines):
        path = dataset_path(tmp_path, name, "tiny")
        assert line.startswith(path) and "(20000, 32)" in line and " s" in line
        with open(os.path.join(path, "zarr.json")) as f:
            assert json.load(f)["attributes"]["params"]["random_state"] == 0
    # the CLI and ensure_dataset build the same bytes
    other = ensure_dataset("blobs", "tiny", out=tmp_path / "again")
    assert _files(other) == _files(dataset_path(tmp_path, "blobs", "tiny"))


def test_cli_main_in_process(tmp_path, capsys):
    assert datasets.main(["regression", "--size", "tiny", "--out", str(tmp_path),
                          "--chunk-rows", "5000", "--random-state", "3"]) == 0
    assert "regression-tiny.zarr" in capsys.readouterr().out
    assert datasets.main(["regression", "--size", "tiny", "--out", str(tmp_path),
                          "--random-state", "3"]) == 2  # exists, other params
    assert "overwrite" in capsys.readouterr().err
    assert datasets.main(["blobs", "--size", "tiny", "--out", str(tmp_path),
                          "--chunk-rows", "0"]) == 2
    assert "chunk_rows=0 should be >= 1" in capsys.readouterr().err
