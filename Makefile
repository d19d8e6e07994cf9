# `make demo` and `make test` each set up .venv on first use (Python 3.11), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export GLOG_v ?= 3

.PHONY: demo test bench venv clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --output outputs/demo

test: $(STAMP)
	$(PY) -m pytest tests --durations=25

# The side-by-side CPU benchmark against HuggingFace's PVT on torch (the [bench] extra); see tools/benchmark.py.
bench: $(STAMP)
	$(PY) -m pip install -e ".[bench]"
	$(PY) tools/benchmark.py --output outputs/benchmark

clean:
	rm -rf outputs .pytest_cache
