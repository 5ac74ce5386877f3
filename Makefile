# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and
# install this package with the pinned versions in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test test-faults bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-core: $(BIN)/python setup.py constraints.txt
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-core
	$(PIP) -e '.[test,jax,gcp,dask]'
	$(BIN)/python -m pip check
	touch $@

demo: $(VENV)/.installed-core
	$(BIN)/kcp run

# lint-imports checks the layering rule in .importlinter before any test runs. The tests run on
# TEST_WORKERS processes, a test file to each at a time (its module fixtures made once): most tests keep
# one core busy, so on CI's 2 cores two workers took the suite from 21.7 to 10.8-12.7 min.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

# every fault-injection case (docs/operations.md, "What we guarantee"), local and gs://; `make test` runs a fixed sample
test-faults: $(VENV)/.installed-test
	$(BIN)/python -m pytest -m "faults or not faults" tests/kcp/test_faults.py

clean:
	rm -rf runs test-artifacts .pytest_cache
