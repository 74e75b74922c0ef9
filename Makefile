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
# Job images baked into the worker VM template (`make vm-template`).
VM_IMAGES ?= jobcloud/python,jobcloud/ml

.PHONY: run test bench soak venv system-deps docker images editor vm-template clean help

help:
	@echo "make run    - install what is needed, build the job images, start the proxy and"
	@echo "              a local worker on http://$(HOST):$(PORT)"
	@echo "make test   - install test needs, start the real services, run pytest"
	@echo "make images - build the job images (jobcloud/python, jobcloud/ml) offline"
	@echo "make editor - bundle the code editor (CodeMirror, from npm) into proxy/static"
	@echo "make bench  - run the benchmarks and rewrite docs/PERFORMANCE.md"
	@echo "make soak   - chaos soak: 600 jobs while workers and the proxy are killed (~5 min)"
	@echo "make vm-template - build the worker VM template (var-vm/template) with both job images"

# The venv is rebuilt only when setup.cfg changes. The system packages come first:
# libvirt-python is built from source against libvirt-dev. Quiet: the install
# prints nothing unless it fails (setup.cfg's packaging draws no warnings), so
# `make run`'s first start ends with the admin password, not pip's notices.
$(VENV)/.installed: setup.cfg pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) install --quiet --disable-pip-version-check -e '.[test,postgres,worker,vm,s3]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	scripts/system-deps.sh

docker:
	scripts/docker-up.sh

images: system-deps docker
	scripts/build-images.sh $(IMAGES)

# The code editor's CodeMirror bundle (proxy/static/editor.bundle.js), from the
# npm registry at the locked versions; seconds the first time, instant after.
editor:
	scripts/build-editor.sh

run: venv images editor
	DATA_DIR=$(DATA_DIR) HOST=$(HOST) PORT=$(PORT) PATH=$(CURDIR)/$(VENV)/bin:$$PATH \
		scripts/run-local.sh

# The end-to-end tests train a scikit-learn model, so both images are built
# (the ML one takes minutes the first time, seconds after).
test: venv system-deps docker editor
	scripts/build-images.sh python ml
	scripts/libvirt-up.sh
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH scripts/run-tests.sh $(PYTEST_ARGS)

# Quick when nothing changed (skipped by the inputs' hash); see vm_provisioning/template.py.
vm-template: venv system-deps images
	$(VENV)/bin/jobcloud-vm build-template --images $(VM_IMAGES)

bench: venv docker
	$(PIP) install --quiet -e '.[bench]'
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench $(BENCH_ARGS)

# The long chaos soak (tests/test_soak.py runs a short one in `make test`);
# SOAK_ARGS="--seed N" replays a run's faults and job mix.
soak: venv docker
	scripts/build-images.sh python
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m bench.soak $(SOAK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
