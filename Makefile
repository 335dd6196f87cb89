# The two commands a newcomer runs: `make run` and `make test`. Both install what they need
# into .venv first (once; again when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean-venv

install: $(STAMP)

# torch first, pinned: on these machines 2.13.0 is a CPU wheel on disk; an unpinned torch
# (or one pulled in by another package) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

run: install
	$(VENV)/bin/qlora run

# The report's browser test needs Chromium (Debian package); installed when we can.
test: install
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true; }
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks.run

clean-venv:
	rm -rf $(VENV)
