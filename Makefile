# Developer entry points. Services state lives in .local/, the virtualenv in .venv/.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv/bin
ENV := source .local/services.env &&
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup services browser test lint bench migrate run demo web stop-services clean

# Create .venv (Python 3.12+) and install requirements when they changed; the chart
# page's lightweight-charts into web/node_modules (npm ci) when its lock changed.
setup:
	scripts/setup_venv.sh
	scripts/setup_web.sh

# Debian's Chromium for the chart page's browser tests and bench (installed if missing).
browser: setup
	scripts/setup_web.sh browser

# Start/provision Redis Stack + PostgreSQL and write .local/services.env (no venv needed).
services:
	scripts/services.sh

# Run the test suite against the local services (plain PostgreSQL), then the suites
# marked storage_modes again on each TimescaleDB edition (skipped with FEED_TIMESCALEDB=off).
STORAGE_MODES ?= timescaledb-apache timescaledb-full
test: setup services browser
	$(ENV) $(VENV)/python -m pytest $(PYTEST_ARGS)
	$(ENV) if [ -z "$${TIMESCALEDB_URL:-}" ]; then echo "no TimescaleDB (FEED_TIMESCALEDB=off): storage modes not run"; \
	else for mode in $(STORAGE_MODES); do echo "== storage mode $$mode"; \
	FEED_TEST_STORAGE=$$mode $(VENV)/python -m pytest -m storage_modes $(PYTEST_ARGS); done; fi

# Static checks.
lint: setup
	$(VENV)/ruff check .

# Run every bench/*.py script.
bench: setup services browser
	$(ENV) for f in bench/*.py; do [ -e "$$f" ] || continue; echo "== $$f"; $(VENV)/python "$$f"; done

# Apply database migrations.
migrate: setup services
	$(ENV) $(VENV)/python feed_v4_main.py migrate

# Run the daemon against Binance itself (needs internet), with the local services' database.
# SYMBOLS from the environment, else BTCUSDT,ETHUSDT.
run: setup services
	$(ENV) SYMBOLS=$${SYMBOLS:-BTCUSDT,ETHUSDT} $(VENV)/python feed_v4_main.py

# The daemon against the built-in fake exchange (no internet), in its own database
# feed_v4_demo and Redis db 1, with progress every 2 s until Ctrl-C; the chart and read
# API on http://127.0.0.1:8080/ (the banner prints the link with its token).
# DEMO_ARGS: e.g. "--seconds 60", "--speed 300", "--fresh", "--web-port 0" (scripts/demo.py --help).
demo: setup services
	$(ENV) $(VENV)/python scripts/demo.py $(DEMO_ARGS)

# The read API and chart page (http://127.0.0.1:8080/) on the local services' data.
# Settings from the environment (WEB_PORT, WEB_TOKEN, ...: README, "Web chart and read API").
web: setup services
	$(ENV) $(VENV)/python feed_v4_main.py web

# Stop the Redis daemon and private PostgreSQL started by `make services`.
stop-services:
	scripts/services.sh stop

# Stop services, then remove .venv and .local.
clean: stop-services
	rm -rf .venv .local
