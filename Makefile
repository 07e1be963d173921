# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both set everything up on a fresh machine first (scripts/setup.sh, idempotent).
PROMPT ?= What is the capital of France?

.PHONY: setup setup-test run test lint
setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh test

run: setup
	.venv/bin/moeflow chat "$(PROMPT)"

lint: setup-test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/pyright

test: lint
	.venv/bin/python -m pytest
