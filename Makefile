# `make demo`: set up and run the demo pipeline. `make test`: set up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-full test clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) run_pipeline.py --config configs/demo.yaml --stages cam,refine,seg

demo-full: setup
	$(PY) run_pipeline.py --config configs/demo.yaml --mode full --stages seg

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs data/demo
