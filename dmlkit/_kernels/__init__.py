"""Per-chunk maths in plain NumPy: partial results and their combine functions.

Nothing in this package imports dask. Each algorithm has a module of kernels
(functions of one row block of ``X`` and broadcast parameters returning a small
record of sufficient statistics) and associative ``combine`` functions that
merge two such records. ``dmlkit._graph`` wires them into Dask graphs.
"""
