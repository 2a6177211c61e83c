# Two entry points for a newcomer: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0

.PHONY: venv test test-engine test-gui demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[testing]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-engine: $(STAMP)
	$(PY) -m pytest -q tests/engine

test-gui: $(STAMP)
	$(PY) -m pytest -q tests/gui

bench: $(STAMP)
	$(PY) benchmarks/bench_sampler.py

clean:
	rm -rf $(VENV) build *.egg-info
