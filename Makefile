# Thin wrappers over the commands the README shows. `make run` and `make test` work on a fresh clone.
PY ?= python3

.PHONY: install install-dev run test lint pytest bench

install:
	$(PY) -m pip install -q -e .

install-dev:
	$(PY) -m pip install -q -e '.[dev]'

run: install
	classifier-gateway demo

test: install-dev lint pytest

lint:
	ruff check service tests bench
	mypy

pytest:
	$(PY) -m pytest -q

bench: install-dev
	$(PY) -m bench.overhead
	$(PY) -m bench.cache_hits
	$(PY) -m bench.batching
	$(PY) -m bench.upstream_transport
	$(PY) -m bench.redis_link
	$(PY) -m bench.factory_bench
