# Two entry points for a fresh machine: `make run` (main job) and `make test` (the suite).
# torch==2.13.0 is installed first so the project's torch range never pulls a multi-GB CUDA build;
# ray[default,train] and flwr[simulation] come in one pip call (the project's dependencies) so pip
# keeps packaging<26.
VENV ?= .venv
PY := $(VENV)/bin/python
MAIN_EXPERIMENT ?= experiments/central_vs_federated.toml

.PHONY: setup run test lint bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/fedsim run $(MAIN_EXPERIMENT)

# The venv's bin comes first on PATH: Flower and Ray start their helper programs by name.
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

bench: setup
	for script in benchmarks/*.py; do $(PY) $$script || exit 1; done
