"""Counter-based random numbers indexed by global row number.

A uniform number for row ``i`` depends only on ``(key, i)``, never on how the
rows are split into chunks or on the order in which chunks run. That is what
makes sampling (k-means|| candidates, random init, subsamples) give the same
answer for every chunking and every scheduler.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over a uint64 array (wrapping arithmetic)."""
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def stream_key(seed: int, *stream: int) -> int:
    """Derive an independent 64-bit key for one random stream of one seed.

    Parameters
    ----------
    seed : int
        The estimator's integer seed.
    *stream : int
        Identifies the stream, e.g. ``(init_run, round)``.
    """
    seq = np.random.SeedSequence(entropy=seed, spawn_key=tuple(int(s) for s in stream))
    return int(seq.generate_state(1, np.uint64)[0])


def uniform_rows(key: int, start: int, stop: int) -> np.ndarray:
    """Uniform numbers in [0, 1) for global rows ``start .. stop-1``.

    Returns
    -------
    u : ndarray of shape (stop - start,), float64
    """
    with np.errstate(over="ignore"):
        idx = np.arange(start, stop, dtype=np.uint64)
        z = _splitmix64(idx * _GOLDEN + np.uint64(key))
        z = _splitmix64(z + _GOLDEN)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
