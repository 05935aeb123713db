# The two commands of the README, each doing its own set-up on a fresh clone:
#   make demo   virtual environment + package + verified quickstart data, then train the LLM quickstart
#   make test   virtual environment + package, then the test suite (slow tests excluded)
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data demo test test-slow tensorboard clean

$(INSTALLED): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	@touch $@

install: $(INSTALLED)

data: install
	$(PY) -m ancre_lightning.datamodules.fetch wikipedia

demo: data
	$(VENV)/bin/ancre fit --config configs/llm/quickstart.yaml
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir logs"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir logs

clean:
	rm -rf logs lightning_logs .pytest_cache
