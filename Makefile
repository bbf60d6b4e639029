# dmlkit: the two commands of the README, and a few helpers.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SIZE   ?= small

.PHONY: demo test bench lab clean
.PHONY: browser-deps

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,notebooks]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dmlkit.demo --size $(SIZE) --data data --out out

# ci/slurm.sh: a single-node SLURM for the `slurm` tests (installed and started when root),
# stopped afterwards even when pytest fails; the exit status is pytest's.
test: $(VENV)/.installed
	bash ci/slurm.sh with $(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks kmeans

# JupyterLab on 127.0.0.1 in notebooks/; the Dask panel (dask-labextension) defaults to the
# dashboard of dmlkit's LocalCluster on port 8787 through jupyter-server-proxy (proxy/8787),
# and its search button finds the dashboard of the notebook's client on any port.
lab: $(VENV)/.installed
	@settings="$$($(PY) -c 'from jupyterlab.commands import get_app_dir; print(get_app_dir())')/settings/overrides.d" \
	  && mkdir -p "$$settings" && cp binder/jupyterlab-overrides.json "$$settings/dmlkit.json"
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser --ServerApp.root_dir=notebooks \
	  $(if $(filter 0,$(shell id -u)),--allow-root)

# headless Chromium for tests/test_browser.py (installed when root and missing)
test: browser-deps
browser-deps:
	bash ci/browser.sh

clean:
	rm -rf out data .pytest_cache
