"""The ``make demo`` script end to end on the tiny blobs and classification stores, with a real LocalCluster."""
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
    # the classification families: dmlkit alone, metrics by dask, no k-NN
    assert "scikit-learn comparisons and k-NN skipped" in stdout and "k-NN skipped" in stdout
    assert "loaded X in memory" not in stdout
    lr = json.loads((tmp_path / "logreg_results.json").read_text())["rows"]
    assert [r["key"] for r in lr] == ["dmlkit"] and lr[0]["coef_diff"] is None
    assert lr[0]["test_accuracy"] > 0.8
    sgd = json.loads((tmp_path / "sgd_results.json").read_text())
    assert [r["key"] for r in sgd["rows"]] == ["optimum", "dmlkit"]
    assert 0 <= sgd["rows"][1]["gap"] < 0.05 and sgd["round_objectives"] == []
    assert not (tmp_path / "knn_results.json").exists()
    assert (tmp_path / "logreg_sgd_convergence.png").stat().st_size > 0


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


# ------------------------------------------------------------------ classification families
def _table(stdout: str, first_column: str) -> dict[str, str]:
    """Rows of the table whose header starts with ``first_column``: {method: line}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("method") and first_column in line)
    rows = {}
    for line in lines[start + 2:]:
        if not line.strip() or not (line.startswith("dmlkit") or line.startswith("sklearn")):
            break
        rows[line.split("  ")[0]] = line
    return rows


def test_classification_tables_printed(run):
    stdout, _ = run
    assert "classification-tiny.zarr" in stdout and "held out [16,000, 20,000)" in stdout
    logreg = _table(stdout, "max |coef diff|")
    assert set(logreg) == {"dmlkit Newton (Zarr)", "sklearn lbfgs (memory)"}
    sgd = _table(stdout, "gap")
    assert set(sgd) == {"dmlkit Newton optimum (Zarr)", "dmlkit local SGD (Zarr)",
                        "sklearn SGD (memory)"}
    knn = _table(stdout, "queries/s")
    assert set(knn) == {"dmlkit brute (Zarr)", "sklearn brute (memory)"}
    assert "same neighbours" in stdout and "skipped" not in stdout


def test_classification_files_and_numbers(run):
    stdout, out = run
    for name in ("logreg_sgd_convergence.png", "logreg_coefficients.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out / name) in stdout
    for name in ("logreg_results.json", "sgd_results.json", "knn_results.json"):
        assert str(out / name) in stdout
    lr = json.loads((out / "logreg_results.json").read_text())
    assert lr["dataset"]["shape"] == [20_000, 32] and lr["dataset"]["n_train"] == 16_000
    rows = {r["key"]: r for r in lr["rows"]}
    assert set(rows) == {"dmlkit", "sklearn"}
    dm, sk = rows["dmlkit"], rows["sklearn"]
    assert dm["coef_diff"] < 1e-2 and len(dm["coef"]) == 32
    assert dm["objective"] <= sk["objective"] * (1 + 1e-6)  # Newton converges at least as far
    assert dm["n_passes"] == sum(h["passes"] for h in lr["history"]) and dm["n_passes"] <= 20
    for r in rows.values():
        assert r["test_accuracy"] > 0.8 and 0 < r["test_log_loss"] < 0.5
    assert abs(dm["test_accuracy"] - sk["test_accuracy"]) < 2e-3

    sgd = json.loads((out / "sgd_results.json").read_text())
    rows = {r["key"]: r for r in sgd["rows"]}
    assert set(rows) == {"optimum", "dmlkit", "sklearn"}
    assert rows["optimum"]["gap"] == 0.0 and sgd["alpha"] == 1e-4
    assert sgd["C_optimum"] == pytest.approx(1 / (1e-4 * 16_000))
    assert 0 <= rows["dmlkit"]["gap"] < 0.05, rows["dmlkit"]
    assert rows["dmlkit"]["n_epochs"] == 2 and rows["dmlkit"]["n_rounds"] == len(sgd["rounds"])
    assert len(sgd["round_objectives"]) == len(sgd["rounds"]) == 8
    assert rows["sklearn"]["gap"] >= 0  # nothing beats the optimum
    assert rows["dmlkit"]["test_accuracy"] > 0.8

    knn = json.loads((out / "knn_results.json").read_text())
    rows = {r["key"]: r for r in knn["rows"]}
    assert knn["n_neighbors"] == 10 and knn["n_queries"] == 2_000
    dm, sk = rows["dmlkit"], rows["sklearn"]
    assert dm["identical_fraction"] >= 0.999 and dm["same_predictions"] >= 0.999
    # k-NN is weaker than the (true) linear model on this data, but far above chance
    assert dm["test_accuracy"] > 0.7
    assert dm["test_accuracy"] == pytest.approx(sk["test_accuracy"], abs=2e-3)
    assert dm["queries_per_second"] > 0


def test_objective_helpers_agree_with_sklearn():
    import numpy as np
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 4)).astype(np.float32)
    y = (rng.random(500) < 0.4).astype(np.int64)
    coef, intercept = np.array([[0.5, -1.0, 0.0, 2.0]]), np.array([0.3])
    z = X.astype(np.float64) @ coef[0] + 0.3
    loss, acc = demo.binary_metrics(X, y, coef, intercept)
    assert loss == pytest.approx(log_loss(y, 1 / (1 + np.exp(-z))))
    assert acc == pytest.approx(np.mean((z > 0) == (y == 1)))
    assert demo.l2_objective(X, y, coef, intercept, 0.1) == pytest.approx(loss + 0.05 * 5.25)
