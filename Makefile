# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both set everything up on a fresh machine first (scripts/setup.sh, idempotent).
PROMPT ?= What is the capital of France?

.PHONY: setup run test lint
setup:
	bash scripts/setup.sh

run: setup
	.venv/bin/moeflow chat "$(PROMPT)"

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/pyright

test: lint
	.venv/bin/python -m pytest
