# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install the project into it (editable) when needed; the
# constraints file pins torch to the CPU build on this machine's disk.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ddm-installed
DEMO   ?= demo-out

.PHONY: install demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ddm demo --out $(DEMO)

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/prepare.py
	$(PY) bench/train.py
	$(PY) bench/sample.py
	$(PY) bench/serve.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(DEMO) .pytest_cache .ruff_cache
