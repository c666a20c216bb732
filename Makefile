# vllm-wideep developer commands. Every target installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= .cache/demo
MODEL_DIR ?= models/tiny-dsv3-tasks

.PHONY: install demo model eval test test-quick test-slow lint bench bench-serve clean

# Returns at once when the venv is up to date with pyproject.toml and the repair script.
install: $(STAMP)

$(STAMP): pyproject.toml tools/fix_cpu_venv.py $(wildcard patches/*.patch)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0+cpu first: pip takes the CPU build that lies on this disk.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[cpu,test,tools,ray]'
	$(PY) tools/fix_cpu_venv.py
	# The repository's development code (tools/, benchmarks/) importable in this venv only;
	# the installed package is vllm_wideep alone.
	$(PY) -c "import pathlib, sysconfig; pathlib.Path(sysconfig.get_paths()['purelib'], 'vllm_wideep_repo.pth').write_text('$(CURDIR)\n')"
	$(PY) -c "import vllm, vllm_wideep; print('vllm', vllm.__version__, 'ok')"
	touch $(STAMP)

demo: install
	$(PY) examples/demo.py --model $(MODEL_DIR) --workdir $(DEMO_DIR)

# Retrain the tiny DeepSeek-V3 of the accuracy checks (deterministic from the seed: one thread,
# deterministic algorithms; two short runs give the same bytes, tests/unit/test_accuracy.py).
model: install
	$(PY) -m tools.accuracy.train $(MODEL_DIR)

# lm-eval on the trained model: stock vLLM against wide EP (table in docs/accuracy.md).
eval: install
	$(PY) -m tools.accuracy.eval --model $(MODEL_DIR)

# The whole suite (CI runs this).
test: install
	$(PY) -m pytest -q -rs --durations=25 tests

# Everything but the end-to-end tests that start vLLM engines and servers.
test-quick: install
	$(PY) -m pytest -q -rs -m "not slow" tests

test-slow: install
	$(PY) -m pytest -q -rs -m slow tests

# Stock vLLM (TP 1, TP 2) against --enable-wideep at EP 2 on the tiny qwen3_moe, vLLM's
# benchmark client at 2, 8 and unbounded requests/s (docs/benchmarks.md).
bench-serve: install
	$(PY) benchmarks/serve.py

# ruff, and the import contracts of pyproject.toml (the package's layers, no cycles).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
