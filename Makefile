# The two commands of the README: `make run` and `make test`. Both set up what they need first.
.PHONY: setup run test lint unit e2e bench

setup:
	@scripts/setup.sh

run: setup
	.venv/bin/codestation serve

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

unit:
	.venv/bin/pytest tests/unit

e2e:
	.venv/bin/pytest tests/e2e

test: setup lint
	.venv/bin/pytest

bench: setup
	.venv/bin/python benchmarks/cold_start.py
