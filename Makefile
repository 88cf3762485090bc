# Quick start: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# the CPU build of torch; a bare `torch` may pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: env demo test bench clean-demo

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m mergebuild.testing.fabricate --out examples/models --lora
	$(BIN)/mergebuild
	$(BIN)/mergebuild lineage out/demo-final.safetensors

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/core.py

clean-demo:
	rm -rf out examples/models cache/objects cache/index.sqlite* cache/tmp cache/lock
