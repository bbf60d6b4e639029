"""The declared dependencies agree across pyproject.toml, environment.yml and binder/."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# names that differ between PyPI and conda-forge, or are pip-only
CONDA_NAME = {"matplotlib": "matplotlib-base", "dask[array]": "dask"}


def _conda_packages(path: Path) -> set[str]:
    names, section = set(), None
    for line in path.read_text().splitlines():
        if re.match(r"^[a-z]", line):
            section = line.split(":")[0]
        m = re.match(r"^  - ([A-Za-z0-9_.\-]+)", line)
        if section == "dependencies" and m and m.group(1) not in ("pip", "python"):
            names.add(m.group(1).lower())
    return names


def _pyproject_packages() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    names = set()
    for r in reqs:
        name = re.split(r"[<>=!~ ;]", r, maxsplit=1)[0].lower()
        names.add(CONDA_NAME.get(name, name))
    return names


def test_environment_files_list_the_pyproject_dependencies():
    expected = _pyproject_packages()
    assert _conda_packages(ROOT / "environment.yml") == expected
    assert _conda_packages(ROOT / "binder" / "environment.yml") == expected
