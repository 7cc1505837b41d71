# Every target bootstraps .venv from nothing: only Python 3.11+ and pip are needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench chaos clean lock

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet -e clients/python
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/variflow demo

test: $(STAMP)
	$(BIN)/pytest

# clients/python is checked with its own settings (its pyproject.toml): a separate distribution.
lint: $(STAMP)
	$(BIN)/ruff check worker webhooks sandbox migrations tests bench
	$(BIN)/ruff format --check worker webhooks sandbox migrations tests bench
	$(BIN)/mypy worker webhooks sandbox
	$(BIN)/lint-imports
	$(BIN)/ruff check clients/python
	$(BIN)/ruff format --check clients/python
	$(BIN)/mypy --strict --config-file clients/python/pyproject.toml clients/python/src clients/python/tests

bench: $(STAMP)
	$(BIN)/python bench/webhook_ingest.py
	$(BIN)/python bench/api_submit.py
	$(BIN)/python bench/poll_sweep.py
	$(BIN)/python bench/job_cost.py
	$(BIN)/python bench/submit_rate.py
	$(BIN)/python bench/e2e_throughput.py
	$(BIN)/python bench/capacity.py

# The fault run (not part of `make test`): its own PostgreSQL and Redis, several minutes.
chaos: $(STAMP)
	$(BIN)/python bench/chaos.py

# The image's pins (Dockerfile: pip install --require-hashes): every runtime dependency of
# pyproject.toml, with hashes, for Python 3.11 on any platform. Versions already pinned are
# kept; run after changing [project.dependencies] (a unit test says when it is stale).
lock: $(STAMP)
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command "make lock" --quiet -o requirements.lock

clean:
	rm -rf $(VENV) .variflow .pytest_cache .mypy_cache .ruff_cache
