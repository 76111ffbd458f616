PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: demo test install install-cli install-dev bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel -c $(CONSTRAINTS)

install: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e .

install-cli: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[cli]"

install-dev: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev,bench,cli]"

demo: install-cli
	$(VENV)/bin/entrokit demo

test: install-dev
	$(PY) -m pytest -q

bench: install-dev
	$(VENV)/bin/entrokit bench

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info
