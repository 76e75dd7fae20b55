# wacored: `make run` and `make test` bootstrap everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= wacored.toml

.PHONY: run test lint bench check-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/wacored dev-env var/dev.env
	$(BIN)/wacored run -c $(CONFIG) --env-file var/dev.env

test: $(STAMP) lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check wacored tests bench
	$(BIN)/mypy

check-config: $(STAMP)
	$(BIN)/wacored check-config -c $(CONFIG)

bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		(echo "make bench needs wrk (apt-get install wrk)"; exit 1)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) var/wacored.db* .pytest_cache
