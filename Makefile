# Developer entry points. Services state lives in .local/, the virtualenv in .venv/.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := .venv/bin
ENV := source .local/services.env &&
PYTEST_ARGS ?=

.PHONY: setup services test lint bench migrate stop-services clean

# Create .venv (Python 3.12+) and install requirements when they changed.
setup:
	scripts/setup_venv.sh

# Start/provision Redis Stack + PostgreSQL and write .local/services.env (no venv needed).
services:
	scripts/services.sh

# Run the test suite against the local services.
test: setup services
	$(ENV) $(VENV)/python -m pytest $(PYTEST_ARGS)

# Static checks.
lint: setup
	$(VENV)/ruff check .

# Run every bench/*.py script.
bench: setup services
	$(ENV) for f in bench/*.py; do [ -e "$$f" ] || continue; echo "== $$f"; $(VENV)/python "$$f"; done

# Apply database migrations.
migrate: setup services
	$(ENV) $(VENV)/python feed_v4_main.py migrate

# Stop the Redis daemon and private PostgreSQL started by `make services`.
stop-services:
	scripts/services.sh stop

# Stop services, then remove .venv and .local.
clean: stop-services
	rm -rf .venv .local
