from __future__ import annotations

import dask
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _sync_scheduler(request):
    """Most tests run on the synchronous scheduler; cluster tests opt out."""
    if request.node.get_closest_marker("cluster"):
        yield
        return
    with dask.config.set(scheduler="sync"):
        yield


@pytest.fixture
def no_scheduler_variables(monkeypatch):
    """The machine running the tests may point at a real cluster: start from no variables."""
    from _processes import SCHEDULER_VARIABLES

    for name in SCHEDULER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def blobs():
    """20,000 x 5 float32 blobs around 6 centres, and the centres."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(-10, 10, size=(6, 5))
    labels = rng.integers(0, 6, size=20_000)
    X = (centers[labels] + rng.standard_normal((20_000, 5))).astype(np.float32)
    return X, centers


def write_store(path, X, y=None, chunk_rows=1000):
    """A minimal Zarr v3 store in dmlkit's layout, written with zarr directly."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    a = g.create_array("X", shape=X.shape, chunks=(chunk_rows, X.shape[1]), dtype=X.dtype,
                       dimension_names=("sample", "feature"))
    a[...] = X
    if y is not None:
        b = g.create_array("y", shape=y.shape, chunks=(chunk_rows,), dtype=y.dtype,
                           dimension_names=("sample",))
        b[...] = y
    return str(path)
