PYTHON ?= python3
# every target installs what it needs into $(VENV) (`make docs VENV=.venv-docs`: another one)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: demo test install install-cli install-dev install-docs docs bench bench-quick lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip setuptools wheel -c $(CONSTRAINTS)

# An install is recorded by a stamp file in $(VENV): a target that needs it installs once, and
# again when pyproject.toml or constraints.txt change (the package itself is editable)
STAMP := $(VENV)/.entrokit-installed

install: $(STAMP)-base
install-cli: $(STAMP)-cli
install-dev: $(STAMP)-dev
install-docs: $(STAMP)-docs

# the extras of each install
EXTRAS_base :=
EXTRAS_cli := [cli]
EXTRAS_dev := [dev,bench,cli]
EXTRAS_docs := [docs]

$(STAMP)-%: pyproject.toml $(CONSTRAINTS) | $(PY)
	$(PIP) install -c $(CONSTRAINTS) -e ".$(EXTRAS_$*)"
	@touch $@

demo: install-cli
	$(VENV)/bin/entrokit demo

# one pytest-xdist worker per core, at most 4 (each runs torch on one thread; the KeOps tests
# share one worker: conftest.py). `make test PYTEST_WORKERS=0` runs the suite in one process.
PYTEST_WORKERS ?= logical
test: install-dev
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadgroup

# the Sphinx site (docs/_build/html); warnings are errors; the gallery runs examples/ --quick
docs: install-docs
	OMP_NUM_THREADS=1 $(VENV)/bin/sphinx-build -W --keep-going -b html docs docs/_build/html

# every suite of `entrokit bench` (sinkhorn, newton, smooth) at the sizes and time budgets of its
# committed table, one thread for every library as the tables were taken; the tables are written
# to $(BENCH_RESULTS) of this checkout (benchmarks/results/<suite>.md). Long but bounded: the anchors
# get up to 60 s per problem and the smooth suite kills an attempt at its budget of CPU time; about
# 2 h on an idle 2-core machine (benchmarks/README.md).
# One suite: `make bench BENCH_SUITES=newton`.
BENCH_RESULTS ?= benchmarks/results
BENCH_SUITES ?= sinkhorn newton smooth
bench: install-dev
	OMP_NUM_THREADS=1 $(VENV)/bin/entrokit bench --threads 1 --results $(BENCH_RESULTS) $(addprefix --suite ,$(BENCH_SUITES))

# the same suites at small sizes and short budgets, in minutes (benchmarks/results/<suite>_quick.md)
bench-quick: install-dev
	OMP_NUM_THREADS=1 $(VENV)/bin/entrokit bench --quick --threads 1 --results $(BENCH_RESULTS) $(addprefix --suite ,$(BENCH_SUITES))

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) .venv-docs build dist *.egg-info src/*.egg-info docs/_build docs/auto_examples docs/migration docs/api/generated
