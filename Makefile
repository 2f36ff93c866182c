# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make serve   create .venv, install everything, start the daemon on config.yaml
#   make test    the same install, then stub check, lint, types and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint protos bench bench-smoke clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (see constraints.txt): nothing may pull a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	mkdir -p packages
	$(BIN)/deployd serve --config config.yaml

lint: install
	$(BIN)/python scripts/generate_protos.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

protos: install
	$(BIN)/python scripts/generate_protos.py

# Benchmarks against baselines measured in the same run (bench/__init__.py); results in bench/results/.
bench: install
	$(BIN)/python -m bench

# Every benchmark in a tiny configuration: checks the suite works, not speed.
bench-smoke: install
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
