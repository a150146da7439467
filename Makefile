# The one test command (README, .ci/run): install test dependencies, lint, type-check, test.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test install-test lint serve-dev

test: install-test lint
	$(BIN)/python -m pytest

install-test:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	npm ci --prefix tests/interop --no-audit --no-fund --loglevel=error

lint:
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy src

serve-dev:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q .
	$(BIN)/bastion serve --dev
