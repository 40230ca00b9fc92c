# Two entry points: `make demo` (the main job on Fashion-MNIST) and `make test` (the test suite).
# Each installs what it needs: a virtual environment in .venv and the Fashion-MNIST files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed

.PHONY: demo test test-slow lint install data clean-demo reproduce mutation

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "error: the pinned requirements need Python 3.11 or newer, $(PYTHON) is " + sys.version.split()[0] + "; run make PYTHON=python3.11 (or newer)")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

data: $(STAMP)
	PY=$(PY) bash scripts/setup_fmnist.sh

test: $(STAMP) data
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q

# Defects a linter finds (unused imports, undefined names, ...; the rules are in ruff.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check --no-cache code tests benchmarks

# The slow tier: stress tests of sharded runs and other long checks (marker `slow`).
test-slow: $(STAMP) data
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -q -m slow

# Mutation testing of core, sequential, the method steps and certify_c's input path (docs/MUTATION.md);
# GROUPS="core catrs" picks some. Each group's report: .mutation/GROUP/summary.txt.
DEV_STAMP := $(VENV)/.dev-requirements-installed
GROUPS ?=

$(DEV_STAMP): requirements-dev.txt $(STAMP)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(DEV_STAMP)

mutation: $(DEV_STAMP) data
	$(PY) scripts/mutation.py $(GROUPS)

demo: $(STAMP) data
	PY=$(PY) bash scripts/demo.sh

# The paper's Fashion-MNIST table with the project's own runs (hours to days of CPU; resumable, see README).
reproduce: $(STAMP) data
	PY=$(PY) bash scripts/reproduce.sh fmnist

clean-demo:
	rm -rf demo
