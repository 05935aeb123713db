# The two commands of the README, each doing its own set-up on a fresh clone:
#   make demo   virtual environment + package + verified quickstart data, then train the LLM quickstart
#   make test   virtual environment + package, then the test suite (slow tests excluded)
#   make demo-bpe  the second LLM quickstart: prepare both bundled corpora with a 4,096-token BPE, then train
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install data demo demo-bpe test test-slow tensorboard clean

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

demo-bpe: install
	$(VENV)/bin/ancre prepare wikipedia shakespeare --tokenizer bpe:4096 --val_fraction 0.02 --out data/quickstart-bpe
	$(VENV)/bin/ancre fit --config configs/llm/quickstart_bpe.yaml
	@echo "Generate: $(VENV)/bin/ancre generate --ckpt_path logs/llm-quickstart-bpe/version_N/checkpoints/last.ckpt --prompt 'The river' --temperature 0"

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

tensorboard: install
	$(VENV)/bin/tensorboard --logdir logs

clean:
	rm -rf logs lightning_logs .pytest_cache
