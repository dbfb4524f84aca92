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

test: install-dev
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
