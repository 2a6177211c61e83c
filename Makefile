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

# `make demo`: napari with the phantom, the bundled model and the widget, ready to press Sample.
# `make demo DEMO_SCREENSHOT=out.png`: one full sampling pass, a screenshot of the whole
# window, exit 0 (under Xvfb automatically when there is no display).
DEMO_SCREENSHOT ?=
XVFB := $(if $(DISPLAY)$(WAYLAND_DISPLAY),,xvfb-run -a -s "-screen 0 1600x1000x24")

demo: $(STAMP)
ifeq ($(strip $(DEMO_SCREENSHOT)),)
	$(PY) -m napari_berdiff.demo
else
	$(XVFB) $(PY) -m napari_berdiff.demo --screenshot $(DEMO_SCREENSHOT)
endif

bench: $(STAMP)
	$(PY) benchmarks/bench_sampler.py

clean:
	rm -rf $(VENV) build *.egg-info
