# attnlab: `make bench` runs the default benchmark suite and writes its report (installing only what it
# needs: torch, attnlab with the report's dependencies, the bench's peers); `make test` runs the whole test
# suite (installing the test and lint tools, the Hugging Face and analysis extras, and every peer). Both
# create .venv when needed and say what they install as they go.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check
TORCH := torch==2.13.0
# the peers `attnlab bench` compares with (attnlab/bench/cli.py QUICK_PEERS: linear-attention-transformer, and
# flex, which is torch's) and their imports, pinned and without dependency resolution so that nothing can replace
# torch 2.13.0
BENCH_PEERS := einops local-attention==1.11.2 linear-attention-transformer==0.19.1 hyper-connections==0.4.11 \
  torch-einops-utils==0.2.0 axial-positional-embedding==0.3.12 linformer==0.2.3 product-key-memory==0.3.0 \
  colt5-attention==0.11.2
# the other peers, for `attnlab bench speed --peers` and their tests (NATTEN builds pure Python on CPU; timm's
# layers import with the torchvision stand-in of tests/conftest.py; labml-nn's Primer, dual-attention's relational
# attention; torch-geometric's pure-Python convolutions and point-transformer-pytorch for sets and graphs;
# perceiver-pytorch and slot-attention for latents; transformer-lens for the MAPS and QK-decomposition checks, with
# the imports `import transformer_lens` needs), then the imports they need that nothing else installs
TEST_PEERS := natten==0.21.7 timm==1.0.31 dual-attention==0.0.7 labml-nn==0.5.1 labml==0.5.3 \
  torch-geometric==2.8.1 point-transformer-pytorch==0.1.5 perceiver-pytorch==0.11.0 slot-attention==1.5.2 \
  xxhash==4.1.0 psutil==7.2.2 requests==2.34.2 urllib3==2.8.0 certifi==2026.10.19.post1 idna==3.21 \
  einx==0.4.3 frozendict==2.5.1 vector-quantize-pytorch==1.32.0 loguru==0.7.3 \
  ring-attention-pytorch==0.5.20 beartype==0.23.1 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
  transformer-lens==4.3.0 accelerate==1.15.0 datasets==5.2.0 multiprocess==0.70.19 dill==0.4.1 pandas==3.1.1 \
  pyarrow==26.0.1
BENCH_STAMP := $(VENV)/.bench-stamp
TEST_STAMP := $(VENV)/.test-stamp

.PHONY: install browser test bench bench-inference lint clean

install: $(TEST_STAMP)

$(PY):
	@echo "== make: creating $(VENV) with $(PYTHON)"
	$(PYTHON) -m venv $(VENV)

$(BENCH_STAMP): pyproject.toml | $(PY)
	@echo "== make bench [1/3]: $(TORCH) (the largest download)"
	$(PIP) $(TORCH)
	@echo "== make bench [2/3]: attnlab, editable, with the report's dependencies (matplotlib, jinja2, tqdm) and numba (compiled CPU loops)"
	$(PIP) -e '.[report,cpu]'
	@echo "== make bench [3/3]: the bench's peers: $(BENCH_PEERS)"
	$(PIP) --no-build-isolation --no-deps $(BENCH_PEERS)
	touch $@

$(TEST_STAMP): $(BENCH_STAMP)
	@echo "== make test [1/2]: test and lint tools, the hf and analysis extras"
	$(PIP) -e '.[dev,hf,report,analysis,cpu]'
	@echo "== make test [2/2]: the other peers: $(TEST_PEERS)"
	$(PIP) --no-build-isolation --no-deps $(TEST_PEERS)
	touch $@

# Headless Chromium opens the HTML reports in the tests (Debian's package; needs root).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then echo "== make: installing chromium (apt)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	    else echo "chromium is not installed and this is not root: the browser tests will be skipped"; fi; }

test: $(TEST_STAMP) browser
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

bench: $(BENCH_STAMP)
	@echo "== make bench: attnlab bench (speed, peers, recall, report; docs/bench.md)"
	$(VENV)/bin/attnlab bench

# the inference and sharded-decoding measurements (docs/bench.md; Loki reads MiniLM from the hf extra): each
# writes its rows to the results store, then the report shows them
bench-inference: $(TEST_STAMP)
	@echo "== make bench-inference [1/4]: tree vs ring decode over 2, 4, 8 gloo processes (benchmarks/distributed_decode.py)"
	$(PY) benchmarks/distributed_decode.py
	@echo "== make bench-inference [2/4]: P004 MatryoshkaKV fidelity vs compression (benchmarks/matryoshka_kv.py)"
	$(PY) benchmarks/matryoshka_kv.py
	@echo "== make bench-inference [3/4]: P027 Loki key rank and top-k recall (benchmarks/loki.py)"
	$(PY) benchmarks/loki.py
	@echo "== make bench-inference [4/4]: the report"
	$(VENV)/bin/attnlab report

# mypy on the core, the kernels and the family bases that drive them (pyproject.toml: the layers above are read, not reported)
lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check attnlab tests
	$(VENV)/bin/mypy attnlab/core attnlab/kernels attnlab/mechanisms/linear/base.py \
	  attnlab/mechanisms/sparse/base.py attnlab/mechanisms/local/base.py

clean:
	rm -rf $(VENV) attnlab-results
