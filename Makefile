# Quick start on a machine with only python3 and make:
#   make demo   trains the digits MLP and prints its held-out accuracy
#   make test   runs the test suite
#   make test-fast  the suite without the e2e and mpi tests (a quick inner loop)
# Each target creates .venv on first use and refreshes it whenever pyproject.toml changes.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.stamp-$(shell $(PYTHON) -c "import hashlib;print(hashlib.sha256(open('pyproject.toml','rb').read()).hexdigest()[:16])")

.PHONY: venv test test-fast demo lint bench clean protos

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.stamp-*
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# Leaves out the tests that start MPI processes or a coordinator with workers (markers in
# pyproject.toml): the minutes they take are for `make test` and CI.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e and not mpi"

demo: $(STAMP)
	$(VENV)/bin/dptrain demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# Benchmarks unset the variables that pin OpenBLAS to slow kernels on these machines (never in tests).
bench: $(STAMP)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \
		MKL_NUM_THREADS=1 $(PY) bench/engine.py

# Regenerate the checked-in gRPC code from protos/dptrain/v1/*.proto (a test fails when stale).
protos: $(STAMP)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
