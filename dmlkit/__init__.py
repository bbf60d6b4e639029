"""dmlkit: distributed machine learning on chunked Zarr arrays with Dask.

Every chunk of the data produces a small partial result (partial sums, counts,
gradients, local neighbours) and the partials are combined by a tree reduction.
"""
from __future__ import annotations

from dmlkit.connect import connect
from dmlkit.data import open_zarr
from dmlkit.kmeans import KMeans
from dmlkit.linear_model import LinearRegression, LogisticRegression, Ridge
from dmlkit.neighbors import KNeighborsClassifier, KNeighborsRegressor, NearestNeighbors
from dmlkit.preprocessing import StandardScaler
from dmlkit.sgd import SGDClassifier, SGDRegressor

__all__ = ["KMeans", "KNeighborsClassifier", "KNeighborsRegressor", "LinearRegression",
           "LogisticRegression", "NearestNeighbors", "Ridge", "SGDClassifier", "SGDRegressor",
           "StandardScaler", "connect", "open_zarr"]
__version__ = "0.1.0"
