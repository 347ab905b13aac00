# The README's two commands: `make run` (set up, build the default models, serve) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MODELS := all-minilm-l6-v2 smollm2-135m-instruct

.PHONY: setup models run test lint ci clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

models: setup
	$(BIN)/appliance models pull $(MODELS)

run: models
	$(BIN)/appliance serve

test: models
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

ci: lint test

clean:
	rm -rf $(VENV) engines/*/model.onnx engines/*/tokenizer.json engines/*/generation.json engines/*/.build.json
