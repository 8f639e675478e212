# Set-up, tests and the demo. Everything runs inside .venv, made on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch is installed first where the venv has none: an unpinned torch would pull
# a multi-GB CUDA build. GPU machines: make setup TORCH_SPEC=torch (or the CUDA build you use).
TORCH_SPEC ?= torch==2.13.0
RUN_DIR ?= runs/demo

.PHONY: setup test test-ray test-unit lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# Three tiers (tests/conftest.py): unit (no Ray, no subprocess), ray (+ a local Ray and frnet
# commands), and everything (+ several nodes, the cluster launcher, the demo): what CI runs.
# Each runs in TEST_PROCESSES pytest processes (pytest-xdist), a test module at a time per process
# (its shared set-up stays in one process), the longest modules first (tests/conftest.py).
TEST_PROCESSES ?= 2
PYTEST := $(PY) -m pytest -q -ra -n $(TEST_PROCESSES) --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST) --durations=25 tests

test-ray: setup
	$(PYTEST) --durations=15 -m "not cluster" tests

test-unit: setup
	FRNET_TEST_TIER=unit $(PYTEST) --durations=10 -m "not ray and not cluster" tests

lint: setup
	$(VENV)/bin/ruff check models preprocessing pipeline tests benchmarks

demo: setup
	$(VENV)/bin/frnet demo --out $(RUN_DIR) --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
