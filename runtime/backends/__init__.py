"""Backends that run an engines folder (built by `facert build`) behind the components interface.

Each backend module is imported only when it is asked for, so the heavy or GPU-only ones
(TensorRT, TensorRT-LLM) cost nothing where they are not installed. `target_for` says which
target an engines folder must have been built for to run here: ONNX graphs are built for "cpu"
(portable; the CUDA and TensorRT providers of onnxruntime-gpu run them too), TensorRT plans for
the GPU architecture they were built on ("sm_90").
"""

from __future__ import annotations

BACKENDS = ("onnxruntime", "tensorrt")


def target_for(backend: str) -> str:
    if backend == "onnxruntime":
        return "cpu"
    if backend == "tensorrt":
        from runtime.manifest import EngineError
        from runtime.backends.tensorrt_backend import TensorRTError, device_target

        try:
            return device_target()
        except TensorRTError as e:  # no GPU here: say so as a refusal, like any other mismatch
            raise EngineError(f"TensorRT engines cannot run here: {e}") from None
    raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")


def open_components(backend: str, engines_dir, manifest: dict, device: str, **options):
    """The components object of `backend` over a verified engines folder."""
    if backend == "onnxruntime":
        from runtime.backends.onnxruntime_backend import OrtComponents

        return OrtComponents(engines_dir, manifest, device, **options)
    if backend == "tensorrt":
        from runtime.backends.tensorrt_backend import TensorRTComponents

        return TensorRTComponents(engines_dir, manifest, device="cuda" if device in ("cpu", "auto") else device)
    raise ValueError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
