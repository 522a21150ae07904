# Entry points. `make test` and `make bench` set themselves up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# pytest arguments, e.g. `make test PYTEST_ARGS="-k vocab -x"`
PYTEST_ARGS ?=

.PHONY: setup test lint bench clean-venv

setup: $(STAMP)

# Re-run the installer when what it installs changes.
$(STAMP): pyproject.toml tools/setup_env.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash tools/setup_env.sh
	@touch $@

lint: setup
	$(PY) -m ruff check megatron_lpreg tests bench tools

# Test files run in parallel (two workers); the tests of one file stay together
# because they share module-scoped multi-rank runs.
test: setup lint
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# Each benchmark prints one JSON document; bench/results/ holds measured runs.
bench: setup
	$(PY) bench/vocab_parallel.py
	$(PY) bench/convert.py

clean-venv:
	rm -rf $(VENV)
