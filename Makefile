# mermin developer entry points. `sudo make capture` / `sudo make test` install what is
# missing (scripts/setup.sh) and then run the job.
SHELL := /bin/bash
ROOT := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(ROOT)/.venv
PYTHON := $(VENV)/bin/python
ARGS ?=
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test capture lint bench completions

help: ## list the targets
	@grep -hE '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## install missing system packages and prepare .venv (idempotent)
	@bash $(ROOT)/scripts/setup.sh

test: setup ## run the test suite (extra pytest args: PYTEST_ARGS=...)
	cd $(ROOT) && $(VENV)/bin/pytest -ra -q $(PYTEST_ARGS)

capture: setup ## run `mermin capture` (arguments: ARGS=...)
	cd $(ROOT) && $(VENV)/bin/mermin capture $(ARGS)

lint: setup ## ruff check and ruff format --check
	cd $(ROOT) && $(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup ## run the benchmarks (bench/run_all.py)
	cd $(ROOT) && $(PYTHON) bench/run_all.py

completions: setup ## regenerate shell completions (scripts/gen_completions.py)
	cd $(ROOT) && $(PYTHON) scripts/gen_completions.py
