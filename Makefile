# dmlkit: the two commands of the README, and a few helpers.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
SIZE   ?= small

.PHONY: demo test bench lab clean

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) on PATH (or run: make PYTHON=python3 ...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,notebooks]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m dmlkit.demo --size $(SIZE) --data data --out out

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m benchmarks kmeans

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 --no-browser notebooks/

clean:
	rm -rf out data .pytest_cache
