# The README's two commands. Both create .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# the serve extra too: `energon serve` is the README's next step after the demo
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing energon-jax and its dependencies into $(VENV) (jax, flax, transformers: a few minutes the first time)"
	$(BIN)/pip install -q -e ".[serve]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "installing energon-jax with its dev extras into $(VENV) (a few minutes the first time)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/python examples/demo.py

# 2 workers, one test file at a time each (--dist loadfile: a file's module fixtures, such as a
# served model, are built once). Each worker is a jax process with 8 simulated devices, a few GB:
# the default, 0, runs the suite in one process: a clean-clone run on 2 workers had 2 signal tests
# fail (a handler left by an earlier test in the worker; tests/conftest.py now restores them), not yet re-verified.
TEST_WORKERS ?= 0

test: install-dev
	$(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) tests

clean:
	rm -rf $(VENV) build *.egg-info
