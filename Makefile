# The two commands a newcomer runs: `make run` and `make test`. Both install what they need
# into .venv first (once; again when pyproject.toml or a lock file changes), at the exact
# versions of requirements.lock (run time) and requirements-dev.lock (tests, lint).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast lint bench lock clean-venv

install: $(STAMP)

# llama-cpp-python (the GGUF export's engine) has no wheel on the registry: the first install
# builds it from source (~6-10 min on 2 cores), pip's wheel cache makes later ones seconds.
# Its converters come from the same source release, into .venv/share/llama.cpp.
# torch first, pinned: on these machines 2.13.0 is a CPU wheel on disk; an unpinned torch
# (or one pulled in by another package) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements.lock requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -r requirements.lock -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	$(PY) -m qlora.export.converters install
	touch $@

run: install
	$(VENV)/bin/qlora run

# The report's browser test needs Chromium (Debian package); installed when we can.
test: install
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true; }
	$(PY) -m pytest -q

# The unit tier for the edit loop: every subpackage's tests on tiny models made inside the
# tests, no run of the whole DAG, no servers (tests/integration/ holds those). `make test`
# stays the full suite CI runs.
test-fast: install
	$(PY) -m pytest -q tests/unit

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# After changing pyproject.toml's dependencies: resolve them afresh, then pin what was
# installed. The lock files are DVC dependencies: stages they affect become stale.
lock:
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m tools.lockfile

bench: install
	$(PY) -m benchmarks.train

clean-venv:
	rm -rf $(VENV)
