# The README's two set-up commands: `make demo` (the γ-MoD pipeline on the embedded synthetic
# task) and `make test` (the whole suite). Both build .venv from requirements*.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
# XLA's CPU runtime allocates each call's temporaries afresh, and glibc maps large blocks with
# 4 KiB pages: a demo train step touched ~435 MB of new pages (111k page faults, a fifth of its
# time). With this tunable glibc asks the kernel for transparent huge pages on those mappings
# (where THP is "madvise" or "always"; otherwise nothing changes). Same numbers, faster steps.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: demo test test-fast bench venv clean
venv: $(VENV)/.dev

demo: $(VENV)/.runtime
	$(PY) -m demo --workdir runs/demo

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 -m "not slow" tests

bench: $(VENV)/.dev
	$(PY) -m bench --config configs/bench_cpu.py --json runs/bench_cpu.json --markdown BENCHMARKS.md

clean:
	rm -rf runs .pytest_cache
