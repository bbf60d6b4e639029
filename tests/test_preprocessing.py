"""StandardScaler against scikit-learn."""
from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.preprocessing import StandardScaler as SKScaler

from dmlkit import StandardScaler


@pytest.fixture
def X():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3000, 4)) * [1, 10, 1e-3, 0] + [5, -100, 1e4, 7]


@pytest.mark.parametrize("offset", [1e6, 1e8])
def test_float32_far_from_the_origin_keeps_its_digits(offset):
    """Moments in float64 relative to a row of the block: float32 data at 1e8 with a
    spread of 0.08 (and a constant column) give the float64 truth, as scikit-learn does."""
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((20_000, 3)) * [1.0, 8.0, 0.0] + offset).astype(np.float32)
    ours = StandardScaler().fit(da.from_array(X, chunks=(3001, 3)))
    X64 = X.astype(np.float64)
    assert_allclose(ours.mean_, X64.mean(axis=0), rtol=1e-13)
    assert_allclose(ours.var_, X64.var(axis=0), rtol=1e-9)
    assert ours.var_[2] == 0.0 and ours.scale_[2] == 1.0
    assert_allclose(np.asarray(ours.transform(X)), SKScaler().fit(X).transform(X),
                    rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("chunks", [3000, 701])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_sklearn(X, chunks, weighted):
    w = np.random.default_rng(1).uniform(0, 2, 3000) if weighted else None
    ours = StandardScaler(split_every=3).fit(da.from_array(X, chunks=(chunks, 4)), sample_weight=w)
    ref = SKScaler().fit(X, sample_weight=w)
    assert_allclose(ours.mean_, ref.mean_, rtol=1e-12)
    assert_allclose(ours.var_, ref.var_, rtol=1e-9, atol=1e-20)
    assert_allclose(ours.scale_, ref.scale_, rtol=1e-9)
    Z = ours.transform(da.from_array(X, chunks=(chunks, 4)))
    assert isinstance(Z, da.Array)
    assert_allclose(Z.compute(), ref.transform(X), rtol=1e-6, atol=1e-4)  # column 2: 1e4 +- 1e-3
    assert_allclose(ours.inverse_transform(ref.transform(X)), X, rtol=1e-10)


def test_float32_stays_float32_and_options(X):
    X32 = X.astype(np.float32)
    out = StandardScaler().fit_transform(X32)
    assert out.dtype == np.float32
    s = StandardScaler(with_mean=False).fit(X)
    assert s.mean_ is None
    assert_allclose(s.transform(X), X / s.scale_)


def test_errors(X):
    with pytest.raises(ValueError, match="X has 3 features; StandardScaler was fitted"):
        StandardScaler().fit(X).transform(X[:, :3])
    X = X.copy()
    X[5, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in chunk 0"):
        StandardScaler().fit(X)
