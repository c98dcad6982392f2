# One command to set up and run each main job. The virtual environment is created on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup serve test test-fast bench demo clean

$(VENV)/.installed: requirements-lock.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-lock.txt
	$(PY) -m pip install -q --no-deps -r requirements-demo.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# The C++ kernels compile here, not on the first request (cached by content under ~/.cache/openlora).
$(VENV)/.kernels: $(VENV)/.installed $(wildcard openlora/kernels/csrc/*) openlora/kernels/build.py
	$(PY) -m openlora.kernels.build
	touch $@

# anvil (the local EVM node) from npm into ~/.cache/openlora/evm; npm itself from apt if it is missing.
$(VENV)/.anvil: $(VENV)/.installed
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq npm)
	$(PY) -m openlora.chain.anvil
	touch $@

# Debian's Chromium for the Open Chat browser tests (Playwright drives it; it never downloads a browser).
$(VENV)/.chromium:
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

setup: $(VENV)/.installed $(VENV)/.kernels $(VENV)/.anvil $(VENV)/.chromium

serve: setup  ## serve the demo model and adapters (or ARGS="--model PATH ...") on 127.0.0.1:8000
	$(VENV)/bin/openlora serve $(ARGS)

test: setup  ## lint, then the whole test suite (what CI runs), with the 20 slowest tests listed
	$(VENV)/bin/ruff check openlora tests bench scripts
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 $(ARGS)

test-fast: setup  ## the suite without the tests marked slow (real processes, browser, chain, demo model)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not bench" $(ARGS)

bench: setup  ## base-model throughput vs transformers
	$(PY) bench/throughput.py $(ARGS)

demo: setup
	$(VENV)/bin/openlora demo

clean:
	rm -rf $(VENV) build *.egg-info
