# The two commands of the README: `make run` and `make test`. Both set up what they need first.
.PHONY: setup run test lint unit e2e bench bench-quick kubernetes

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

# Test files run two at a time (they wait on sandboxes more than they compute; more than two
# starve OpenCode's start-up on a 2-core machine), then the few that change what the others
# share, or load the machine, run alone.
test: setup lint kubernetes
	.venv/bin/pytest -n 2 --dist loadfile -m "not serial"
	.venv/bin/pytest -m serial

# The Kubernetes the kubernetes runtime's tests start (built once, then cached).
kubernetes:
	@scripts/kubernetes.sh build

bench: setup
	.venv/bin/python benchmarks/suite.py

bench-quick: setup
	.venv/bin/python benchmarks/suite.py --quick
