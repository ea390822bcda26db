# Everything a fresh machine needs: `make test` and `make bench` create .venv from the pinned
# requirements on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: test bench benchmarks install ser2net clean-cache clean

install: $(STAMP) ser2net

$(STAMP): requirements.lock pyproject.toml harness/__init__.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	# labgrid's pyserial (pyserial-labgrid: pyserial 3.5 with rfc2217 fixes) and PlatformIO's pyserial
	# both install the `serial` package; the fixed one must be the one on disk, whatever order pip took.
	$(PY) -m pip install --quiet --no-deps --force-reinstall pyserial-labgrid==3.5.0.2
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# Two pytest-xdist workers, a test module per worker at a time (conftest.py schedules them).
test: $(STAMP) ser2net
	$(PY) -m pytest tests -n 2 $(PYTEST_FLAGS)

# ser2net (the Debian package) is what a labgrid exporter serves serial ports with (docs/farm.md);
# the labgrid tests need it. Installed here where apt-get runs as root, the package index refreshed
# only if the first attempt fails; where it cannot be, `make` goes on and those tests skip, saying why.
ser2net:
	@if command -v ser2net >/dev/null 2>&1 || [ -x /usr/sbin/ser2net ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1 || [ "$$(id -u)" != 0 ]; then \
	  echo "ser2net is missing and cannot be installed here (needs apt-get as root): the labgrid tests will skip"; \
	else \
	  echo "installing ser2net (apt-get)"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  timeout 600 apt-get install -y -q ser2net >/dev/null 2>&1 \
	  || { timeout 600 apt-get update -q >/dev/null 2>&1 && timeout 600 apt-get install -y -q ser2net >/dev/null 2>&1; } \
	  || echo "ser2net could not be installed (apt-get failed): the labgrid tests will skip"; \
	fi

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
