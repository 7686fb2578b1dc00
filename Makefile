# make          build the native kernel library
# make test     create .venv, install ggufrun + test deps + the llama.cpp oracle, run the tests
# make chat     chat with the default model (pulled on first use)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
NATIVE := native/build/libggufrun.so

.PHONY: all native venv test chat bench clean
all: native

native: $(NATIVE)
$(NATIVE): $(wildcard native/*.c native/*.h native/*.inc) native/Makefile
	$(MAKE) -C native

$(VENV)/.stamp: pyproject.toml scripts/build_oracle.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.oracle: $(VENV)/.stamp
	scripts/build_oracle.sh $(PY)
	touch $@

venv: $(VENV)/.stamp

test: $(VENV)/.oracle native
	$(VENV)/bin/pytest -q tests

chat: venv native
	$(VENV)/bin/ggufrun chat

bench: $(VENV)/.oracle native
	$(PY) bench/kernels.py

clean:
	$(MAKE) -C native clean
	rm -rf $(VENV) .pytest_cache
