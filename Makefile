# Two commands for a newcomer: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL ?=
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0

.PHONY: install demo test bench clean

# libtpu (the tpu extra, for compile-check's TPU topologies) would probe for a TPU at every JAX start here
demo test: export JAX_PLATFORMS ?= cpu

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,quant,tpu]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m cogstream_jax.demo $(if $(MODEL),--model_path $(MODEL),)

# two pytest workers, one test file each at a time (module fixtures run once); see tests/conftest.py for the order
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .cache
