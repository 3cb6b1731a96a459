# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-slow demo bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: setup
	$(VENV)/bin/pytest

test-slow: setup
	$(VENV)/bin/pytest -m slow

demo: setup
	$(VENV)/bin/dapt demo

bench: setup
	$(PY) bench/prepare.py
