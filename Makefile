# The two commands of the README: `make run` (the main job) and `make test` (the tests).
# Both set everything up on a fresh machine first (scripts/setup.sh, idempotent).
PROMPT ?= What is the capital of France?

.PHONY: setup setup-test run test lint
setup:
	bash scripts/setup.sh

setup-test:
	bash scripts/setup.sh test

# The exact path (fp32 activations: the dequantised reference's tokens). With the default int8
# activations the default model's first token of this question is a near tie that int8 flips,
# as llama.cpp's numerics do (docs/BENCHMARKS.md, Quality).
run: setup
	.venv/bin/moeflow chat --exact-cpu-activations "$(PROMPT)"

lint: setup-test
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/pyright

test: lint
	.venv/bin/python -m pytest
