# facert: `make demo` runs the main job, `make test` runs the suite. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.facert-installed

.PHONY: setup demo test clean

# tritonserver 2.51 for `facert serve` and the tests: unpacked from the nvidia-pytriton wheel into
# tools/ (not installed: its Python package pins numpy<2); idempotent, a second run does nothing.
setup: $(STAMP)
	$(PY) -m runtime.serving.server

# torch==2.13.0 goes in first: here it is the local CPU wheel, on a user's machine the CUDA build;
# the project's torch range is met by it, so pip installs nothing bigger afterwards.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

# demo checkpoint -> onnxruntime engines -> model repository -> tritonserver -> streamed answer over gRPC
demo: setup
	$(VENV)/bin/facert demo

test: setup
	$(PY) -m pytest -q --durations=15 tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache tools
