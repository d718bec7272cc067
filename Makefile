# lowbit: `make test` (the CI command) and `make demo`. Both create .venv on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: test demo bench install clean

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a looser pin pulls a multi-GB CUDA build on a machine without torch
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q
	# On a CUDA machine the run above skips the interpreter tier: run it with the GPU hidden.
	@if $(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		CUDA_VISIBLE_DEVICES= $(PY) -m pytest -q -m interp; fi

demo: $(STAMP)
	# matplotlib for the rate-distortion plot (optional: the demo prints the table without it)
	$(PY) -m pip install -q -e '.[demo]' || echo "demo extras not installed; continuing without the plot"
	$(VENV)/bin/lowbit demo

bench: $(STAMP)
	$(PY) -m pytest benchmarks -q --benchmark-only

clean:
	rm -rf $(VENV) build *.egg-info lowbit-demo
