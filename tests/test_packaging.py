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


def _conda_specs(path: Path) -> dict[str, str]:
    """``{name: version spec}`` of the conda dependencies (pip's sub-list left out)."""
    specs, section = {}, None
    for line in path.read_text().splitlines():
        if re.match(r"^[a-z]", line):
            section = line.split(":")[0]
        m = re.match(r"^  - ([A-Za-z0-9_.\-]+)(.*)$", line)
        if section == "dependencies" and m and not m.group(2).startswith(":"):  # not "- pip:"
            specs[m.group(1).lower()] = m.group(2).strip()
    return specs


def test_binder_environment_is_the_root_one_without_the_editable_install():
    """repo2docker ignores the root environment.yml once binder/ exists: keep them in step."""
    root, binder = ROOT / "environment.yml", ROOT / "binder" / "environment.yml"
    assert _conda_specs(binder) == _conda_specs(root)
    for path in (root, binder):
        channels = re.search(r"^channels:\n((?:  - .*\n)+)", path.read_text(), re.M)
        assert channels and channels.group(1).split() == ["-", "conda-forge"], path
    # only the root file installs dmlkit itself; on Binder, postBuild does
    assert "-e ." in root.read_text() and "-e ." not in binder.read_text()


def test_conda_and_pyproject_version_specs_agree():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs += extra
    pyproject: dict[str, set[str]] = {}
    for r in reqs:
        name, spec = re.match(r"([A-Za-z0-9_.\-\[\]]+)(.*)", r).groups()
        pyproject.setdefault(CONDA_NAME.get(name.lower(), name.lower()), set()).add(spec.strip())
    conda = _conda_specs(ROOT / "environment.yml")
    differ = {name: (sorted(specs), conda.get(name)) for name, specs in pyproject.items()
              if specs != {conda.get(name)}}
    assert not differ, f"pyproject spec(s) vs environment.yml spec: {differ}"
