# Set-up is part of every target: `make test` and `make demo` build .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
# The real LLaMA-2 / Vicuna-v1.5 tokenizer, fetched at set-up and never committed (Llama 2 licence).
TOKENIZER := assets/llama2-tokenizer.json
WORDLLAMA := wordllama==0.4.0.post1
# transformers' own common test mixins (ModelTesterMixin, ConfigTester, ProcessorTesterMixin,
# ImageProcessingTestMixin), unpacked from the sdist of the installed transformers version; never committed.
TRANSFORMERS_TESTS := assets/transformers-tests/.unpacked

.PHONY: install eval-deps assets test demo clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the local CPU wheel. Never torchvision (it pulls a CUDA torch).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
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

assets: $(TOKENIZER) $(CHECKPOINT)/tokenizer.json $(TRANSFORMERS_TESTS)

$(TOKENIZER): | $(STAMP)
	mkdir -p assets/.download
	$(PIP) download -q --no-deps -d assets/.download $(WORDLLAMA)
	$(PY) -c "import sys, zipfile, glob; \
	z = zipfile.ZipFile(glob.glob('assets/.download/wordllama-*.whl')[0]); \
	open(sys.argv[1], 'wb').write(z.read('wordllama/tokenizers/l2_supercat_tokenizer_config.json'))" $@
	rm -rf assets/.download

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

$(CHECKPOINT)/tokenizer.json: $(TOKENIZER) | $(STAMP)
	$(PY) -c "import sys; from transformers_vgr.reference.train import restore_tokenizer; restore_tokenizer(*sys.argv[1:])" $(CHECKPOINT) $(TOKENIZER)

test: $(STAMP) $(EVAL_STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json $(TRANSFORMERS_TESTS)
	$(PY) -m pytest -q

demo: $(STAMP) $(TOKENIZER) $(CHECKPOINT)/tokenizer.json
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) assets build src/*.egg-info

# Benchmarks (CPU, 10 to 15 min): results.json, results.md and latency_vs_size.png in benchmarks/results/. Not tests.
.PHONY: bench
bench: $(STAMP) $(TOKENIZER)
	$(PY) benchmarks/run.py
