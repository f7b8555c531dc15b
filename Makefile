# `make demo`: set up and run the demo pipeline. `make test`: set up and run every test (CI);
# `make test-fast`: the tests that run no pipeline stage end to end (under a minute).
# `make lint`: ruff over the tree (pyproject.toml's settings).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo demo-full test test-fast lint lock clean

# requirements.txt says what is needed; requirements.lock pins every package to the versions
# the recorded results were measured with. The project itself is installed in editable mode,
# without dependencies, so that `pipeline`, `stages` and `tools` import from anywhere.
$(VENV)/.installed: requirements.txt requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(PY) run_pipeline.py --config configs/demo.yaml --stages cam,refine,seg

demo-full: setup
	$(PY) run_pipeline.py --config configs/demo.yaml --mode full --stages seg

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not e2e" tests

lint: setup
	$(VENV)/bin/ruff check .

# Re-resolve requirements.txt to the newest versions in a scratch venv and pin them.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install --quiet --upgrade pip
	.venv-lock/bin/pip install --quiet -r requirements.txt
	{ head -n 2 requirements.lock; .venv-lock/bin/pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .venv-lock

clean:
	rm -rf runs data/demo
