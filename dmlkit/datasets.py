"""Out-of-core synthetic datasets, written to Zarr v3 chunk by chunk.

Each generator draws its ground truth (cluster centres, coefficients) from
``numpy.random.default_rng(numpy.random.SeedSequence(random_state))`` and the
rows of chunk ``i`` from ``numpy.random.SeedSequence(random_state).spawn(n_chunks)[i]``,
so a chunk can be generated without the others, and the same arguments give the
same bytes. At most a few chunks are in memory at any time, so stores larger
than memory can be written.

Store layout (read by :func:`dmlkit.data.open_zarr`)::

    <path>/                  Zarr v3 group, attributes:
                               generator, params, n_samples, n_features, chunk_rows
      X          (sample, feature)   float32|float64, chunks (chunk_rows, n_features)
      y          (sample,)           int64 labels | X's dtype for regression
      centers    (cluster, feature)  blobs: the cluster centres
      coef       (class, feature)    classification: true coefficients
      intercept  (class,)            classification: true intercepts
      coef       (feature,)          regression: true coefficients
      intercept  ()                  regression: the bias (0-d array)

Command line::

    python -m dmlkit.datasets blobs|classification|regression|all \\
        --size tiny|small|medium|large --out data [--chunk-rows N] \\
        [--random-state S] [--overwrite]
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import numbers
import os
import shutil
import sys
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, NamedTuple

import numpy as np

__all__ = [
    "DATASETS",
    "SIZES",
    "DatasetSize",
    "dataset_path",
    "ensure_dataset",
    "make_blobs",
    "make_classification",
    "make_regression",
]


class DatasetSize(NamedTuple):
    """Shape and chunking of one named course size."""

    n_samples: int
    n_features: int
    chunk_rows: int


#: The course's sizes, all with 32 float32 features. ``large`` (25.6 GB) is bigger
#: than a laptop's memory; it is documented but never built in CI.
SIZES: dict[str, DatasetSize] = {
    "tiny": DatasetSize(20_000, 32, 2_000),  # 2.56 MB, 10 chunks
    "small": DatasetSize(200_000, 32, 20_000),  # 25.6 MB, 10 chunks
    "medium": DatasetSize(2_000_000, 32, 100_000),  # 256 MB, 20 chunks
    "large": DatasetSize(200_000_000, 32, 500_000),  # 25.6 GB, 400 chunks
}

#: Names accepted by :func:`ensure_dataset` and the command line.
DATASETS = ("blobs", "classification", "regression")

# Keyword arguments that make the course's datasets differ from the defaults.
_COURSE_KWARGS: dict[str, dict[str, Any]] = {
    "blobs": {"centers": 8},
    "classification": {"n_classes": 2},
    "regression": {},
}

_DTYPES = ("float32", "float64")
_BLOCK = 8192  # rows per inner block: keeps temporaries in cache
_WORKERS = 2  # threads generating ahead of the writer (the main thread)

# --------------------------------------------------------------------------- checks


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r} should be an int")
    value = int(value)
    if value < low:
        raise ValueError(f"{name}={value} should be >= {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} should be <= {high}")
    return value


def _check_float(name: str, value: Any, low: float | None = None,
                 high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} should be a real number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} should be finite")
    if low is not None and value < low:
        raise ValueError(f"{name}={value} should be >= {low}")
    if high is not None and value > high:
        raise ValueError(f"{name}={value} should be <= {high}")
    return value


def _check_dtype(dtype: Any) -> str:
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} should be 'float32' or 'float64'")
    return name


def _check_seed(random_state: Any) -> int:
    """Return the seed to use; ``None`` draws fresh OS entropy (a 63-bit seed)."""
    if random_state is None:
        state = np.random.SeedSequence().generate_state(2, np.uint32)
        return (int(state[0]) << 31) | (int(state[1]) >> 1)
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral) \
            or random_state < 0:
        raise ValueError(f"random_state={random_state!r} should be None or an int >= 0")
    return int(random_state)


def _common(n_samples: Any, n_features: Any, chunk_rows: Any, dtype: Any,
            random_state: Any) -> dict[str, Any]:
    return {
        "n_samples": _check_int("n_samples", n_samples, 1),
        "n_features": _check_int("n_features", n_features, 1),
        "chunk_rows": _check_int("chunk_rows", chunk_rows, 1),
        "dtype": _check_dtype(dtype),
        "random_state": _check_seed(random_state),
    }


def _blobs_params(n_samples, n_features, *, centers, cluster_std, center_box, chunk_rows,
                  dtype, random_state) -> dict[str, Any]:
    p = _common(n_samples, n_features, chunk_rows, dtype, random_state)
    if isinstance(centers, numbers.Integral) and not isinstance(centers, bool):
        centers = _check_int("centers", centers, 1)
    else:
        arr = np.asarray(centers, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] != p["n_features"]:
            raise ValueError(f"centers should be an int >= 1 or an array of shape "
                             f"(n_centers, n_features={p['n_features']}); got shape {arr.shape}")
        if not np.isfinite(arr).all():
            raise ValueError("centers should be finite")
        centers = arr.tolist()
    try:
        low, high = (float(v) for v in center_box)
    except (TypeError, ValueError):
        raise ValueError(f"center_box={center_box!r} should be a pair (low, high)") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"center_box={center_box!r} should be finite with low < high")
    p.update(centers=centers, cluster_std=_check_float("cluster_std", cluster_std, 0.0),
             center_box=[low, high])
    return p


def _classification_params(n_samples, n_features, *, n_classes, n_informative, class_sep,
                           flip_y, chunk_rows, dtype, random_state) -> dict[str, Any]:
    p = _common(n_samples, n_features, chunk_rows, dtype, random_state)
    p.update(
        n_classes=_check_int("n_classes", n_classes, 2),
        n_informative=None if n_informative is None
        else _check_int("n_informative", n_informative, 1, p["n_features"]),
        class_sep=_check_float("class_sep", class_sep, 0.0),
        flip_y=_check_float("flip_y", flip_y, 0.0, 1.0),
    )
    return p


def _regression_params(n_samples, n_features, *, n_informative, noise, bias, chunk_rows,
                       dtype, random_state) -> dict[str, Any]:
    p = _common(n_samples, n_features, chunk_rows, dtype, random_state)
    p.update(
        n_informative=None if n_informative is None
        else _check_int("n_informative", n_informative, 1, p["n_features"]),
        noise=_check_float("noise", noise, 0.0),
        bias=_check_float("bias", bias),
    )
    return p


# ------------------------------------------------------------------ ground truth, rows


def _informative(rng: np.random.Generator, n_features: int, n_informative: int | None):
    """Sorted indices of the informative features (all of them by default)."""
    k = n_features if n_informative is None else n_informative
    return np.sort(rng.permutation(n_features)[:k])


def _dot(X: np.ndarray, coef: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[i] = sum_j X[i, j] * coef[j]`` in float64, summed in feature order.

    Element-wise arithmetic rather than BLAS, so the result does not depend on
    the number of BLAS threads; only features with a non-zero coefficient cost.
    """
    out[:] = 0.0
    tmp = np.empty(min(_BLOCK, len(X)))
    for j in np.flatnonzero(coef):
        c = np.float64(coef[j])
        for s in range(0, len(X), _BLOCK):
            t = tmp[: min(_BLOCK, len(X) - s)]
            np.multiply(X[s:s + _BLOCK, j], c, out=t, dtype=np.float64)
            out[s:s + _BLOCK] += t
    return out


def _blobs_truth(rng, p):
    if isinstance(p["centers"], int):
        low, high = p["center_box"]
        centers = rng.uniform(low, high, size=(p["centers"], p["n_features"]))
    else:
        centers = np.array(p["centers"])
    return {"centers": (centers.astype(p["dtype"]), ("cluster", "feature"))}


def _blobs_chunk(rng, p, truth, X, y):
    centers = truth["centers"][0]
    y[:] = rng.integers(0, len(centers), size=len(y))
    rng.standard_normal(dtype=X.dtype, out=X)
    if p["cluster_std"] != 1.0:
        X *= X.dtype.type(p["cluster_std"])
    for s in range(0, len(X), _BLOCK):
        X[s:s + _BLOCK] += centers[y[s:s + _BLOCK]]


# Scale of the noise-free logits of make_classification: each row of ``coef`` has
# Euclidean norm (root mean square over classes) _LOGIT_SCALE * class_sep.
_LOGIT_SCALE = 4.0


def _classification_truth(rng, p):
    n_features, n_classes = p["n_features"], p["n_classes"]
    k = 1 if n_classes == 2 else n_classes
    informative = _informative(rng, n_features, p["n_informative"])
    g = rng.standard_normal((k, len(informative)))
    intercept = rng.standard_normal(k)
    if k > 1:  # the identifiable softmax parametrisation: rows sum to zero
        g -= g.mean(axis=0)
        intercept -= intercept.mean()
    rms = math.sqrt(float((g**2).sum()) / k)
    coef = np.zeros((k, n_features))
    coef[:, informative] = g * (_LOGIT_SCALE * p["class_sep"] / rms)
    intercept *= p["class_sep"]
    return {"coef": (coef.astype(p["dtype"]), ("class", "feature")),
            "intercept": (intercept.astype(p["dtype"]), ("class",))}


def _classification_chunk(rng, p, truth, X, y):
    coef, intercept = truth["coef"][0], truth["intercept"][0]
    n = len(y)
    rng.standard_normal(dtype=X.dtype, out=X)
    logits = np.empty((len(coef), n))
    for c in range(len(coef)):
        _dot(X, coef[c], logits[c])
        logits[c] += np.float64(intercept[c])
    u = rng.random(n)
    if len(coef) == 1:  # binary: P(y=1) = sigmoid(logit), computed without overflow
        y[:] = u < np.exp(-np.logaddexp(0.0, -logits[0]))
    else:  # softmax, sampled by inverting the cumulative probabilities
        logits -= logits.max(axis=0)
        np.exp(logits, out=logits)
        np.cumsum(logits, axis=0, out=logits)
        y[:] = (u * logits[-1] >= logits[:-1]).sum(axis=0)
    if p["flip_y"] > 0:
        flip = np.flatnonzero(rng.random(n) < p["flip_y"])
        y[flip] = rng.integers(0, p["n_classes"], size=len(flip))


def _regression_truth(rng, p):
    informative = _informative(rng, p["n_features"], p["n_informative"])
    coef = np.zeros(p["n_features"])
    coef[informative] = rng.standard_normal(len(informative))
    return {"coef": (coef.astype(p["dtype"]), ("feature",)),
            "intercept": (np.array(p["bias"], dtype=p["dtype"]), ())}


def _regression_chunk(rng, p, truth, X, y):
    coef, intercept = truth["coef"][0], truth["intercept"][0]
    rng.standard_normal(dtype=X.dtype, out=X)
    noise = rng.standard_normal(len(y))
    signal = _dot(X, coef, np.empty(len(y)))
    signal += np.float64(intercept)
    signal += p["noise"] * noise
    y[:] = signal


_GENERATORS: dict[str, tuple[Callable, Callable, Callable, str | None]] = {
    # name: (validate params, ground truth, fill one chunk, y dtype (None: X's))
    "blobs": (_blobs_params, _blobs_truth, _blobs_chunk, "int64"),
    "classification": (_classification_params, _classification_truth,
                       _classification_chunk, "int64"),
    "regression": (_regression_params, _regression_truth, _regression_chunk, None),
}


# ------------------------------------------------------------------------- writing


def _prepare_path(path: str, overwrite: bool) -> None:
    """Refuse to clobber: an existing non-empty path needs overwrite=True and a Zarr store."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.listdir(path):
        return
    if not overwrite:
        raise FileExistsError(
            f"{path!r} already exists and is not empty; pass overwrite=True to replace it")
    if not os.path.isfile(os.path.join(path, "zarr.json")) or os.path.islink(path):
        raise FileExistsError(
            f"{path!r} exists and is not a Zarr v3 store (no zarr.json); refusing to "
            "delete it, even with overwrite=True")


def _generate(path: str | os.PathLike, name: str, params: dict[str, Any], overwrite: bool,
              progress: Callable[[int], None] | None = None) -> str:
    """Write the store for validated ``params``; assumes validated input."""
    import zarr

    path = os.fspath(path)
    _prepare_path(path, overwrite)
    _, truth_fn, chunk_fn, y_dtype = _GENERATORS[name]
    n, d, seed = params["n_samples"], params["n_features"], params["random_state"]
    rows = min(params["chunk_rows"], n)
    n_chunks = -(-n // rows)
    dtype = np.dtype(params["dtype"])
    y_dtype = np.dtype(y_dtype or dtype)
    truth = truth_fn(np.random.default_rng(np.random.SeedSequence(seed)), params)

    # write next to the target, then rename: a store at ``path`` is always complete
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(tmp, mode="w", zarr_format=3, attributes={
            "generator": name, "params": params, "n_samples": n, "n_features": d,
            "chunk_rows": rows})
        config = {"write_empty_chunks": True}  # one file per chunk, always
        X = group.create_array("X", shape=(n, d), chunks=(rows, d), dtype=dtype,
                               dimension_names=("sample", "feature"), compressors=None,
                               fill_value=0, config=config)
        # random floats compress by ~8% only: store them raw; labels compress well
        y = group.create_array("y", shape=(n,), chunks=(rows,), dtype=y_dtype,
                               dimension_names=("sample",), fill_value=0, config=config,
                               compressors=None if y_dtype.kind == "f" else "auto")
        for key, (value, dims) in truth.items():
            arr = group.create_array(key, shape=value.shape, dtype=value.dtype,
                                     dimension_names=dims, fill_value=0)
            arr[...] = value

        def fill(i: int, buf: tuple[np.ndarray, np.ndarray]) -> int:
            m = min(rows, n - i * rows)
            # == SeedSequence(seed).spawn(n_chunks)[i], without building the list
            child = np.random.SeedSequence(seed, spawn_key=(i,))
            chunk_fn(np.random.default_rng(child), params, truth, buf[0][:m], buf[1][:m])
            return m

        # generate up to _WORKERS chunks ahead while this thread writes: memory is
        # bounded by _WORKERS + 1 chunk buffers
        free = [(np.empty((rows, d), dtype), np.empty(rows, y_dtype))
                for _ in range(min(_WORKERS + 1, n_chunks))]
        pending: deque = deque()
        submitted = 0
        with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
            for i in range(n_chunks):
                while free and submitted < n_chunks:
                    buf = free.pop()
                    pending.append((buf, pool.submit(fill, submitted, buf)))
                    submitted += 1
                buf, fut = pending.popleft()
                m = fut.result()
                X[i * rows:i * rows + m] = buf[0][:m]
                y[i * rows:i * rows + m] = buf[1][:m]
                free.append(buf)
                if progress is not None:
                    progress(i + 1)
        del group, X, y
        if os.path.lexists(path):
            shutil.rmtree(path)
        try:
            os.replace(tmp, path)
        except OSError:
            # another process wrote the same store meanwhile (ensure_dataset run in
            # parallel): keep theirs if it is identical, else report the clash
            if not _matches(path, name, params, any_seed=False):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# -------------------------------------------------------------------------- public

_COMMON_PARAMETERS = """\
    chunk_rows : int, default=100_000
        Rows per chunk of ``X`` and ``y`` (``X`` is never chunked along features).
        The data depend on it: each chunk has its own random stream.
    dtype : {'float32', 'float64'}, default='float32'
        Dtype of ``X`` (and of the ground truth).
    random_state : int >= 0 or None, default=None
        Seed. ``None`` draws a fresh seed from the OS and records it in the
        store's ``params``, so every store can be reproduced.
    overwrite : bool, default=False
        Replace an existing Zarr store at ``path``. Without it an existing
        non-empty ``path`` raises; a non-Zarr directory is never deleted."""

_COMMON_NOTES = """\
    The store is written to a hidden sibling directory and renamed to ``path``
    when complete. Two threads generate chunks ahead of the writer, so at most
    three chunk buffers (plus one chunk's temporaries per thread) are in memory
    whatever ``n_samples``. Chunk ``i`` is drawn from
    ``SeedSequence(random_state).spawn(n_chunks)[i]`` and the ground truth from
    ``default_rng(SeedSequence(random_state))``: the same arguments give
    byte-identical stores (on the same platform and NumPy)."""

_COMMON_RAISES = """\
    Raises
    ------
    ValueError
        If an argument is out of range, e.g. ``n_samples=0 should be >= 1``, or
        ``dtype`` is not float32 or float64.
    TypeError
        If a count is not an int or a parameter not a real number.
    FileExistsError
        If ``path`` exists and is not empty and ``overwrite`` is False, or with
        ``overwrite=True`` if it is not a Zarr v3 store."""


def make_blobs(
    path: str | os.PathLike,
    n_samples: int,
    n_features: int,
    *,
    centers: int | Any = 8,
    cluster_std: float = 1.0,
    center_box: tuple[float, float] = (-10.0, 10.0),
    chunk_rows: int = 100_000,
    dtype: str = "float32",
    random_state: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write isotropic Gaussian blobs (for clustering) to a Zarr store.

    Each row picks a centre uniformly at random and adds Gaussian noise:
    ``X[i] = centers[y[i]] + cluster_std * N(0, I)``.

    Parameters
    ----------
    path : str or path-like
        Directory of the Zarr v3 group to create.
    n_samples : int
        Number of rows, >= 1.
    n_features : int
        Number of features, >= 1.
    centers : int or array-like of shape (n_centers, n_features), default=8
        Number of centres, drawn uniformly in ``center_box``, or the centres.
    cluster_std : float, default=1.0
        Standard deviation of the noise around each centre, >= 0.
    center_box : (float, float), default=(-10.0, 10.0)
        Bounds of the uniformly drawn centres.
%(common)s

    Returns
    -------
    path : str
        The store: ``X`` of shape (n_samples, n_features), ``y`` of shape
        (n_samples,) int64 labels in ``0 .. n_centers-1`` and ``centers`` of
        shape (n_centers, n_features) with dims ``(cluster, feature)``.

%(raises)s

    Notes
    -----
%(notes)s
    """
    params = _blobs_params(n_samples, n_features, centers=centers, cluster_std=cluster_std,
                           center_box=center_box, chunk_rows=chunk_rows, dtype=dtype,
                           random_state=random_state)
    return _generate(path, "blobs", params, overwrite)


def make_classification(
    path: str | os.PathLike,
    n_samples: int,
    n_features: int,
    *,
    n_classes: int = 2,
    n_informative: int | None = None,
    class_sep: float = 1.0,
    flip_y: float = 0.0,
    chunk_rows: int = 100_000,
    dtype: str = "float32",
    random_state: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write a logistic (softmax for more than two classes) classification problem.

    ``X`` is standard Gaussian. For two classes ``P(y=1 | x) = sigmoid(x @ coef[0]
    + intercept[0])``; for more, ``P(y=k | x) = softmax(x @ coef.T + intercept)[k]``.
    A logistic regression fitted on the data recovers ``coef`` and ``intercept``.

    Parameters
    ----------
    path : str or path-like
        Directory of the Zarr v3 group to create.
    n_samples : int
        Number of rows, >= 1.
    n_features : int
        Number of features, >= 1.
    n_classes : int, default=2
        Number of classes, >= 2.
    n_informative : int or None, default=None
        Number of features with a non-zero coefficient (a random subset); None
        means all of them.
    class_sep : float, default=1.0
        Signal strength, >= 0. Each row of ``coef`` (root mean square over the
        rows for more than two classes) has Euclidean norm ``4 * class_sep``, so
        the noise-free logit has standard deviation ``4 * class_sep`` whatever
        ``n_features``; intercepts are ``class_sep * N(0, 1)``. With more than
        two classes ``coef`` and ``intercept`` sum to zero over classes (the
        parametrisation a penalised multinomial fit converges to).
    flip_y : float, default=0.0
        Fraction of labels, in [0, 1], replaced by a uniformly drawn class.
%(common)s

    Returns
    -------
    path : str
        The store: ``X`` of shape (n_samples, n_features), ``y`` of shape
        (n_samples,) int64 labels in ``0 .. n_classes-1``, ``coef`` of shape
        (1 if n_classes == 2 else n_classes, n_features) with dims
        ``(class, feature)`` and ``intercept`` of shape (1 or n_classes,).

%(raises)s

    Notes
    -----
%(notes)s
    """
    params = _classification_params(n_samples, n_features, n_classes=n_classes,
                                    n_informative=n_informative, class_sep=class_sep,
                                    flip_y=flip_y, chunk_rows=chunk_rows, dtype=dtype,
                                    random_state=random_state)
    return _generate(path, "classification", params, overwrite)


def make_regression(
    path: str | os.PathLike,
    n_samples: int,
    n_features: int,
    *,
    n_informative: int | None = None,
    noise: float = 1.0,
    bias: float = 0.0,
    chunk_rows: int = 100_000,
    dtype: str = "float32",
    random_state: int | None = None,
    overwrite: bool = False,
) -> str:
    """Write a linear regression problem ``y = X @ coef + bias + noise * N(0, 1)``.

    Parameters
    ----------
    path : str or path-like
        Directory of the Zarr v3 group to create.
    n_samples : int
        Number of rows, >= 1.
    n_features : int
        Number of features, >= 1.
    n_informative : int or None, default=None
        Number of features with a non-zero coefficient, drawn from N(0, 1) (a
        random subset of features); None means all of them.
    noise : float, default=1.0
        Standard deviation of the Gaussian noise added to ``y``, >= 0.
    bias : float, default=0.0
        The intercept.
%(common)s

    Returns
    -------
    path : str
        The store: ``X`` of shape (n_samples, n_features), ``y`` of shape
        (n_samples,) with ``X``'s dtype, ``coef`` of shape (n_features,) with dim
        ``feature`` and ``intercept``, a 0-d array equal to ``bias``.

%(raises)s

    Notes
    -----
%(notes)s
    """
    params = _regression_params(n_samples, n_features, n_informative=n_informative,
                                noise=noise, bias=bias, chunk_rows=chunk_rows, dtype=dtype,
                                random_state=random_state)
    return _generate(path, "regression", params, overwrite)


for _f in (make_blobs, make_classification, make_regression):
    if _f.__doc__:  # None under python -OO
        _f.__doc__ = _f.__doc__ % {"common": _COMMON_PARAMETERS, "notes": _COMMON_NOTES,
                                  "raises": _COMMON_RAISES}
del _f

_MAKERS: dict[str, Callable[..., str]] = {
    "blobs": make_blobs, "classification": make_classification, "regression": make_regression}


def _check_name_size(name: str, size: str) -> None:
    if name not in _MAKERS:
        raise ValueError(f"name={name!r} should be one of {list(DATASETS)}")
    if size not in SIZES:
        raise ValueError(f"size={size!r} should be one of {list(SIZES)}")


def dataset_path(out: str | os.PathLike, name: str, size: str) -> str:
    """Path of a course dataset: ``<out>/<name>-<size>.zarr``.

    Parameters
    ----------
    out : str or path-like
        Data directory, e.g. ``"data"``.
    name : {'blobs', 'classification', 'regression'}
    size : {'tiny', 'small', 'medium', 'large'}
    """
    _check_name_size(name, size)
    return os.path.join(os.fspath(out), f"{name}-{size}.zarr")


def _course_params(name: str, size: str, random_state: int | None,
                   chunk_rows: int | None = None) -> dict[str, Any]:
    """Validated ``params`` of a course dataset, defaults read from the maker's signature."""
    sig = inspect.signature(_MAKERS[name])
    kwargs = {k: v.default for k, v in sig.parameters.items()
              if v.default is not inspect.Parameter.empty and k != "overwrite"}
    n_samples, n_features, default_rows = SIZES[size]
    kwargs.update(_COURSE_KWARGS[name],
                  chunk_rows=default_rows if chunk_rows is None else chunk_rows,
                  random_state=random_state)
    return _GENERATORS[name][0](n_samples, n_features, **kwargs)


def _matches(path: str, name: str, params: dict[str, Any], any_seed: bool) -> bool:
    """True if ``path`` is a complete store generated with ``params``."""
    try:
        with open(os.path.join(path, "zarr.json")) as f:
            attrs = json.load(f).get("attributes", {})
    except (OSError, ValueError):
        return False
    stored = dict(attrs.get("params", {}))
    if any_seed:
        stored.pop("random_state", None)
        params = {k: v for k, v in params.items() if k != "random_state"}
    return attrs.get("generator") == name and stored == params


def _build(name: str, size: str, out: str | os.PathLike, random_state: int | None,
           chunk_rows: int | None, overwrite: bool,
           progress: Callable[[int], None] | None = None) -> tuple[str, bool]:
    """Build (or reuse) one course dataset; return ``(path, built)``."""
    _check_name_size(name, size)
    path = dataset_path(out, name, size)
    params = _course_params(name, size, random_state, chunk_rows)
    if not overwrite and _matches(path, name, params, random_state is None):
        return path, False
    return _generate(path, name, params, overwrite, progress), True


def ensure_dataset(name: str, size: str, out: str | os.PathLike = "data",
                   random_state: int | None = 0) -> str:
    """Return the path of a course dataset, generating it only if needed.

    Parameters
    ----------
    name : {'blobs', 'classification', 'regression'}
        ``blobs``: 8 centres; ``classification``: binary; ``regression``: all
        features informative, noise 1.
    size : {'tiny', 'small', 'medium', 'large'}
        See :data:`SIZES` (32 float32 features; 20 thousand to 200 million rows).
    out : str or path-like, default='data'
        Data directory; the store is ``dataset_path(out, name, size)``.
    random_state : int >= 0 or None, default=0
        The course's datasets use 0, like the command line. None accepts an
        existing store with any seed.

    Returns
    -------
    path : str

    Notes
    -----
    An existing store is reused when its ``generator`` and ``params``
    attributes match. A store at that path made with other parameters (say
    another ``--chunk-rows``) is regenerated, with a :class:`UserWarning`.
    """
    path = dataset_path(out, name, size)
    params = _course_params(name, size, random_state)
    if _matches(path, name, params, random_state is None):
        return path
    if os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        warnings.warn(f"{path!r} was generated with other parameters or is incomplete; "
                      "regenerating it", UserWarning, stacklevel=2)
    return _generate(path, name, params, overwrite=True)


# --------------------------------------------------------------------- command line


def _store_bytes(path: str) -> tuple[int, int]:
    """(uncompressed bytes of all arrays, bytes on disk)."""
    import zarr

    group = zarr.open_group(path, mode="r")
    logical = sum(a.nbytes for _, a in group.arrays())
    disk = sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)
    return logical, disk


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dmlkit.datasets``."""
    parser = argparse.ArgumentParser(
        prog="python -m dmlkit.datasets",
        description="Write a course dataset to <out>/<name>-<size>.zarr, chunk by chunk. "
        "An existing store with the same parameters is reused.")
    parser.add_argument("name", choices=[*DATASETS, "all"])
    parser.add_argument("--size", choices=list(SIZES), required=True,
                        help="tiny 20k, small 200k, medium 2M, large 200M rows "
                        "(32 float32 features)")
    parser.add_argument("--out", default="data", help="data directory (default: data)")
    parser.add_argument("--chunk-rows", type=int, default=None,
                        help="rows per chunk (default: per size, "
                        + ", ".join(f"{k} {v.chunk_rows}" for k, v in SIZES.items()) + ")")
    parser.add_argument("--random-state", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="regenerate even if the store exists")
    args = parser.parse_args(argv)
    import zarr  # noqa: F401  (imported before timing: the first import takes ~0.2 s)

    names = DATASETS if args.name == "all" else (args.name,)
    for name in names:
        size = SIZES[args.size]
        rows = max(1, size.chunk_rows if args.chunk_rows is None else args.chunk_rows)
        bar = None
        if sys.stderr.isatty() and size.n_samples // rows >= 20:
            from tqdm import tqdm

            bar = tqdm(total=-(-size.n_samples // min(rows, size.n_samples)), unit="chunk",
                       desc=name, leave=False)
        t0 = time.perf_counter()
        try:
            path, built = _build(name, args.size, args.out, args.random_state,
                                 args.chunk_rows, args.overwrite,
                                 None if bar is None else lambda i: bar.update(1))
        except (FileExistsError, ValueError, TypeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - t0
        logical, disk = _store_bytes(path)
        rate = f", {logical / seconds / 1e6:.0f} MB/s" if built else " (existing store reused)"
        print(f"{path}  X {(size.n_samples, size.n_features)} float32  "
              f"{logical / 1e6:.1f} MB ({disk / 1e6:.1f} MB on disk)  "
              f"{seconds:.2f} s{rate}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
