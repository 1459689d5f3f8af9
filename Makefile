# The two commands a new user needs: `make serve` and `make test` (see README.md).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve down status test lint bench

# The CPU build of torch goes in first so that resolving the project never pulls a multi-GB
# CUDA build; GPU users can install any torch in pyproject's range instead.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(VENV)/bin/app up

down: install
	$(VENV)/bin/app down

status: install
	$(VENV)/bin/app status

lint: install
	$(VENV)/bin/ruff check app tests benchmarks
	$(VENV)/bin/ruff format --check app tests benchmarks
	$(VENV)/bin/mypy

test: install lint
	$(VENV)/bin/app models build
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/http_bench.py
