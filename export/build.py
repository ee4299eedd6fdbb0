"""`facert build`: a checkpoint -> an engines folder for one backend, with its manifest.

  onnxruntime   the ONNX graphs (export/onnx_export.py), fp32
  tensorrt      the same ONNX graphs built into TensorRT plans (export/tensorrt_build.py)
  tensorrt-llm  the vision/parser/seg/attribute graphs as TensorRT plans, and the LLM as a
                TensorRT-LLM checkpoint + engine (export/trtllm_convert.py) whose prompt table
                holds max_batch x (image + seg tokens) rows

Every folder also gets the checkpoint's config.json and tokenizer files, so it runs on its own,
and manifest.json (export/manifest.py) with the hashes that loading verifies.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from export.manifest import FORMAT, FORMAT_VERSION, EngineError, tool_versions, write_manifest

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-llm")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_NEW_TOKENS = 512
MAX_TEXT_TOKENS = 512  # prompt text around the image/seg tokens (chat template + question), for TensorRT-LLM


class Progress:
    """Build steps on stderr: a tqdm bar on a terminal, plain timestamped lines otherwise."""

    def __init__(self, total: int, quiet: bool = False):
        self.t0 = time.perf_counter()
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="step", desc="facert build")

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(message[:60])
            self.bar.write(f"[facert build] {message}", file=sys.stderr)
        else:
            print(f"[facert build {time.perf_counter() - self.t0:6.1f}s] {message}", file=sys.stderr, flush=True)

    def step(self, message: str) -> None:
        self(message)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def build_command(checkpoint, backend, out, precision, max_batch, max_new_tokens) -> str:
    return shlex.join(["facert", "build", "--checkpoint", str(checkpoint), "--backend", backend,
                       "--precision", precision, "--max-batch", str(max_batch),
                       "--max-new-tokens", str(max_new_tokens), "--out", str(out)])


def _check_args(backend: str, precision: str, max_batch: int, out: Path, force: bool) -> None:
    if backend not in BACKENDS:
        raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend == "onnxruntime" and precision != "fp32":
        # fp16 graphs need onnxruntime-gpu's CUDA provider (the CPU provider lacks fp16 kernels for
        # most of these ops), bf16/fp8 are TensorRT's: the onnxruntime engines stay fp32.
        raise EngineError(f"--backend onnxruntime builds fp32 graphs only; {precision} is for "
                          "--backend tensorrt or tensorrt-llm")
    if max_batch < 1:
        raise EngineError(f"--max-batch must be >= 1, got {max_batch}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EngineError(f"{out} exists and is not empty; pass --force to replace it")


def _copy_standalone_files(checkpoint: Path, config: dict, tokenizer, out: Path) -> dict[str, str]:
    """config.json (the model spec) and the tokenizer files; returns {file: sha256}."""
    from runtime.checkpoint import sha256_file

    src = checkpoint / "config.json"
    if config.get("format") == "facert-checkpoint":
        shutil.copy2(src, out / "config.json")
    else:  # llava-hf / InternVL: the spec facert read from it, in facert's format
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    before = {p.name for p in out.iterdir()}
    tokenizer.save_pretrained(str(out))
    names = ["config.json"] + sorted({p.name for p in out.iterdir()} - before)
    return {name: sha256_file(out / name) for name in names}


def build_engines(checkpoint: str | Path, backend: str, out: str | Path, precision: str = "fp32",
                  max_batch: int = DEFAULT_MAX_BATCH, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  simplify: bool = True, force: bool = False, command: str | None = None,
                  progress: Progress | None = None) -> Path:
    """Build an engines folder at `out`; returns its path."""
    from runtime.checkpoint import checkpoint_hash, load_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    _check_args(backend, precision, max_batch, out, force)
    if backend != "onnxruntime":
        _require_gpu_toolchain(backend)  # before minutes of export that could not be built
    steps = {"onnxruntime": 4, "tensorrt": 5, "tensorrt-llm": 6}[backend]
    progress = progress or Progress(steps)
    t0 = time.perf_counter()
    try:
        progress.step(f"loading {checkpoint} (verifying its checksums)")
        model, tokenizer, config = load_checkpoint(checkpoint, dtype="fp32")
        source = {"path": str(checkpoint.resolve()), "sha256": checkpoint_hash(checkpoint),
                  "spec": config.get("spec"), "family": config["family"]}
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        _build_into(out, model, tokenizer, config, checkpoint=checkpoint, source=source, backend=backend,
                    precision=precision, max_batch=max_batch, max_new_tokens=max_new_tokens, simplify=simplify,
                    command=command, progress=progress, t0=t0)
    except BaseException:
        if out.is_dir() and not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # no half-built folder left behind
        raise
    finally:
        progress.close()
    return out


def _build_into(out: Path, model, tokenizer, config: dict, *, checkpoint: Path, source: dict, backend: str,
                precision: str, max_batch: int, max_new_tokens: int, simplify: bool, command: str | None,
                progress: Progress, t0: float) -> None:
    """The build proper, into the fresh folder `out`."""
    from export.onnx_export import export_onnx, llm_layout

    work = out if backend == "onnxruntime" else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    progress.step(f"exporting ONNX graphs (opset 17{', onnxslim' if simplify else ''})")
    components = export_onnx(model, work, simplify=simplify, progress=progress)
    for entry in components.values():
        entry.setdefault("precision", "fp32")
        if entry["kind"] == "onnx":
            entry["target"] = "cpu"
    spec_model = {
        "family": model.family, "vocab_size": model.vocab_size,
        "num_image_tokens": model.num_image_tokens, "num_seg_tokens": model.num_seg_tokens,
        "num_classes": config["parser"]["num_classes"] if model.num_seg_tokens else None,
        "llm": llm_layout(model),
        "limits": {"max_batch": max_batch, "max_new_tokens": max_new_tokens},
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend, "target": "cpu",
                "precision": precision, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_command": command or build_command(checkpoint, backend, out, precision, max_batch,
                                                          max_new_tokens),
                "source": source, "tools": tool_versions(), "exporter": "torch.onnx.export(dynamo=False)",
                "spec": config, "model": spec_model}
    onnx_manifest = {**manifest, "backend": "onnxruntime", "components": components}

    if backend == "tensorrt":
        progress.step(f"building TensorRT plans ({precision})")
        manifest["components"] = _tensorrt_plans(onnx_manifest, work, out, precision, max_batch, progress)
    elif backend == "tensorrt-llm":
        progress.step(f"building TensorRT plans for the vision side ({precision})")
        vision_side = {k: v for k, v in components.items() if not k.startswith("llm_")}
        manifest["components"] = _tensorrt_plans({**onnx_manifest, "components": vision_side}, work, out,
                                                 precision, max_batch, progress)
        progress.step("converting the LLM to a TensorRT-LLM checkpoint and building its engine")
        manifest["components"]["llm"] = _trtllm_engine(model, config, out, precision, max_batch,
                                                       max_new_tokens, progress)
    else:
        manifest["components"] = components
    if work != out:
        shutil.rmtree(work)
    if backend != "onnxruntime":
        targets = {e.get("target") for e in manifest["components"].values() if e.get("kind") != "npy"}
        manifest["target"] = ",".join(sorted(t for t in targets if t)) or "cpu"
        manifest["tools"] = tool_versions("tensorrt", "tensorrt-llm", "tensorrt_llm")

    progress.step("copying config.json and the tokenizer; writing manifest.json (sha256 of every file)")
    manifest["files"] = _copy_standalone_files(checkpoint, config, tokenizer, out)
    manifest["build_seconds"] = round(time.perf_counter() - t0, 1)
    write_manifest(out, manifest)
    progress(f"wrote {out} in {manifest['build_seconds']} s")


def _require_gpu_toolchain(backend: str) -> None:
    """Fail fast, saying what to install, where TensorRT (or TensorRT-LLM) or a GPU is missing."""
    try:
        from export.tensorrt_build import device_target, require_tensorrt
    except ModuleNotFoundError as e:
        if e.name != "export.tensorrt_build":
            raise
        raise EngineError("this facert has no TensorRT builder (export/tensorrt_build.py)") from None
    require_tensorrt()
    device_target()
    if backend == "tensorrt-llm":
        try:
            from export.trtllm_convert import require_tensorrt_llm
        except ModuleNotFoundError as e:
            if e.name != "export.trtllm_convert":
                raise
            raise EngineError("this facert has no TensorRT-LLM converter (export/trtllm_convert.py)") from None
        require_tensorrt_llm()


def _tensorrt_plans(onnx_manifest: dict, onnx_dir: Path, out: Path, precision: str, max_batch: int,
                    progress) -> dict:
    try:
        from export.tensorrt_build import build_plans
    except ModuleNotFoundError as e:
        if e.name != "export.tensorrt_build":
            raise
        raise EngineError("this facert has no TensorRT builder (export/tensorrt_build.py)") from None
    return build_plans(onnx_manifest, onnx_dir, out, precision, max_batch, progress)


def _trtllm_engine(model, config: dict, out: Path, precision: str, max_batch: int, max_new_tokens: int,
                   progress) -> dict:
    try:
        from export import trtllm_convert
    except ModuleNotFoundError as e:
        if e.name != "export.trtllm_convert":
            raise
        raise EngineError("this facert has no TensorRT-LLM converter (export/trtllm_convert.py)") from None
    ckpt = trtllm_convert.convert_checkpoint(model, config, out / "trtllm_checkpoint", dtype=precision)
    prompt_rows = model.num_image_tokens + model.num_seg_tokens
    engine_dir = trtllm_convert.build_engine(
        ckpt, out / "llm_engine", max_batch=max_batch, max_input_len=prompt_rows + MAX_TEXT_TOKENS,
        max_output_len=max_new_tokens,
        max_prompt_embedding_table_size=trtllm_convert.prompt_table_size(model, max_batch), progress=progress)
    shutil.rmtree(ckpt)  # the engine is what runs; the checkpoint can be rebuilt from the source
    files = sorted(str(p.relative_to(out)) for p in Path(engine_dir).rglob("*") if p.is_file())
    main = str((Path(engine_dir) / "rank0.engine").relative_to(out))
    return {"file": main, "kind": "tensorrt-llm-engine", "data_files": [f for f in files if f != main],
            "precision": precision, "max_batch": max_batch, "max_input_len": prompt_rows + MAX_TEXT_TOKENS,
            "max_output_len": max_new_tokens, "prompt_table_rows": trtllm_convert.prompt_table_size(model, max_batch),
            "target": _gpu_target()}


def _gpu_target() -> str:
    from export.tensorrt_build import device_target

    return device_target()
