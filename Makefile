# The developer loop: `make format`, `make lint`, `make test-fast` while working, `make test` before pushing.
#
# Run it with the virtualenv active (`. .venv/bin/activate`; README: Quick start): the tools are the ones
# installed there. Where ./.venv exists its bin/ is used even when not activated; otherwise python, ruff,
# mypy and lint-imports are taken from PATH. Another interpreter: `make test PYTHON=/path/to/python`.
VENV_BIN := $(if $(wildcard .venv/bin/python),.venv/bin/,)
PYTHON ?= $(VENV_BIN)python
LINT_IMPORTS ?= $(VENV_BIN)lint-imports
# Extra pytest arguments, e.g. `make test-fast PYTEST_ARGS="-x -k catalog"`, or `PYTEST_ARGS=--strict-warnings`
# to turn deprecation warnings into errors (all but the third-party ones pyproject.toml filters by name).
PYTEST_ARGS ?=
# Unit tests: no Prefect server, no moto, no browser, nothing over ~3 s (markers: pyproject.toml).
FAST := not slow and not prefect_server and not s3 and not ui

.PHONY: install lint format test-fast test

# README's first command: a virtualenv in .venv with PyTorch and stemworks (plus its test and lint tools).
# Hosts without an NVIDIA GPU get PyTorch's CPU build: `torch==$(TORCH)+cpu` exists only on PyTorch's CPU
# index (and in local wheel mirrors), so this can never fall back to the multi-GB CUDA build from PyPI.
TORCH ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
install:
	python3 -m venv .venv
	if nvidia-smi -L >/dev/null 2>&1; then .venv/bin/pip install "torch==$(TORCH)"; \
	else .venv/bin/pip install "torch==$(TORCH)+cpu" --extra-index-url $(TORCH_CPU_INDEX); fi
	.venv/bin/pip install -e ".[test,dev]"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .
	$(PYTHON) -m mypy
	$(LINT_IMPORTS)

# Fixes first (import order, upgrades), then the layout; what ruff cannot fix is listed and left to you.
format:
	-$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test-fast:
	$(PYTHON) -m pytest -m "$(FAST)" $(PYTEST_ARGS)

# What README says to run, and what .ci/run runs on a fresh clone.
test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)
