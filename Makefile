# resflow: `make demo` runs the pipeline end to end, `make test` runs the tests.
# Both create .venv and install the project on first use (CPU torch via constraints-cpu.txt).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.resflow-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench e2e images cluster-e2e clean

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints-cpu.txt -e '.[dev,local]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m flows.demo

e2e: $(STAMP)
	$(BIN)/python -m tests.e2e_ui

bench: $(STAMP)
	$(BIN)/python -m bench.cli_help
	$(BIN)/python -m bench.loop_bench
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.png_codecs
	$(BIN)/python -m bench.restore_bench
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.noise_estimate

# The images, built with podman on this machine's stand-in bases (infra/README.md, "Images built here")
images:
	infra/podman/build-bases.sh
	infra/podman/build-images.sh

# A containerised Ray cluster with token auth runs the nightly flow, and three drills (needs podman;
# not part of `make test`): infra/podman/cluster_e2e.py
cluster-e2e: $(STAMP) images
	$(BIN)/python infra/podman/cluster_e2e.py

clean:
	rm -rf .demo .e2e .pytest_cache
