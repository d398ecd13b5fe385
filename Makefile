# Elemta: `make run` starts everything, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha1sum requirements.txt | cut -c1-12)
export FLASK_APP := wsgi.py

.PHONY: setup migrate run test bench e2e screenshots clean

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $(STAMP)

setup: $(STAMP)

migrate: setup
	$(BIN)/flask db upgrade

run: migrate
	$(BIN)/python scripts/run_all.py

# Lint first (seconds): style drift fails the suite like a broken test.
test: setup
	$(BIN)/flake8 app tests bench scripts migrations wsgi.py gunicorn.conf.py
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# gunicorn behind a real nginx, worker, listener, PostgreSQL: SMTP in -> sink out (scripts/e2e.py).
e2e: setup
	$(BIN)/python scripts/e2e.py

# Every dashboard page at 1280x800 and 390x844, light and dark, into docs/screenshots/ (needs
# Debian's chromium; the browser tests use the same stack).
screenshots: setup
	$(BIN)/python scripts/screenshots.py

# wrk drives the HTTP suite (bench/suite_http.py; a slower Python client without it).
bench: migrate
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -q wrk >/dev/null 2>&1; } || true
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache .hypothesis
