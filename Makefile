# Two commands set everything up on a fresh machine: `make demo` and `make test`.
# Both install the Debian packages they need when missing (as root; otherwise they print
# the exact `sudo apt-get install` line and stop with exit 2), create .venv and install the
# project into it (editable) when needed; the constraints file pins torch to the CPU build
# on this machine's disk.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.ddm-installed
DEMO   ?= demo-out
# Fashion-MNIST (the demo's data, many tests) and Prometheus (`ddm stack`, the demo, tests)
DEBIAN_PACKAGES := dataset-fashion-mnist prometheus

.PHONY: install system-packages demo test bench lint clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $@

install: $(STAMP)

system-packages:
	@missing=""; \
	for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" \
	    || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq$$missing; \
	  else \
	    echo "error: missing Debian packages:$$missing; run: sudo apt-get install -y$$missing" >&2; \
	    exit 2; \
	  fi; \
	fi

demo: system-packages $(STAMP)
	$(VENV)/bin/ddm demo --out $(DEMO)

test: system-packages $(STAMP)
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
