# Two commands set up a fresh machine that has python3 (3.11 or newer):
#   make up     create .venv, install Tidings, run the whole system
#   make test   create .venv, install Tidings with its test tools, run every test

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install up demo test lint protos bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: install
	$(BIN)/tidings up

demo: install
	$(BIN)/tidings demo

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python scripts/generate_protos.py --check
	$(BIN)/python scripts/generate_api_docs.py --check
	$(BIN)/buf lint

protos: install
	$(BIN)/python scripts/generate_protos.py
	$(BIN)/python scripts/generate_api_docs.py

bench: install
	$(BIN)/tidings bench --calls 2000 --concurrency 32 --output bench/RESULTS.md

clean:
	rm -rf $(VENV) data
