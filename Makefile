# The README's two set-up commands: `make demo` (the γ-MoD pipeline on the embedded synthetic
# task) and `make test` (the whole suite). Both build .venv from requirements*.txt first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)

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
	$(PY) -m gmod_jax.demo --workdir runs/demo

test: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -n 2 -m "not slow" tests

bench: $(VENV)/.dev
	$(PY) -m gmod_jax.bench --config configs/bench_cpu.py --json runs/bench_cpu.json --markdown BENCHMARKS.md

clean:
	rm -rf runs .pytest_cache
