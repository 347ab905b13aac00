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

# Python 3.10 is the oldest supported version; no 3.10 interpreter is needed to hold that line:
# ruff (target-version) and mypy (python_version) check at 3.10, and vermin finds any API newer
# than 3.10. Its two exclusions are false positives: `Config.file` (not the Python 2 builtin) and
# `float.is_integer` (vermin takes it for 3.12's `int.is_integer`).
VERMIN := $(BIN)/vermin -q -t=3.10- --violations --eval-annotations --no-tips --exclude file --exclude int.is_integer

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(VERMIN) appliance tui scripts scripts/gpu-check scripts/tui-screenshot

ci: lint test

clean:
	rm -rf $(VENV) engines/*/model.onnx engines/*/tokenizer.json engines/*/generation.json engines/*/.build.json engines/*/q4
