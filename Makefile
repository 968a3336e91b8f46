# On a fresh machine: `make demo` runs the main job, `make test` the tests. Each first sets up
# whatever is missing: a venv in .venv, torch pinned (an unpinned `torch` pulls a multi-GB CUDA
# build), and this package with its C++ extension built against that torch.
# Where torch is already installed differently (a CUDA image), override it: `make test TORCH=torch`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
EXTRAS ?= test,mooncake,bench

.PHONY: demo test setup

demo: $(VENV)/.installed
	$(PY) -m llm_datadist_torch.demo

test: $(VENV)/.installed
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" numpy
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@
