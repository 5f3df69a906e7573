# make test: install into .venv (first time only) and run the test suite on CPU.
# make demo: the whole pipeline end to end on the embedded samples (DATA=../shared/data for real corpora).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	PY=$(PY) ./demo.sh

clean:
	rm -rf $(VENV) .pytest_cache
