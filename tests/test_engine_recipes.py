"""Build recipes (engines/*.toml) and `facert build`'s options: every tracked recipe loads and says
what its name says, `--recipe` drives a real build here (onnxruntime), options override it, and bad
recipes, mismatched checkpoints and precisions a backend cannot build are refused with the reason.
Also the GPU-side helpers whose logic runs without a GPU: default precisions, the vision plans'
batch limits, TensorRT 10 / 11 precision handling, 256-byte aligned TensorRT inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export.build import (BACKEND_PRECISIONS, build_engines, default_precision, half_precision,
                          vision_batch_limits)
from runtime.manifest import EngineError
from export.recipe import CONTAINER, load_recipe
from runtime.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "engines").glob("*.toml"))
MODELS = ("faceinsight-7b", "facellm-1b", "facellm-8b")


def test_one_recipe_per_served_model_and_backend():
    names = {p.stem for p in RECIPES}
    assert names == {f"{m}-{b}" for m in MODELS for b in ("onnxruntime", "tensorrt", "tensorrt-llm")}
    for path in RECIPES:
        r = load_recipe(path)
        model, backend = r["model"]["spec"], r["build"]["backend"]
        assert path.stem == f"{model}-{backend}"
        assert r["build"]["out"] == f"engines/{path.stem}"  # built folders land in the ignored engines/*/
        assert r["build"]["precision"] in BACKEND_PRECISIONS[backend]
        assert r["build"]["max_images"] >= 2  # face verification sends two faces in one prompt
        assert r["build"]["max_tiles"] == (1 if model.startswith("faceinsight") else 6)
        if backend != "onnxruntime":
            assert r["container"]["image"] == CONTAINER


def test_container_tag_matches_the_pins():
    """The recipes' container ships what pyproject's gpu extra and the second test environment pin."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    constraints = (ROOT / "tests" / "constraints-tf457.txt").read_text()
    assert "transformers==4.57.1" in constraints and "numpy<2" in constraints
    assert '"transformers>=4.57.1,<6"' in pyproject and '"tensorrt>=10.8,<12"' in pyproject
    assert CONTAINER == "nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3"  # TensorRT-LLM 1.1.0, TensorRT 10.13.3


def _recipe(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


GOOD = """
[model]
spec = "tiny"
checkpoint = "{ckpt}"
[build]
backend = "onnxruntime"
precision = "fp32"
max_batch = 3
max_images = 2
max_tiles = 1
max_new_tokens = 32
out = "{out}"
"""


def test_recipe_drives_a_build_and_options_override_it(tiny_checkpoint, tmp_path, capsys):
    recipe = _recipe(tmp_path, GOOD.format(ckpt=tiny_checkpoint, out=tmp_path / "from-recipe"))
    other = tmp_path / "overridden"
    assert main(["build", "--recipe", str(recipe), "--out", str(other), "--max-batch", "2"]) == 0
    manifest = json.loads((other / "manifest.json").read_text())
    assert manifest["model"]["limits"] == {"max_batch": 2, "max_new_tokens": 32, "max_images": 2, "max_tiles": 1}
    assert manifest["precision"] == "fp32" and not (tmp_path / "from-recipe").exists()
    capsys.readouterr()


@pytest.mark.parametrize("text,message", [
    ("[model]\nspec = 'tiny'\n[build]\nbackend = 'onnxruntime'\n", "build.precision is missing"),
    ("[model]\nspec = 'tiny'\n[build]\nbackend = 'cuda'\nprecision = 'fp32'\nmax_batch = 1\nmax_images = 1\n"
     "max_tiles = 1\n", "build.backend must be one of"),
    ("[model]\nspec = 'tiny'\n[build]\nbackend = 'onnxruntime'\nprecision = 'fp8'\nmax_batch = 1\nmax_images = 1\n"
     "max_tiles = 1\n", "is not one --backend onnxruntime builds"),
    ("[model]\nspec = 'tiny'\n[build]\nbackend = 'onnxruntime'\nprecision = 'int4'\nmax_batch = 1\nmax_images = 1\n"
     "max_tiles = 1\nblock_size = 24\n", "power of two"),
    ("[model]\nspec = 'tiny'\n[build]\nbackend = 'tensorrt'\nprecision = 'bf16'\nmax_batch = 0\nmax_images = 1\n"
     "max_tiles = 1\n", "build.max_batch must be >= 1"),
    ("[model]\nspec = 'tiny'\n[bild]\n", "unknown section"),
    ("[model]\nspec = 'tiny'\nlayers = 2\n", "unknown key model.layers"),
    ("[model]\nspec = 'tiny'\n[build]\nbackend = 'onnxruntime'\nprecision = 'fp32'\nmax_batch = '8'\n"
     "max_images = 1\nmax_tiles = 1\n", "build.max_batch must be int"),
    ("[model]\nspec = 'gpt-5'\n[build]\nbackend = 'onnxruntime'\nprecision = 'fp32'\nmax_batch = 1\n"
     "max_images = 1\nmax_tiles = 1\n", "is not a facert model"),
    ("[model\n", "not valid TOML"),
])
def test_bad_recipes_are_refused(tmp_path, capsys, text, message):
    with pytest.raises(EngineError, match=message):
        load_recipe(_recipe(tmp_path, text))
    assert main(["build", "--recipe", str(tmp_path / "r.toml"), "--checkpoint", "x", "--out", "y"]) == 2
    assert message.split()[0] in capsys.readouterr().err


def test_a_recipe_refuses_another_models_checkpoint(tiny_checkpoint, tmp_path, capsys):
    recipe = ROOT / "engines" / "facellm-1b-onnxruntime.toml"
    assert main(["build", "--recipe", str(recipe), "--checkpoint", str(tiny_checkpoint),
                 "--out", str(tmp_path / "x")]) == 2
    assert "is for 'facellm-1b' but" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main(["build", "--backend", "onnxruntime", "--out", str(tmp_path / "y")]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


def test_precisions_per_backend(tiny_checkpoint, tmp_path):
    assert default_precision("onnxruntime") == "fp32"
    assert default_precision("tensorrt", (9, 0)) == default_precision("tensorrt-llm", (8, 0)) == "bf16"
    assert default_precision("tensorrt-llm", (7, 5)) == half_precision((7, 5)) == "fp16"  # no bf16 before sm_80
    with pytest.raises(EngineError, match="int8 is for --backend onnxruntime or tensorrt-llm"):
        build_engines(tiny_checkpoint, "tensorrt", tmp_path / "x", precision="int8")
    with pytest.raises(EngineError, match="--max-images"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "x", max_images=0)


def test_vision_plans_take_every_image_and_tile_of_a_full_batch():
    from runtime.models.mllm import build_model
    from runtime.specs import get_spec

    facellm, tiny = build_model(get_spec("tiny-facellm")), build_model(get_spec("tiny"))
    assert vision_batch_limits(facellm, 4, 2, 6) == {"vision": 4 * 2 * 7, "parser": 8, "seg": 8, "attributes": 8}
    assert vision_batch_limits(tiny, 4, 2, 1)["vision"] == 8


def test_tensorrt_precision_handling_on_10_and_11():
    """TensorRT 10 has the weak-typing builder flags and gets them; TensorRT 11 removed them (strong
    typing only) and gets fp16/bf16 graphs converted by ModelOpt AutoCast instead; fp32 and Q/DQ fp8
    graphs build as typed on 11."""
    from export.tensorrt_build import TensorRTError, precision_plan

    trt10 = {"FP16", "BF16", "FP8", "INT8", "TF32", "OBEY_PRECISION_CONSTRAINTS", "REFIT"}
    trt11 = {"TF32", "REFIT", "STRIP_PLAN"}
    assert precision_plan(trt10, "fp16") == (["FP16"], None)
    assert precision_plan(trt10, "bf16") == (["BF16"], None)
    assert precision_plan(trt10, "fp8") == (["FP8", "FP16"], None)
    assert precision_plan(trt10, "fp32") == ([], None)
    assert precision_plan(trt11, "fp16") == ([], "fp16")
    assert precision_plan(trt11, "bf16") == ([], "bf16")
    assert precision_plan(trt11, "fp8") == ([], None)
    assert precision_plan(trt11, "fp32") == ([], None)
    with pytest.raises(TensorRTError, match="precision must be one of"):
        precision_plan(trt10, "int4")


def test_tensorrt_inputs_are_256_byte_aligned():
    from runtime.backends.tensorrt_backend import ADDRESS_ALIGNMENT, aligned

    base = torch.arange(4 * 300, dtype=torch.float32).reshape(4, 300)
    row = base[1]  # starts 1200 bytes into its storage: not a multiple of 256
    assert row.data_ptr() % ADDRESS_ALIGNMENT
    fixed = aligned(row)
    assert fixed.data_ptr() % ADDRESS_ALIGNMENT == 0 and torch.equal(fixed, row)
    assert aligned(fixed).data_ptr() == fixed.data_ptr()  # an aligned tensor is not copied
    transposed = aligned(base.t())
    assert transposed.is_contiguous() and transposed.data_ptr() % ADDRESS_ALIGNMENT == 0


def test_tensorrt_llm_runner_options_follow_the_installed_signature():
    """ModelRunnerCpp.from_dir gets gather_generation_logits (the executor refuses to return generation
    logits without it), the backend's own device and a bounded KV cache, where the installed
    TensorRT-LLM has those parameters; greedy sampling is top-k 1."""
    from runtime.backends.trtllm_backend import kv_cache_tokens, runner_options, sampling_options
    from runtime.generate import SamplingParams

    def from_dir_1x(engine_dir, *, rank=0, max_tokens_in_paged_kv_cache=None, kv_cache_free_gpu_memory_fraction=None,
                    device_ids=None, gather_generation_logits=False):
        """The parameters of TensorRT-LLM 1.x's ModelRunnerCpp.from_dir that facert sets."""

    def from_dir_old(engine_dir, *, rank=0, max_tokens_in_paged_kv_cache=None, kv_cache_free_gpu_memory_fraction=None):
        """An older runner without gather_generation_logits / device_ids."""

    build = {"max_batch_size": 4, "max_seq_len": 700}
    assert kv_cache_tokens(build) == 2800
    opts = runner_options(from_dir_1x, 1, build)
    assert opts == {"gather_generation_logits": True, "device_ids": [1], "max_tokens_in_paged_kv_cache": 2800,
                    "kv_cache_free_gpu_memory_fraction": 0.5}
    assert set(runner_options(from_dir_old, 0, build)) == {"max_tokens_in_paged_kv_cache",
                                                            "kv_cache_free_gpu_memory_fraction"}
    assert sampling_options(SamplingParams()) == {"top_k": 1, "top_p": 0.0, "temperature": 1.0}
    assert sampling_options(SamplingParams(temperature=0.5, top_p=0.8, seed=3)) == {
        "top_k": 0, "top_p": 0.8, "temperature": 0.5, "random_seed": 3}
