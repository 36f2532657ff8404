# `make test` and `make demo` set themselves up on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

# Re-run the install whenever the package metadata changes.
$(STAMP): pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[dev,dali]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m hqclip_fast.demo

lint: setup
	$(PY) -m ruff check hqclip_fast kernels recaption benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache
