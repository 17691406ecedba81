# The two commands: `make run` and `make test`. Everything else is for contributors.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test install worker-image gen check lint typecheck clean bench

run: $(STAMP)
	$(PY) -m launcher run

test: $(STAMP) worker-image
	$(PY) -m pytest $(PYTEST_ARGS)

# Benchmarks (not tests: nothing is asserted): `make bench` runs the quick profile,
# `make bench PROFILE=full` the full one, BENCH_ARGS='--only warm' a part. The report goes to
# results/<UTC time>/ and results/latest/. wrk comes from Debian's packages (we run as root).
PROFILE ?= quick
bench: $(STAMP) worker-image
	@command -v wrk >/dev/null 2>&1 || apt-get install -y wrk || \
		{ apt-get update && apt-get install -y wrk; }
	@$(PY) -c 'import matplotlib' 2>/dev/null || $(PY) -m pip install --quiet -e '.[dev,bench]'
	$(PY) -m bench --profile $(PROFILE) $(BENCH_ARGS)

# The docker tests need the worker image; without an engine they skip (or fail under
# UPW_REQUIRE_DOCKER=1, as in CI).
worker-image: $(STAMP)
	@if docker info >/dev/null 2>&1; then PYTHON=$(PY) ./build.sh worker; \
	else echo "make: no Docker engine answers; tests that need one will skip"; fi

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11 or newer is needed; set PYTHON=" or 0)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# Rebuild generated/ from protos/.
gen: $(STAMP)
	$(PY) tools/protogen.py

check: lint typecheck $(STAMP)
	$(PY) tools/protogen.py --check
	$(PY) tools/protogen.py --breaking

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
