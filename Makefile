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

# A second environment with the Python side of ROS 2 Jazzy (numpy 1.x, OpenCV 4, ros-jazzy-*
# wheels; test/distro/jazzy.txt), into which the workspace requirement set is installed as the
# README tells ROS users to: it shows that set leaves the distribution's packages as they were
# and that the code and tests run on them.
JAZZY_VENV ?= .venv-jazzy
JAZZY_PY := $(JAZZY_VENV)/bin/python
JAZZY_HASH := $(shell cat test/distro/jazzy.txt requirements-ros.txt setup.py | sha1sum | cut -c1-12)
JAZZY_STAMP := $(JAZZY_VENV)/.ovseg-jazzy-$(JAZZY_HASH).stamp
# The torch a user picks for the machine before requirements-ros.txt (README); here the CPU/CUDA
# pair of requirements.txt, which pip takes from this machine's disk.
JAZZY_TORCH ?= torch==2.14.1 torchvision==0.29.1

RUN_ARGS ?= --pretrained openai --fallback-random --duration 90
PYTEST_ARGS ?=
LINT_PATHS := ovseg_ros test setup.py launch

.PHONY: help setup test run lint format clean distclean setup-jazzy test-jazzy

help:
	@echo "make setup      create $(VENV) and install requirements.txt + this package (editable)"
	@echo "make test       ruff check + pytest (PYTEST_ARGS='...' to pass options)"
	@echo "make test-jazzy the suite in $(JAZZY_VENV): ROS 2 Jazzy's numpy 1.26 and OpenCV 4.6, requirements-ros.txt on top"
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

setup-jazzy: $(JAZZY_STAMP)

$(JAZZY_STAMP):
	@if [ ! -x "$(JAZZY_PY)" ]; then $(PYTHON_BOOTSTRAP) -m venv "$(JAZZY_VENV)"; fi
	$(JAZZY_PY) -m pip install --quiet --upgrade pip
	@echo ">> the distribution: ROS 2 Jazzy's Python packages (test/distro/jazzy.txt)"
	$(JAZZY_PY) -m pip install --quiet -r test/distro/jazzy.txt
	$(JAZZY_PY) test/distro/untouched.py snapshot $(JAZZY_VENV)/distro.json
	@echo ">> the workspace install of the README: torch for this machine, then requirements-ros.txt"
	$(JAZZY_PY) -m pip install --quiet $(JAZZY_TORCH)
	$(JAZZY_PY) -m pip install --quiet -r requirements-ros.txt
	$(JAZZY_PY) -m pip install --quiet --no-deps -e .
	$(JAZZY_PY) test/distro/untouched.py check $(JAZZY_VENV)/distro.json
	@rm -f $(JAZZY_VENV)/.ovseg-jazzy-*.stamp
	@touch "$@"

# The whole suite on Jazzy's numpy and OpenCV (OVSEG_DISTRO makes test_distro.py assert them).
test-jazzy: setup-jazzy
	$(JAZZY_PY) test/distro/untouched.py check $(JAZZY_VENV)/distro.json
	OVSEG_DISTRO=jazzy $(JAZZY_PY) -m pytest -q test $(PYTEST_ARGS)

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
	find . \( -path ./$(VENV) -o -path ./$(JAZZY_VENV) \) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(JAZZY_VENV)
