# Set-up is part of every target: `make test` and `make demo` build .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The real LLaMA-2 / Vicuna-v1.5 tokenizer, fetched at set-up and never committed (Llama 2 licence).
TOKENIZER := assets/llama2-tokenizer.json
WORDLLAMA := wordllama==0.4.0.post1

.PHONY: install eval-deps assets browser test demo app clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel. Never torchvision (it pulls a CUDA torch).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,app]"
	touch $(STAMP)

# lmms-eval for the evaluation backend (transformers_vgr.lmms_eval) and its tests: --no-deps, as its declared
# dependencies include torchvision (whose PyPI build replaces CPU torch); what it needs here is setup.cfg's `eval` extra.
LMMS_EVAL := lmms-eval==0.7.3
EVAL_STAMP := $(VENV)/.installed-eval

eval-deps: $(EVAL_STAMP)

$(EVAL_STAMP): $(STAMP)
	$(PIP) install -q -e ".[test,eval]"
	# lmms-eval itself without its declared dependencies (see above)
	$(PIP) install -q --no-deps $(LMMS_EVAL)
	touch $(EVAL_STAMP)

# The reference checkpoint's tokenizer is the LLaMA-2 one: restored from the fetched file, never committed.
CHECKPOINT := checkpoints/vgr-tiny

assets: $(TOKENIZER) $(CHECKPOINT)/tokenizer.json

$(TOKENIZER): | $(STAMP)
	mkdir -p assets/.download
	$(PIP) download -q --no-deps -d assets/.download $(WORDLLAMA)
	$(PY) -c "import sys, zipfile, glob; \
	z = zipfile.ZipFile(glob.glob('assets/.download/wordllama-*.whl')[0]); \
	open(sys.argv[1], 'wb').write(z.read('wordllama/tokenizers/l2_supercat_tokenizer_config.json'))" $@
	rm -rf assets/.download

$(CHECKPOINT)/tokenizer.json: $(TOKENIZER) | $(STAMP)
	$(PY) -c "import sys; from transformers_vgr.reference.train import restore_tokenizer; restore_tokenizer(*sys.argv[1:])" $(CHECKPOINT) $(TOKENIZER)

# The browser test's chromium and its driver (Debian's), installed when missing and apt can (as root); without them
# the test is skipped, or fails under CI (VGR_REQUIRE_ALL=1).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			chromium chromium-driver; } || echo "chromium / chromium-driver not installed: the browser test needs them"

test: $(STAMP) $(EVAL_STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json browser
	$(PY) -m pytest -q

demo: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) examples/demo.py

# The browser demo on VGR-Tiny: http://127.0.0.1:7860
app: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) -m transformers_vgr.app --model $(CHECKPOINT)

clean:
	rm -rf $(VENV) assets build src/*.egg-info

# Benchmarks (CPU, 10 to 15 min): results.json, results.md and latency_vs_size.png in benchmarks/results/. Not tests.
.PHONY: bench
bench: $(STAMP) $(TOKENIZER)
	$(PY) benchmarks/run.py

# The paper's shape on CPU (CLIP-L/14-336 + LLaMA-7B layers, 2 of 32 decoder layers run and scaled; 16.6 CPU-min):
# paper.json and paper.md in benchmarks/results/. Not part of `make bench`.
.PHONY: bench-paper
bench-paper: $(STAMP) $(TOKENIZER)
	$(PY) benchmarks/bench_paper.py

# One CUDA GPU, VGR-7B in bf16 (all 32 layers; under 5 min): gpu.json and gpu.md in benchmarks/results/.
.PHONY: bench-gpu
bench-gpu: $(STAMP) $(TOKENIZER)
	$(PY) benchmarks/bench_gpu.py
