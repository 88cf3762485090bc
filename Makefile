# Quick start: `make demo` and `make test` do all set-up on a fresh machine.
# Both call scripts/dev.py, which does the same on Windows: `py scripts/dev.py demo|test`.
PYTHON ?= python3
VENV   ?= .venv
# the CPU build of torch; a bare `torch` may pull a multi-GB CUDA build
TORCH  ?= torch==2.13.0
DEV    := VENV=$(VENV) TORCH="$(TORCH)" $(PYTHON) scripts/dev.py

.PHONY: env demo test bench lint-ci clean-demo

env:
	$(DEV) env

demo:
	$(DEV) demo

test:
	$(DEV) test

bench:
	$(DEV) bench

lint-ci:
	$(DEV) lint-ci

clean-demo:
	rm -rf out examples/models cache/objects cache/index.sqlite* cache/tmp cache/lock cache/lock.info cache/init.lock
