# jobcloud — the two commands a newcomer needs are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
DATA_DIR ?= $(CURDIR)/var
HOST ?= 127.0.0.1
PORT ?= 3000
# Images `make run` builds; `make images` builds these too. The ML image takes
# several minutes the first time (Debian's numpy/scipy/pandas/sklearn/torch/opencv).
IMAGES ?= python ml

.PHONY: run test bench venv system-deps docker images clean help

help:
	@echo "make run    - install what is needed, build the job images, start the proxy and"
	@echo "              a local worker on http://$(HOST):$(PORT)"
	@echo "make test   - install test needs, start the real services, run pytest"
	@echo "make images - build the job images (jobcloud/python, jobcloud/ml) offline"
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

docker:
	scripts/docker-up.sh

images: system-deps docker
	scripts/build-images.sh $(IMAGES)

run: venv images
	DATA_DIR=$(DATA_DIR) HOST=$(HOST) PORT=$(PORT) PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
		scripts/run-local.sh

# The end-to-end tests train a scikit-learn model, so both images are built
# (the ML one takes minutes the first time, seconds after).
test: venv system-deps docker
	scripts/build-images.sh python ml
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/run-tests.sh $(PYTEST_ARGS)

bench: venv docker
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
