# attnlab: `make bench` runs the default benchmark suite and writes its report;
# `make test` runs the whole test suite. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,hf,report,analysis]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15

bench: $(STAMP)
	$(VENV)/bin/attnlab bench

lint: $(STAMP)
	$(VENV)/bin/ruff check attnlab tests

clean:
	rm -rf $(VENV) attnlab-results
