# jobcloud — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA_DIR ?= $(CURDIR)/var
HOST ?= 127.0.0.1
PORT ?= 3000

.PHONY: run test bench venv system-deps clean help

help:
	@echo "make run    - install what is needed and start jobcloud on http://$(HOST):$(PORT)"
	@echo "make test   - install test needs, start the real services, run pytest"
	@echo "make bench  - run the benchmarks and rewrite docs/PERFORMANCE.md"

# The venv is rebuilt only when setup.cfg changes.
$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test,postgres,worker]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	scripts/system-deps.sh

run: venv
	JOBCLOUD_DATA_DIR=$(DATA_DIR) $(VENV)/bin/jobcloud-proxy serve --bind $(HOST):$(PORT)

test: venv system-deps
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/run-tests.sh $(PYTEST_ARGS)

bench: venv
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
