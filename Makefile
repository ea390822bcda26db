# Everything a fresh machine needs: `make test` and `make bench` create .venv from the pinned
# requirements on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: test bench benchmarks install clean-cache clean

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml harness/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_FLAGS)

bench: $(STAMP)
	$(PY) -m pytest suites/ --board=virtual --profile=full $(PYTEST_FLAGS)

# The published table: results/BENCHMARKS.md (committed) and results/benchmarks.html.
benchmarks: $(STAMP)
	$(PY) -m harness.cli run suites/seed.yaml --board=virtual --profile=full --run-id=published --diagnose=all
	$(PY) -m harness.cli report results/seed/published --out results

# Every cached artifact, and the virtual board's native firmware build (docs/ci.md). Not needed
# to repair a damaged entry: a run rebuilds those itself. Not while a run is using the cache.
clean-cache:
	rm -rf .tinyhil-cache

clean: clean-cache
	rm -rf $(VENV)
