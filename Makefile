# The one set-up path on a machine without a ROS distribution: `make setup`, `make test`,
# `make run`. Inside a ROS 2 workspace use colcon + rosdep instead (see package.xml).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PYTHON_BOOTSTRAP ?= $(shell command -v python3.11 >/dev/null 2>&1 && echo python3.11 || echo python3)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
RUFF := $(VENV)/bin/ruff

# A changed requirements.txt or setup.py changes the hash, so the next `make setup` reinstalls.
SETUP_HASH := $(shell cat requirements.txt setup.py | sha1sum | cut -c1-12)
STAMP := $(VENV)/.ovseg-setup-$(SETUP_HASH).stamp

RUN_ARGS ?= --pretrained openai --fallback-random --duration 90
PYTEST_ARGS ?=
LINT_PATHS := ovseg_ros test setup.py launch

.PHONY: help setup test run lint format clean distclean

help:
	@echo "make setup      create $(VENV) and install requirements.txt + this package (editable)"
	@echo "make test       ruff check + pytest (PYTEST_ARGS='...' to pass options)"
	@echo "make run        the ROS node + a sample camera for 90 s, overlays in out/stream (RUN_ARGS='...')"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make format     ruff format + ruff check --fix"
	@echo "make clean      remove out/ and caches (keeps $(VENV))"
	@echo "make distclean  clean, and remove $(VENV)"

setup: $(STAMP)

# The stamp's name carries the hash, so it needs no file prerequisites (mtimes of a fresh
# checkout next to a cached .venv would otherwise force a reinstall every time).
$(STAMP):
	@if [ ! -x "$(PY)" ]; then \
		echo ">> creating virtual environment $(VENV) with $(PYTHON_BOOTSTRAP)"; \
		$(PYTHON_BOOTSTRAP) -m venv "$(VENV)"; \
	else \
		echo ">> using existing virtual environment $(VENV) ($$($(PY) --version))"; \
	fi
	@echo ">> upgrading pip"
	$(PIP) install --quiet --upgrade pip
	@echo ">> installing requirements.txt (torch is large: the first run takes a while)"
	$(PIP) install --quiet -r requirements.txt
	@echo ">> installing ovseg_ros (editable, no dependencies)"
	$(PIP) install --quiet --no-deps -e .
	@rm -f $(VENV)/.ovseg-setup-*.stamp
	@touch "$@"
	@echo ">> setup done: $(VENV) is ready (stamp $(notdir $@))"

test: setup
	$(RUFF) check ovseg_ros test
	$(PY) -m pytest -q test $(PYTEST_ARGS)

run: setup
	$(VENV)/bin/ovseg demo $(RUN_ARGS)

lint: setup
	$(RUFF) check $(LINT_PATHS)
	$(RUFF) format --check $(LINT_PATHS)

format: setup
	$(RUFF) format $(LINT_PATHS)
	$(RUFF) check --fix $(LINT_PATHS)

clean:
	rm -rf out .pytest_cache .ruff_cache build *.egg-info
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
