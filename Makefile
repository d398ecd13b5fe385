# Elemta: `make run` starts everything, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt setup.cfg pyproject.toml | sha1sum | cut -c1-12)
export FLASK_APP := wsgi.py

.PHONY: setup migrate run lint test test-fast bench bench-quick e2e screenshots clean

# The package itself is installed editable: it gives the `elemta` command (setup.cfg).
$(STAMP): requirements.txt requirements-dev.txt setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

migrate: setup
	$(BIN)/flask db upgrade

# exec: make is the runner's parent, which watches it (scripts/run_all.py): signalling make
# alone stops everything too.
run: migrate
	exec $(BIN)/python scripts/run_all.py

# ruff (ruff.toml) over all the Python, mypy (setup.cfg [mypy]) over app/. `ruff check --fix`
# sorts imports and applies pyupgrade's rewrites.
LINTED := app tests bench scripts migrations wsgi.py gunicorn.conf.py
lint: setup
	$(BIN)/ruff check $(LINTED)
	$(BIN)/mypy

# Lint first (seconds): style drift and type errors fail the suite like a broken test.
test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The loop while developing (the whole suite stays `make test`): the unit tests (tests/unit: pure
# rules, no database) and the suite on SQLite only, in two processes, without the tests marked
# slow (subprocess servers, Postfix) and the browser tests (tests/ui). PostgreSQL is left out by
# unsetting ELEMTA_TEST_DATABASE_URL, so its half is skipped, not run.
test-fast: setup
	env -u ELEMTA_TEST_DATABASE_URL $(BIN)/python -m pytest -q -rfE -n 2 -m "not slow" \
	  --ignore=tests/ui $(PYTEST_ARGS)

# gunicorn behind a real nginx, worker, listener, PostgreSQL: SMTP in -> sink out (scripts/e2e.py).
e2e: setup
	$(BIN)/python scripts/e2e.py

# Every dashboard page at 1280x800 and 390x844, light and dark, into docs/screenshots/ (needs
# Debian's chromium; the browser tests use the same stack).
screenshots: setup
	$(BIN)/python scripts/screenshots.py

# wrk drives the HTTP suite (bench/suite_http.py; a slower Python client without it). The
# postfix suite installs Debian's postfix itself when it is missing and it may (root, apt).
# `make bench`: every suite at full scale (the figures of docs/PERFORMANCE.md, tens of minutes);
# `make bench-quick`: every suite at small scale, a few minutes.
bench: migrate
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1; } || true
	$(BIN)/python -m bench --scale full $(BENCH_ARGS)

bench-quick: migrate
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1; } || true
	$(BIN)/python -m bench --scale small $(BENCH_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache .hypothesis .mypy_cache .ruff_cache
