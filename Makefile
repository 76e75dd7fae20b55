# wacored: `make run` and `make test` bootstrap everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
STAMP := $(VENV)/.installed-test
CONFIG ?= wacored.toml

.PHONY: run test test-two-workers lint tools postgres bench check-config clean

# `make run` installs what running needs and nothing else; `make test` adds the test tools. One line
# per step, so a first run on a slow link says what it is waiting for.
$(BIN)/python:
	@echo "==> make: creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> make: upgrading pip"
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	@echo "==> make: installing wacored and what it needs to run (pip)"
	$(BIN)/pip install --quiet -e .
	touch $(RUN_STAMP)

$(STAMP): pyproject.toml $(RUN_STAMP)
	@echo "==> make: installing the test tools: pytest, ruff, mypy, hypothesis, trustme (pip)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(RUN_STAMP)
	$(BIN)/wacored dev-env var/dev.env
	$(BIN)/wacored run -c $(CONFIG) --env-file var/dev.env

# After the whole suite, its daemon-level modules again with every daemon run as two workers sharing
# its port and store (WACORED_TEST_WORKERS=2, tests/inprocess_workers.py): what holds for one process
# must hold for `[server] processes = 2`. Tests marked single_worker are skipped there, with why.
# ~85 s on this project's 2-core machine (docs/development.md).
TWO_WORKERS := fuzz daemon durability resilience poison pauses probe numbers signing metrics logs store_errors
TWO_WORKERS_PYTEST := WACORED_TEST_WORKERS=2 $(BIN)/python -m pytest $(TWO_WORKERS:%=tests/test_%.py)

test: $(STAMP) lint tools postgres
	$(BIN)/python -m pytest
	$(TWO_WORKERS_PYTEST)

test-two-workers: $(STAMP)
	$(TWO_WORKERS_PYTEST)

# The deploy tests run the real tools: promtool and prometheus (Debian's prometheus package ships both;
# the tests start their own, so a service the package started under systemd is stopped and disabled),
# nginx and shellcheck. Installed once, when missing; `apt-get` needs root, as on CI.
TOOLS := promtool prometheus nginx shellcheck
tools:
	@missing=""; for t in $(TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			prometheus nginx shellcheck >/dev/null || \
			{ echo "make tools: could not install$$missing (apt-get install prometheus nginx shellcheck)"; exit 1; }; \
		if [ -d /run/systemd/system ]; then systemctl disable --now --quiet prometheus nginx || true; fi; \
	fi

# The PostgreSQL tests use $$WACORED_TEST_PG, else the server at 127.0.0.1:5432, else a private throwaway
# server they start themselves (tests/postgres.py); tests that take a server down always start their own.
# Either way they need initdb and pg_ctl: Debian's postgresql, installed once when missing. Its packaged
# cluster is never created (create_main_cluster = false, set between the two installs), so the install
# starts no service and takes no port.
PG_CONF := /etc/postgresql-common/createcluster.conf
postgres:
	@if ! { command -v initdb && command -v pg_ctl; } >/dev/null && ! ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then \
		echo "installing postgresql (apt-get)"; \
		{ apt-get update -qq && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-common >/dev/null && \
		  sed -ri 's/^#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' $(PG_CONF) && \
		  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
			{ echo "make postgres: could not install postgresql (apt-get install postgresql)"; exit 1; }; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check wacored tests bench
	$(BIN)/ruff format --check wacored tests bench
	$(BIN)/mypy

check-config: $(RUN_STAMP)
	$(BIN)/wacored check-config -c $(CONFIG)

# The bench's default downstream is nginx (bench/README.md); its packaged service is never started here.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) || \
		(echo "make bench needs wrk (apt-get install wrk)"; exit 1)
	@command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx && \
		 { [ ! -d /run/systemd/system ] || systemctl disable --now --quiet nginx || true; }) || \
		(echo "make bench needs nginx (apt-get install nginx), or run bench/bench.py --downstream noop"; exit 1)
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV) var/wacored.db* .pytest_cache
