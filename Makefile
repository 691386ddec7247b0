# The two commands of the README: `make run` (the main job) and `make test` (the test suite).
# Both set everything up first (scripts/bootstrap.sh is idempotent).
PY := .venv/bin/python
ENV_ID ?= AutoSculpt-ResNet
ARGS ?=

.PHONY: setup run test lint format

setup:
	@bash scripts/bootstrap.sh

run: setup
	$(PY) agents/ppo_gnn.py --env-id $(ENV_ID) $(ARGS)

# the test files spread over the cores (one worker per core, at most 4), each file in one
# worker so that its module-scoped fixtures are built once
test: setup
	$(PY) -m pytest -q --durations=15 --numprocesses=auto --maxprocesses=4 --dist=loadfile $(ARGS)

lint: setup
	.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: setup
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .
