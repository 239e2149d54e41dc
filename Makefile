# Thin wrappers over the commands the README shows. `make run` and `make test` work on a fresh clone.
PY ?= python3

.PHONY: install install-uv install-torch install-infinity install-dev lock lock-files run test lint ruff mypy docs-build docs pytest bench

# Every install comes from the lock in requirements/ (hashes checked), and the project itself goes
# in last with --no-deps, so that pip never resolves a range on its own: what runs is what was
# tested. `make lock` is the one way to move the lock (docs/development.md).
PIP_LOCKED = $(PY) -m pip install -q --require-hashes --no-warn-conflicts
# uv installs the same hashed lock about 8x faster than pip: requirements/dev.txt into a fresh
# virtualenv took 39 s against 5 min 23 s (2 cores, 2026-12-07), which is most of what a clean CI
# run spent before its first test. uv itself comes from its own one-file lock (requirements/uv.txt),
# through pip. PyTorch stays with pip (install-torch): its CPU wheel is found through pip's
# find-links and PyTorch's CPU index, and uv reads neither pip's configuration nor that index.
UV_LOCKED = $(PY) -m uv pip install --python $(PY) -q --require-hashes

UV_OK = $(PY) -c "import importlib.metadata as m, re, sys; \
	sys.exit(m.version('uv') != re.search(r'^uv==(\S+)', open('requirements/uv.txt').read(), re.M)[1])"

install-uv:
	@$(UV_OK) 2>/dev/null || $(PIP_LOCKED) -r requirements/uv.txt

install: install-uv
	$(UV_LOCKED) -r requirements/base.txt
	$(PY) -m pip install -q --no-deps -e .

# The tests need the `encoder` extra (local-minilm) and so PyTorch, always the CPU build:
# requirements/torch.txt pins `torch==2.13.0+cpu` from PyTorch's CPU index (a `+cpu` build exists
# nowhere else, so no set-up can fall back to the multi-GB CUDA wheel). It goes in first and alone
# (--no-deps; its dependencies are in dev.txt), and only when missing, so that the other packages are
# never looked up on that index and a repeated `make test` does not ask it again.
TORCH_OK = $(PY) -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '2.13.0+cpu')"

install-torch:
	$(TORCH_OK) 2>/dev/null || $(PIP_LOCKED) --no-deps -r requirements/torch.txt

# Infinity, the real server the `infinity` upstream protocol is tested against, pins numpy<2,
# uvicorn<0.33 and sentence-transformers<4, which clash with ours: it gets its own virtualenv, from
# its own lock (requirements/infinity.txt). A .pth file puts *this* interpreter's site-packages
# after the virtualenv's own, so that the CPU PyTorch installed above is found and reused (nothing
# large is downloaded), in a virtualenv or not: `venv --system-site-packages` would point at the
# base interpreter instead, which inside a virtualenv has no torch, and pip then fetched ~5.6 GB of
# CUDA PyTorch. The virtualenv is rebuilt when its lock changes.
INFINITY_VENV = .venv-infinity

install-infinity: install-torch install-uv
	@if ! cmp -s requirements/infinity.txt $(INFINITY_VENV)/installed-from.txt; then \
		rm -rf $(INFINITY_VENV) && $(PY) -m venv $(INFINITY_VENV) \
		&& $(PY) -c "import site, sysconfig; print('\n'.join(dict.fromkeys([sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']])))" \
			> "$$($(INFINITY_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/zz-parent-site.pth" \
		&& $(PY) -m uv pip install --python $(INFINITY_VENV)/bin/python -q --require-hashes \
			--excludes requirements/infinity-excludes.txt -r requirements/infinity.txt \
		&& cp requirements/infinity.txt $(INFINITY_VENV)/installed-from.txt; \
	fi

install-dev: install-torch install-uv
	$(UV_LOCKED) -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -e .
	$(MAKE) --no-print-directory install-infinity PY=$(PY)

# Moves the lock to the newest releases that pyproject.toml's ranges and requirements/pins.txt
# allow, then runs lint and the whole suite on them. Drift shows up here, as a red `make lock`, and
# never as a red CI on an unrelated change. Commit requirements/ only when this passes.
UV_COMPILE = $(PY) -m uv pip compile --quiet $(UPGRADE) --generate-hashes --no-header \
	--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--find-links $(TORCH_WHEELS) -c requirements/pins.txt
# `make lock-files UPGRADE=` keeps every pin and only resolves what pyproject.toml added or changed
# (a new dependency in a feature branch); `make lock` always moves everything to the newest.
UPGRADE ?= --upgrade
# Where uv finds the CPU build of PyTorch: pip's own find-links where the machine sets one (ours
# carry the wheel on disk), else PyTorch's CPU index.
TORCH_WHEELS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)

lock:
	$(MAKE) lock-files UPGRADE=--upgrade
	$(MAKE) test

lock-files:
	$(MAKE) --no-print-directory install-uv PY=$(PY)
	$(UV_COMPILE) requirements/uv.in -o requirements/uv.txt
	$(UV_COMPILE) pyproject.toml --all-extras -o requirements/dev.txt
	$(UV_COMPILE) pyproject.toml -c requirements/dev.txt -o requirements/base.txt
	$(UV_COMPILE) pyproject.toml --extra encoder -c requirements/dev.txt -o requirements/encoder.txt
	$(UV_COMPILE) pyproject.toml --extra otel -c requirements/dev.txt -o requirements/otel.txt
	$(UV_COMPILE) pyproject.toml --extra cluster -c requirements/dev.txt -o requirements/cluster.txt
	$(UV_COMPILE) pyproject.toml --extra tracking -c requirements/dev.txt -o requirements/tracking.txt
	$(UV_COMPILE) requirements/infinity.in -o requirements/infinity.txt
	( printf '%s\n' '# Written by `make lock`: dev.txt'"'"'s PyTorch alone, the CPU build, from its own index.' \
		'# `pip install --no-deps -r requirements/torch.txt` (the Makefile, the Dockerfile).' \
		'--extra-index-url https://download.pytorch.org/whl/cpu' \
		&& awk '/^torch==/ {p = 1; print; next} p && /^ +--hash/ {print; next} {p = 0}' requirements/dev.txt ) \
		> requirements/torch.txt

run: install
	classifier-gateway demo

# mypy beside the tests, not before them: mypy --strict on a fresh cache takes 1.5-3 min of one
# core (it reads torch, ray and transformers), and the tests leave about half a core idle while they
# wait on servers (147% CPU through a 2-worker run, 7 Dec). No --output-sync: it would hold pytest's
# progress until the end; mypy prints once, when it is done. Either failing fails `make test`.
test: install-dev docs-build ruff
	$(MAKE) --no-print-directory -j 2 mypy pytest

lint: docs-build ruff mypy

ruff:
	ruff check service tests bench

mypy:
	mypy

# The docs site (docs/, mkdocs.yml). --strict turns a broken link, a missing anchor or a page left out
# of the navigation into a failure; do not add --quiet, which hides those warnings and so passes.
docs-build:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

docs:
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve --dev-addr 127.0.0.1:8001

# Two workers (pytest-xdist), each taking whole test files (--dist loadfile), so that a module's
# servers start once. Half the suite's time waits on servers, processes and sockets, with a core
# idle (vmstat: ~45% idle through a serial run); docs/development.md has the figures.
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2

pytest:
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=30

bench: install-dev
	$(PY) -m bench.overhead
	$(PY) -m bench.cache_hits
	$(PY) -m bench.batching
	$(PY) -m bench.upstream_transport
	$(PY) -m bench.redis_link
	$(PY) -m bench.faults
	$(PY) -m bench.protocols
	$(PY) -m bench.shadow
	$(PY) -m bench.quota
	$(PY) -m bench.factory_bench
	$(PY) -m bench.minilm_bench
	$(PY) -m bench.export_fidelity
	$(PY) -m bench.factory_replicas
