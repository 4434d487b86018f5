# Set-up is part of every target: a fresh machine needs only `make demo` or `make test`.
# torch is pinned and installed first so that pip takes the local CPU wheel and never pulls CUDA builds.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mvmm-installed

.PHONY: venv demo test bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/mvmm demo --out demo-output --force

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist worksteal

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/em_speed.py

clean:
	rm -rf $(VENV) demo-output
