"""The ``make demo`` script end to end on the tiny blobs store, with a real LocalCluster."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stdout

import pytest

from dmlkit import demo

pytestmark = pytest.mark.cluster

METHODS = {"dmlkit": "dmlkit k-means|| (Zarr)", "dmlkit_same_init": "dmlkit, same init (Zarr)",
           "sklearn_same_init": "sklearn, same init (memory)",
           "sklearn": "sklearn k-means++ (memory)"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the demo once in-process; return (stdout, out directory)."""
    tmp = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with redirect_stdout(buf):
        code = demo.main(["--size", "tiny", "--data", str(tmp), "--out", str(tmp / "out")])
    assert code == 0
    return buf.getvalue(), tmp / "out"


def test_table_has_every_method(run):
    stdout, _ = run
    assert "blobs-tiny.zarr" in stdout and "(20000, 32)" in stdout
    assert any(line.startswith("cluster: ") and "dashboard http" in line
               for line in stdout.splitlines())
    header = next(line for line in stdout.splitlines() if line.startswith("method"))
    for column in ("fit s", "iter", "passes", "inertia", "rel. inertia", "ARI", "centre err"):
        assert column in header
    table = stdout.splitlines()
    for method in METHODS.values():
        assert sum(line.startswith(method + " ") for line in table) == 1, method


def test_files_written_and_results_match_sklearn(run):
    stdout, out = run
    for name in ("kmeans_convergence.png", "kmeans_clusters.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out / name) in stdout
    results = json.loads((out / "kmeans_results.json").read_text())
    rows = {r["key"]: r for r in results["rows"]}
    assert {k: r["method"] for k, r in rows.items()} == METHODS
    assert abs(rows["dmlkit_same_init"]["rel_inertia"]) < 1e-4
    assert rows["dmlkit_same_init"]["n_iter"] == rows["sklearn_same_init"]["n_iter"]
    for key in ("dmlkit", "sklearn"):  # k-means|| and k-means++ find the blobs
        assert rows[key]["ari"] > 0.95, rows[key]
        assert rows[key]["center_error"] < 0.5, rows[key]  # unit noise, 2,500 rows per blob
    # from random rows the result may be a local minimum, but the same one for both
    assert rows["dmlkit_same_init"]["ari"] == pytest.approx(rows["sklearn_same_init"]["ari"],
                                                            abs=1e-3)
    km = rows["dmlkit"]
    assert km["n_passes"] > km["n_iter"] >= 1
    assert results["dataset"]["shape"] == [20_000, 32]
    assert len(results["history"]) == km["n_iter"]


def test_out_of_memory_branch_samples_and_skips_sklearn(tmp_path, monkeypatch, capsys):
    """What ``--size large`` does, on tiny data: no scikit-learn, ARI on a row sample."""
    monkeypatch.setattr(demo, "IN_MEMORY_SIZES", ())
    monkeypatch.setattr(demo, "ARI_ROWS", 6_000)
    assert demo.main(["--size", "tiny", "--data", str(tmp_path), "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    assert "scikit-learn skipped" in stdout and "on 6,000 rows" in stdout
    rows = json.loads((tmp_path / "kmeans_results.json").read_text())["rows"]
    assert [r["key"] for r in rows] == ["dmlkit"]
    assert rows[0]["rel_inertia"] is None and rows[0]["ari"] > 0.95
    assert (tmp_path / "kmeans_clusters.png").stat().st_size > 0


def test_center_error_matches_permuted_centres():
    import numpy as np

    true = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    fitted = true[[2, 0, 1]] + np.array([[0.0, 0.5], [0.1, 0.0], [0.0, 0.0]])
    assert demo.center_error(fitted, true) == pytest.approx(0.5)


def test_bad_size_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--size", "huge"])
    assert exc.value.code == 2
    assert "invalid choice: 'huge'" in capsys.readouterr().err


def test_help_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "dmlkit.demo", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for option in ("--size", "--data", "--out", "--progress", "--n-clusters", "--random-state"):
        assert option in out
