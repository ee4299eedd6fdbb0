"""Engines folders: open one (verified against its manifest) as components or as a FacePipeline.

    pipe = open_pipeline("engines/demo", backend="onnxruntime")
    answer = pipe.ask(image_bytes, "Is this person smiling?")

Opening checks the folder first (runtime.manifest.verify): the manifest, the backend and target
it was built for, the sha256 of every file (cached between runs by file identity; FACERT_VERIFY=full or
verify_mode="full" reads every byte) and the shapes of every graph. Anything wrong is
refused with an EngineError that names the file and the check.
"""

from __future__ import annotations

from pathlib import Path

from runtime.manifest import EngineError, read_manifest, verify
from runtime.backends import BACKENDS, open_components as _backend_components, target_for

__all__ = ["EngineError", "open_components", "open_pipeline", "verify_engines"]


def verify_engines(path: str | Path, backend: str = "onnxruntime", check_hashes: bool = True,
                   verify_mode: str | None = None) -> dict:
    """The manifest of an engines folder that `backend` can run here, or an EngineError.

    verify_mode: "cached" (files unchanged since their last full hash are not read again) or "full";
    default $FACERT_VERIFY, else cached (runtime.file_hashes says what each guarantees)."""
    if backend not in BACKENDS:
        raise EngineError(f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if read_manifest(path)["backend"] != backend:  # before target_for, which may need a GPU to answer
        verify(path, backend=backend, check_hashes=False)  # raises, naming both backends
    return verify(path, backend=backend, target=target_for(backend), check_hashes=check_hashes,
                  verify_mode=verify_mode)


def open_components(path: str | Path, backend: str = "onnxruntime", device: str = "cpu",
                    verify_files: bool = True, verify_mode: str | None = None, **options):
    """The components object (encode_image, parse_face, seg_tokens, attributes, llm) of an engines folder."""
    manifest = verify_engines(path, backend, check_hashes=verify_files, verify_mode=verify_mode)
    return _backend_components(backend, Path(path), manifest, device, **options)


def open_pipeline(path: str | Path, backend: str = "onnxruntime", device: str = "cpu", **options):
    """A FacePipeline over an engines folder: the folder's own tokenizer and config, no checkpoint needed."""
    from runtime.pipeline import FacePipeline
    from runtime.tokenizer import load_tokenizer

    components = open_components(path, backend, device, **options)
    limits = read_manifest(path)["model"].get("limits", {})
    if backend == "onnxruntime":  # dynamic shapes: no capacity fixed at build time
        return FacePipeline(components, load_tokenizer(Path(path)))
    # TensorRT profiles and the TensorRT-LLM prompt table hold what the build was sized for
    return FacePipeline(components, load_tokenizer(Path(path)), max_images=limits.get("max_images"),
                        tile_limit=limits.get("max_tiles"))
