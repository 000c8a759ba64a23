# The two front-door commands: `make demo` (the main job) and `make test` (the suite).
# Each creates the virtual environment and fetches the data set when they are missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
LINT_PATHS := $(wildcard src tests benchmarks)

.PHONY: demo test lint setup data clean

demo: setup
	$(BIN)/deepshrink run lenet-300-100

test: setup
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check --quiet $(LINT_PATHS)
	$(BIN)/python -m pytest
	@# On an AVX-512 CPU the runtime tests run again with the AVX-512 forms off and AVX2-only
	@# code (the CPU name alone would keep the host's AVX-512 features), so the path most CPUs
	@# take is tested on every machine.
	@if grep -qs avx512f /proc/cpuinfo; then \
		echo "tests/test_runtime.py again: DEEPSHRINK_AVX512=0 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f"; \
		DEEPSHRINK_AVX512=0 NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=-avx512f $(BIN)/python -m pytest -q tests/test_runtime.py; \
	fi

lint: setup
	$(BIN)/ruff check $(LINT_PATHS)

setup: $(INSTALLED) data

# Pinned versions (requirements/ci.txt) so every fresh machine gets what CI tested.
$(INSTALLED): requirements/ci.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements/ci.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

data:
	@bash scripts/ensure-data.sh

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
