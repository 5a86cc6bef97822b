# trajlab: `make demo` and `make test` each create (or reuse) a local virtualenv, install torch
# first (pinned; override TORCH_SPEC / TORCH_PIP_ARGS for a CUDA build), then the package.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.trajlab-installed

.PHONY: install demo test test-slow test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## Record, analyse and plot a short run on the embedded digits data (about 30 s on 2 cores after the install).
demo: $(STAMP)
	$(BIN)/trajlab demo --out trajlab-demo --overwrite

## The default test suite (minutes on 2 cores); slow studies are excluded.
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q $(PYTEST_ARGS)

## Slow studies (crash trials, validation study at full size); run before a release.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q -m slow $(PYTEST_ARGS)

test-all: test test-slow

## Benchmarks print ratios against baselines measured in the same run.
bench: $(STAMP)
	$(BIN)/python benchmarks/record_overhead.py
	$(BIN)/python benchmarks/record_layers.py
	$(BIN)/python benchmarks/spectral.py
	$(BIN)/python benchmarks/analysis.py
	$(BIN)/python benchmarks/writer_contention.py
	$(BIN)/python benchmarks/conv_per_sample.py

clean:
	rm -rf $(VENV) trajlab-demo .pytest_cache
