# `make demo` and `make test` each set up .venv on first use (Python 3.11), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export GLOG_v ?= 3

.PHONY: demo test docs bench venv clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) tools/demo.py --output outputs/demo

# Two workers, one file each at a time (module fixtures stay in one process), one kernel thread each: the suite
# fits the 2-core CI machine's time and each process's memory stays well under its 24 GB.
test: $(STAMP)
	PVT_DENSE_NUM_THREADS=1 OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist loadfile --durations=25

# The docs site (mkdocs + material, API pages from the docstrings) into site/; --strict fails on any warning, as
# tests/test_docs.py does in make test.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

# The side-by-side CPU benchmark against HuggingFace's PVT on torch (the [bench] extra); see tools/benchmark.py.
bench: $(STAMP)
	$(PY) -m pip install -e ".[bench]"
	$(PY) tools/benchmark.py --output outputs/benchmark

clean:
	rm -rf outputs site .pytest_cache
