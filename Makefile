# Two commands do all the set-up on a fresh machine:
#   make quickstart   builds .venv if missing, then trains the embedded default end to end
#   make test         builds .venv if missing, then runs the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: quickstart test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/preftune quickstart

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) output
