"""Every backend is the one interface written in runtime/backends/base.py."""

from __future__ import annotations

import pytest

from runtime.backends.base import LLM, Components, Generator, SlotLLM, missing_members


def test_torch_and_onnxruntime_components_satisfy_the_interface(tiny_checkpoint, tmp_path):
    from export.build import Progress, build_engines
    from runtime.engines import open_components
    from runtime.pipeline import FacePipeline

    torch_c = FacePipeline.from_checkpoint(tiny_checkpoint).c
    ort_c = open_components(build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "e",
                                          progress=Progress(4, quiet=True)))
    for c in (torch_c, ort_c):
        assert isinstance(c, Components), type(c).__name__
        assert isinstance(c.llm, LLM) and isinstance(c.llm, SlotLLM), type(c.llm).__name__
        assert c.backend in ("torch", "onnxruntime")


@pytest.mark.parametrize("module,cls,protocol", [
    ("runtime.backends.torch_backend", "TorchComponents", Components),
    ("runtime.backends.onnxruntime_backend", "OrtComponents", Components),
    ("runtime.backends.onnxruntime_backend", "OrtLLM", LLM),
    ("runtime.backends.tensorrt_backend", "TensorRTComponents", Components),  # importable without TensorRT
    ("runtime.backends.tensorrt_backend", "TrtLLM", LLM),
    ("runtime.generate", "TorchLLM", LLM),
    ("runtime.generate", "TorchLLM", SlotLLM),
    ("runtime.backends.onnxruntime_backend", "OrtLLM", SlotLLM),
    ("runtime.backends.trtllm_backend", "TrtLlmGenerator", Generator),
])
def test_every_backend_class_defines_the_interface(module, cls, protocol):
    import importlib

    klass = getattr(importlib.import_module(module), cls)
    assert missing_members(klass, protocol) == [], f"{cls} lacks members of {protocol.__name__}"


def test_the_check_can_fail():
    class Half:
        backend = "x"

        def encode_image(self, pixel_values):
            return pixel_values

    assert "parse_face" in missing_members(Half, Components) and "llm" in missing_members(Half, Components)
