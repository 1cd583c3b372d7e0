# attnlab: `make bench` runs the default benchmark suite and writes its report;
# `make test` runs the whole test suite. Both create .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install browser test bench lint clean

install: $(STAMP)

# Headless Chromium opens the HTML reports in the tests (Debian's package; needs root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "chromium is not installed and this is not root: the browser tests will be skipped"; fi; }

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,hf,report,analysis]'
	# peers for `attnlab bench speed --peers` and their tests, pinned and without dependency
	# resolution so that nothing can replace torch 2.13.0 (NATTEN builds pure Python on CPU)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps einops natten==0.21.7 local-attention==1.11.2 \
	  linear-attention-transformer==0.19.1 hyper-connections==0.4.11 torch-einops-utils==0.2.0 \
	  axial-positional-embedding==0.3.12 linformer==0.2.3 product-key-memory==0.3.0 colt5-attention==0.11.2
	touch $(STAMP)

test: $(STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

bench: $(STAMP)
	$(VENV)/bin/attnlab bench

lint: $(STAMP)
	$(VENV)/bin/ruff check attnlab tests

clean:
	rm -rf $(VENV) attnlab-results
