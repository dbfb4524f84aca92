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

# TEST_WORKERS=0 (the default) runs the suite in one process. TEST_WORKERS=2 runs it on 2 pytest-xdist
# workers, a test file each (--dist loadfile: a file's module fixtures, such as a served model, are
# built once); each worker is a jax process with 8 simulated devices, a few GB. Not the default yet:
# a clean-clone run on 2 workers had 2 signal tests fail (a handler left by an earlier test in the
# worker; tests/conftest.py now restores them), not re-verified since.
TEST_WORKERS ?= 0

test: install-dev
	$(BIN)/python -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile) tests

clean:
	rm -rf $(VENV) build *.egg-info
