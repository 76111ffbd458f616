PYTHON ?= python3
# every target installs what it needs into $(VENV) (`make docs VENV=.venv-docs`: another one)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: demo test install install-cli install-dev install-docs docs bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel -c $(CONSTRAINTS)

install: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e .

install-cli: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[cli]"

install-dev: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[dev,bench,cli]"

install-docs: $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".[docs]"

demo: install-cli
	$(VENV)/bin/entrokit demo

test: install-dev
	$(PY) -m pytest -q

# the Sphinx site (docs/_build/html); warnings are errors; the gallery runs examples/ --quick
docs: install-docs
	OMP_NUM_THREADS=1 $(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

bench: install-dev
	$(VENV)/bin/entrokit bench

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) .venv-docs build dist *.egg-info src/*.egg-info docs/_build docs/auto_examples docs/migration docs/api/generated
