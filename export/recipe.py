"""Build recipes: engines/NAME.toml, one per served model and backend, read by `facert build --recipe`.

A recipe says how a served model's engines are built, so the same engines come out of every
build and a reviewer can see the limits they serve (tracked in git; the built folders are not):

    [model]
    spec = "facellm-1b"                   # the model (runtime/specs.py); the checkpoint must match it
    checkpoint = "checkpoints/facellm-1b"  # default --checkpoint (`facert init --model facellm-1b` makes one)

    [build]
    backend = "tensorrt-llm"              # onnxruntime | tensorrt | tensorrt-llm
    precision = "bf16"                    # export.build.BACKEND_PRECISIONS
    max_batch = 8                         # requests per batch
    max_images = 2                        # images per request
    max_tiles = 6                         # InternVL tiles per image (1 for LLaVA)
    max_new_tokens = 512
    block_size = 32                       # onnxruntime int8/int4 only: weights per quantization block
    out = "engines/facellm-1b-tensorrt-llm"

    [container]                           # where the GPU engines are built and served (README: GPU)
    image = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"
    tensorrt_llm = "1.1.0"
    tensorrt = "10.13.3"

Command-line options given explicitly override the recipe's values.
"""

from __future__ import annotations

import sys
from pathlib import Path

from runtime.manifest import EngineError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

SECTIONS = {
    "model": {"spec": str, "checkpoint": str},
    "build": {"backend": str, "precision": str, "max_batch": int, "max_images": int, "max_tiles": int,
              "max_new_tokens": int, "block_size": int, "out": str},
    "container": {"image": str, "tensorrt_llm": str, "tensorrt": str},
}
REQUIRED = {"model": ("spec",), "build": ("backend", "precision", "max_batch", "max_images", "max_tiles")}
# The Triton + TensorRT-LLM container whose versions facert's pins match (pyproject's `gpu` extra,
# tests/constraints-tf457.txt): TensorRT-LLM 1.1.0, TensorRT 10.13.3, torch 2.9, transformers 4.57.1.
CONTAINER = "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"


def load_recipe(path: str | Path) -> dict:
    """The recipe at `path` as {section: {key: value}}, checked: known sections and keys, their types,
    the required ones present, and values the build accepts. Errors name the file and the key."""
    from export.build import BACKEND_PRECISIONS, BACKENDS

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"recipe {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise EngineError(f"recipe {path} is not valid TOML: {e}") from None
    for section, values in data.items():
        if section not in SECTIONS:
            raise EngineError(f"recipe {path}: unknown section [{section}] (known: {', '.join(SECTIONS)})")
        if not isinstance(values, dict):
            raise EngineError(f"recipe {path}: [{section}] must be a table")
        for key, value in values.items():
            want = SECTIONS[section].get(key)
            if want is None:
                raise EngineError(f"recipe {path}: unknown key {section}.{key} "
                                  f"(known: {', '.join(SECTIONS[section])})")
            if not isinstance(value, want) or isinstance(value, bool):
                raise EngineError(f"recipe {path}: {section}.{key} must be {want.__name__}, got {value!r}")
    for section, keys in REQUIRED.items():
        for key in keys:
            if key not in data.get(section, {}):
                raise EngineError(f"recipe {path}: {section}.{key} is missing")
    build = data["build"]
    if build["backend"] not in BACKENDS:
        raise EngineError(f"recipe {path}: build.backend must be one of {', '.join(BACKENDS)}, got {build['backend']!r}")
    if build["precision"] not in BACKEND_PRECISIONS[build["backend"]]:
        raise EngineError(f"recipe {path}: build.precision {build['precision']!r} is not one --backend "
                          f"{build['backend']} builds ({', '.join(BACKEND_PRECISIONS[build['backend']])})")
    for key in ("max_batch", "max_images", "max_tiles", "max_new_tokens"):
        if key in build and build[key] < 1:
            raise EngineError(f"recipe {path}: build.{key} must be >= 1, got {build[key]}")
    if "block_size" in build:
        from export.quantize import check_block_size

        try:
            check_block_size(build["block_size"])
        except EngineError as e:
            raise EngineError(f"recipe {path}: build.block_size: {e}") from None
    from runtime.specs import SPEC_NAMES

    if data["model"]["spec"] not in SPEC_NAMES:
        raise EngineError(f"recipe {path}: model.spec {data['model']['spec']!r} is not a facert model "
                          f"({', '.join(SPEC_NAMES)})")
    return data


def recipe_build_args(recipe: dict) -> dict:
    """build_engines keyword arguments from a loaded recipe (checkpoint and out included when it has them)."""
    build = recipe["build"]
    out = {k: build[k] for k in ("backend", "precision", "max_batch", "max_images", "max_tiles", "max_new_tokens",
                                 "block_size", "out") if k in build}
    if "checkpoint" in recipe["model"]:
        out["checkpoint"] = recipe["model"]["checkpoint"]
    return out


def check_checkpoint_spec(recipe: dict, checkpoint_config: dict, path) -> None:
    """A recipe built for one model refuses a checkpoint of another."""
    want, got = recipe["model"]["spec"], checkpoint_config.get("spec")
    if got is not None and got != want:
        raise EngineError(f"recipe {path} is for {want!r} but the checkpoint is {got!r}")
