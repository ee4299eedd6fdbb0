# facert: `make demo` runs the main job, `make test` runs the suite. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.facert-installed

.PHONY: setup demo test clean

setup: $(STAMP)

# torch==2.13.0 goes in first: here it is the local CPU wheel, on a user's machine the CUDA build;
# the project's torch range is met by it, so pip installs nothing bigger afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/facert demo

test: setup
	$(PY) -m pytest -q -x --durations=15 tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache
