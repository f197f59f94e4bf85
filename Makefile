# Two commands do all set-up (first run creates .venv; later runs reuse it):
#   make demo   builds the embedded tiny NSA model and generates from it (no network)
#   make test   installs the test extras (SGLang 0.5.17 included) and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip

$(VENV)/.base: $(BIN)/python pyproject.toml setup.py
	$(BIN)/pip install -q torch==2.11.0
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e '.[test,bench,sglang]'
	touch $@

.PHONY: demo test
demo: $(VENV)/.base
	$(BIN)/python -m specsa demo

test: $(VENV)/.test
	OMP_NUM_THREADS=2 $(BIN)/python -m pytest -q test
