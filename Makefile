# facert: `make demo` runs the main job, `make test` runs the suite. Both set themselves up.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.facert-installed

# The second test environment: transformers 4.57.1 and numpy<2, what NVIDIA's TensorRT-LLM 1.x pins
# and its Triton container ships (tests/constraints-tf457.txt). facert goes in with those as
# constraints, so the version-sensitive tests (tokenizer, prompt, preprocessing, checkpoints and
# transformers parity, TensorRT-LLM converter, native repository) run on both transformers lines.
# Its tritonserver stubs get their own tools folder: the stub environment points at one project env.
# The served tests run once, in the main environment (`-k "not served"` here: CI's 30 minutes).
VENV457 ?= .venv-tf457
PY457 := $(VENV457)/bin/python
STAMP457 := $(VENV457)/.facert-installed
TOOLS457 ?= tools-tf457
TESTS457 := tests/test_request_path.py tests/test_checkpoint.py tests/test_model_parity.py tests/test_real_checkpoints.py \
	tests/test_trtllm_convert.py tests/test_serving_repo.py

.PHONY: setup demo test test-tf457 clean

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

$(STAMP457): pyproject.toml tests/constraints-tf457.txt
	test -x $(PY457) || $(PYTHON) -m venv $(VENV457)
	$(VENV457)/bin/pip install -q --upgrade pip
	$(VENV457)/bin/pip install -q torch==2.13.0
	$(VENV457)/bin/pip install -q -c tests/constraints-tf457.txt transformers 'numpy<2'
	$(VENV457)/bin/pip install -q -c tests/constraints-tf457.txt -e '.[onnx,serve]' 'pytest>=8'
	$(PY457) -c "import transformers, numpy; assert transformers.__version__ == '4.57.1' and numpy.__version__ < '2', (transformers.__version__, numpy.__version__)"
	touch $(STAMP457)

test: setup test-tf457
	$(PY) -m pytest -q --durations=15 tests

test-tf457: setup $(STAMP457)
	mkdir -p $(TOOLS457)/.wheels && cp -n tools/.wheels/*.whl $(TOOLS457)/.wheels/ 2>/dev/null || true
	FACERT_TOOLS=$(CURDIR)/$(TOOLS457) $(PY457) -m pytest -q -p no:cacheprovider $(TESTS457) -k "not served"

clean:
	rm -rf $(VENV) $(VENV457) demo_out .pytest_cache tools $(TOOLS457)
