# Every target bootstraps .venv from nothing: only Python 3.11+ and pip are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/variflow demo

test: $(STAMP)
	$(BIN)/pytest

lint: $(STAMP)
	$(BIN)/ruff check worker webhooks sandbox migrations tests bench
	$(BIN)/ruff format --check worker webhooks sandbox migrations tests bench
	$(BIN)/mypy worker webhooks sandbox
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python bench/webhook_ingest.py
	$(BIN)/python bench/poll_sweep.py
	$(BIN)/python bench/job_cost.py
	$(BIN)/python bench/submit_rate.py
	$(BIN)/python bench/e2e_throughput.py

# The fault run (not part of `make test`): its own PostgreSQL and Redis, several minutes.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

clean:
	rm -rf $(VENV) .variflow .pytest_cache .mypy_cache .ruff_cache
