# `make demo` and `make test` work on a fresh clone: each creates .venv and installs what it needs.
PY      ?= python3
VENV    := .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(PYTHON) -m pytest

.PHONY: demo test lint test-fast zoo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[test,bench,digits,plot,timm,transformers,accelerate,lightning]"
	touch $(STAMP)

# Train and prune a ResNet on the built-in digits data: table, compact model, gate picture, latency.
demo: $(STAMP)
	$(VENV)/bin/fxprune demo --out out/demo

# The linter and the type checker on the library, the unit, property and docstring tests, then the zoo
# sweeps (every torchvision classifier and a sample of timm's, numerically checked).
test: lint
	$(PYTEST) -q -m "not zoo"
	$(PYTEST) -q -m zoo

lint: $(STAMP)
	$(VENV)/bin/ruff check fxprune passes
	$(VENV)/bin/mypy

test-fast: $(STAMP)
	$(PYTEST) -q -m "not zoo"

zoo: $(STAMP)
	$(VENV)/bin/fxprune zoo
	$(VENV)/bin/fxprune zoo --source timm

bench: $(STAMP)
	$(VENV)/bin/fxprune bench analyze

clean:
	rm -rf $(VENV) build *.egg-info out
