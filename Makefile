# Quick start: `make demo` and `make test`. Both create .venv on first use and install into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The test oracle needs PyTorch on the CPU. torch==2.13.0 is a real PyPI release; on these build
# machines pip takes it from a CPU wheel on local disk. Elsewhere override it, e.g.
#   make test TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2 --durations=25

.PHONY: demo test test-fast clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.core: pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.core

demo: $(VENV)/.core
	$(VENV)/bin/jaxinfer generate "In the beginning"

test: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(VENV)/.test
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
