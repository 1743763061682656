# Two commands do all set-up on a fresh machine: `make run` and `make test`.
# Set-up installs requirements.lock (exact versions, hashes) and resolves nothing; `make lock` refreshes the lock.
VENV    ?= .venv
PY      := $(VENV)/bin/python
UV      := $(VENV)/bin/uv
LOCK    := requirements.lock
STAMP   := $(VENV)/.fedguard-installed
PYTHON  ?= python3
# torch's CPU wheel (the lock pins 2.13.0+cpu, which PyPI does not carry): on disk on this machine kind; elsewhere
# `make TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch`.
export TORCH_FIND_LINKS ?= /opt/wheels
export FEDGUARD_CACHE ?= $(CURDIR)/.cache/fedguard
# pytest runs on two xdist workers (pyproject.toml's addopts); `make test PYTEST_ARGS="-n 0"` runs in one process.
PYTEST_ARGS ?=
# uv ignores pip's machine-wide configuration; pip (which only bootstraps uv) is told to as well.
# --compile-bytecode: every test subprocess, Ray worker and SuperNode imports torch and transformers; from
# bytecode that is ~2.5x faster than from source (where PYTHONDONTWRITEBYTECODE is set, nothing caches it later).
UV_SYNC := $(UV) pip sync --quiet --python $(PY) --require-hashes --compile-bytecode --find-links $(TORCH_FIND_LINKS)
PIP_BOOT := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= $(PY) -m pip install --quiet --disable-pip-version-check

.DEFAULT_GOAL := setup
.PHONY: setup run test test-fast test-latest test-oldest lock wheel bench clean

$(STAMP): pyproject.toml $(LOCK)
	@$(PYTHON) tools/lockfile.py check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/lockfile.py extract uv > $(VENV)/uv.txt
	$(PIP_BOOT) --no-deps --require-hashes -r $(VENV)/uv.txt
	$(UV_SYNC) $(LOCK)
	# uv's own locked wheel into uv's cache too (pip bootstrapped uv), so every locked package installs offline later
	$(UV) venv --quiet $(VENV)/uv-prime && $(UV) pip install --quiet --python $(VENV)/uv-prime --no-deps --require-hashes -r $(VENV)/uv.txt
	rm -rf $(VENV)/uv-prime
	# fedguard itself, editable; no build isolation, so its build backend comes from the lock too.
	$(UV) pip install --quiet --python $(PY) --no-deps --no-build-isolation --offline --compile-bytecode -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/fedguard sweep configs/default.yaml

test: setup
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# The suite on the newest (test-latest) or oldest (test-oldest) releases pyproject.toml's ranges admit, in a venv
# of its own, so a break shows up before a user meets it. Not in CI: it resolves at install time by design.
# torch stays the CPU wheel on disk (a newer torch from PyPI is a CUDA build).
test-latest test-oldest: test-%: setup
	rm -rf .venv-$*
	$(PYTHON) -m venv .venv-$*
	$(UV) pip install --quiet --compile-bytecode --python .venv-$*/bin/python --find-links $(TORCH_FIND_LINKS) \
	    $(if $(filter oldest,$*),--resolution lowest-direct,) '$(shell $(PYTHON) tools/lockfile.py pinned torch)' -e '.[dev]'
	$(UV) pip install --quiet --python .venv-$*/bin/python --no-deps $(shell $(PYTHON) tools/lockfile.py pinned no-deps)
	$(UV) pip list --python .venv-$*/bin/python | grep -iE '^(torch|transformers|peft|flwr|accelerate|opacus) '
	.venv-$*/bin/python -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

lock:
	$(PYTHON) tools/lockfile.py refresh

wheel: setup
	$(UV) build --quiet --python $(PY) --no-build-isolation --wheel --out-dir dist

bench: setup
	$(PY) benchmarks/bench_local_training.py
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_memory.py
	$(PY) benchmarks/bench_privacy.py
	$(VENV)/bin/fedguard probe build configs/default.yaml --out .cache/bench-probe
	$(PY) benchmarks/bench_defense_overhead.py --probe .cache/bench-probe

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .cache runs dist
