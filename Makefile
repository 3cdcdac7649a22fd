# The two commands the README opens with: `make demo` and `make test`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test lint check-protos protos unit

setup:
	@scripts/setup

protos: setup
	$(PY) scripts/gen_protos.py

check-protos: setup
	$(PY) scripts/gen_protos.py --check

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

# Everything CI checks: lint, types, generated code current, unit and integration tests.
test: setup check-protos lint
	$(PY) -m pytest -q -ra

unit: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	scripts/demo
