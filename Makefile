# The two commands the README opens with: `make demo` and `make test`.
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 1

.PHONY: setup demo test lint check-protos protos unit image compose

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

# The container image (Docker engine from Debian, a locally built base image, no registry).
image:
	scripts/system-deps
	scripts/docker-setup
	scripts/build-base-image
	scripts/build-image

# a federation in containers: `docker compose up` on the committed docker-compose.yml
compose: image
	docker compose up

# Everything CI checks: lint, types, generated code current, the image, unit and integration
# tests (real processes, TLS, network namespaces, docker compose).
test: setup check-protos lint image
	$(PY) -m pytest -q -ra

unit: setup
	$(PY) -m pytest -q -m "not slow"

demo: setup
	scripts/demo
