"""`facert build`: a checkpoint -> an engines folder for one backend, with its manifest.

  onnxruntime   the ONNX graphs (export/onnx_export.py), fp32; with --precision int8|int4 the LLM
                graphs' matmuls become block-quantized MatMulNBits (export/quantize.py), measured
                against the fp32 model before the folder is written (export/quant_accuracy.py)
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

from export.manifest import tool_versions, write_manifest
from runtime.manifest import FORMAT, FORMAT_VERSION, EngineError

BACKENDS = ("onnxruntime", "tensorrt", "tensorrt-llm")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
# What each backend builds: onnxruntime fp32 graphs, with int8/int4 weight-only LLM matmuls as an
# option (MatMulNBits, export/quantize.py); TensorRT plans take float types and Q/DQ (fp8) graphs;
# TensorRT-LLM adds its weight-only int8/int4 (W8A16/W4A16) and ModelOpt-calibrated fp8
# (export/trtllm_convert.py).
BACKEND_PRECISIONS = {"onnxruntime": ("fp32", "int8", "int4"), "tensorrt": ("fp32", "fp16", "bf16", "fp8"),
                      "tensorrt-llm": ("fp32", "fp16", "bf16", "fp8", "int8", "int4")}
HALF_PRECISIONS = ("fp16", "bf16")
DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_IMAGES = 1
DEFAULT_MAX_TILES = 1
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


def build_command(checkpoint, backend, out, precision, max_batch, max_new_tokens, max_images=DEFAULT_MAX_IMAGES,
                  max_tiles=DEFAULT_MAX_TILES, tp_size=1, pp_size=1, block_size=None, accuracy_level=None) -> str:
    parallel = [*(["--tp", str(tp_size)] if tp_size != 1 else []), *(["--pp", str(pp_size)] if pp_size != 1 else [])]
    quantized = [*(["--block-size", str(block_size)] if block_size is not None else []),
                 *(["--accuracy-level", str(accuracy_level)] if accuracy_level is not None else [])]
    return shlex.join(["facert", "build", "--checkpoint", str(checkpoint), "--backend", backend,
                       "--precision", precision, *quantized, "--max-batch", str(max_batch), "--max-images", str(max_images),
                       "--max-tiles", str(max_tiles), "--max-new-tokens", str(max_new_tokens), *parallel,
                       "--out", str(out)])


def half_precision(capability: tuple[int, int] | None = None) -> str:
    """bf16 on GPUs that run it natively (sm_80 and later), fp16 before: the GPU backends' activation type."""
    if capability is None:
        import torch

        capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def default_precision(backend: str, capability: tuple[int, int] | None = None) -> str:
    """fp32 for onnxruntime (its CPU kernels), the GPU's half type for TensorRT and TensorRT-LLM."""
    return "fp32" if backend == "onnxruntime" else half_precision(capability)


def _check_args(backend: str, precision: str, max_batch: int, out: Path, force: bool,
                max_images: int = DEFAULT_MAX_IMAGES, max_tiles: int = DEFAULT_MAX_TILES, tp_size: int = 1,
                pp_size: int = 1) -> None:
    if backend not in BACKENDS:
        raise EngineError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision not in BACKEND_PRECISIONS[backend]:
        if backend == "onnxruntime":
            # fp16 graphs need onnxruntime-gpu's CUDA provider (the CPU provider lacks fp16 kernels for
            # most of these ops), bf16/fp8 are TensorRT's: the onnxruntime engines stay fp32 (with
            # int8/int4 weight-only LLM matmuls as an option).
            raise EngineError(f"--backend onnxruntime builds fp32 graphs only (int8/int4: with weight-only "
                              f"quantized LLM matmuls); {precision} is for --backend tensorrt or tensorrt-llm")
        others = [b for b in BACKENDS if precision in BACKEND_PRECISIONS[b]]
        raise EngineError(f"--backend {backend} builds {', '.join(BACKEND_PRECISIONS[backend])}; {precision} is "
                          f"for --backend {' or '.join(others)}")
    if max_batch < 1:
        raise EngineError(f"--max-batch must be >= 1, got {max_batch}")
    if max_images < 1:
        raise EngineError(f"--max-images must be >= 1, got {max_images}")
    if max_tiles < 1:
        raise EngineError(f"--max-tiles must be >= 1, got {max_tiles}")
    if tp_size < 1 or pp_size < 1:
        raise EngineError(f"--tp and --pp must be >= 1, got --tp {tp_size} --pp {pp_size}")
    if (tp_size, pp_size) != (1, 1) and backend != "tensorrt-llm":
        # the ONNX / TensorRT graphs run whole on one device; only TensorRT-LLM splits the LLM
        raise EngineError(f"--tp / --pp split the LLM over GPUs with TensorRT-LLM: use --backend tensorrt-llm, "
                          f"not {backend}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise EngineError(f"{out} exists and is not empty; pass --force to replace it")


def _copy_standalone_files(checkpoint: Path, config: dict, tokenizer, out: Path) -> dict[str, str]:
    """config.json (the model spec) and the tokenizer files; returns {file: sha256}."""
    from runtime.file_hashes import file_sha256

    src = checkpoint / "config.json"
    if config.get("format") == "facert-checkpoint":
        shutil.copy2(src, out / "config.json")
    else:  # llava-hf / InternVL: the spec facert read from it, in facert's format
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    before = {p.name for p in out.iterdir()}
    tokenizer.save_pretrained(str(out))
    names = ["config.json"] + sorted({p.name for p in out.iterdir()} - before)
    return {name: file_sha256(out / name, "full") for name in names}


def build_engines(checkpoint: str | Path, backend: str, out: str | Path, precision: str | None = None,
                  max_batch: int = DEFAULT_MAX_BATCH, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                  simplify: bool = True, force: bool = False, command: str | None = None,
                  progress: Progress | None = None, max_images: int = DEFAULT_MAX_IMAGES,
                  max_tiles: int = DEFAULT_MAX_TILES, expect_spec: str | None = None, tp_size: int = 1,
                  pp_size: int = 1, block_size: int | None = None, accuracy_level: int | None = None,
                  check_accuracy: bool = True) -> Path:
    """Build an engines folder at `out`; returns its path. `precision` defaults to default_precision(backend).

    max_images / max_tiles: the most images a request holds and (InternVL) tiles per image, which size
    the TensorRT-LLM prompt table and input length and the vision plans' batch profiles.
    expect_spec: refuse a checkpoint of another model (a recipe's model.spec).
    tp_size / pp_size (tensorrt-llm): split the LLM's engine over tp_size x pp_size GPUs.
    block_size (onnxruntime int8/int4): weights per quantization block (default 32).
    accuracy_level (onnxruntime int8/int4): MatMulNBits' compute type, 1 (fp32 activations) or 4 (int8
    activations); default the precision's measured choice (export.quantize.ACCURACY_LEVEL).
    check_accuracy (onnxruntime int8/int4): measure the quantized LLM against the fp32 model on a few
    fixed text prompts and record it in the manifest (export.quant_accuracy.build_check)."""
    from runtime.checkpoint import checkpoint_hash, load_checkpoint

    checkpoint, out = Path(checkpoint), Path(out)
    if precision is None:
        precision = default_precision(backend)
    _check_args(backend, precision, max_batch, out, force, max_images, max_tiles, tp_size, pp_size)
    quantized = backend == "onnxruntime" and precision in ("int8", "int4")
    if quantized:
        from export.quantize import ACCURACY_LEVELS, DEFAULT_BLOCK_SIZE, check_block_size

        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        check_block_size(block_size)
        if accuracy_level not in (None, *ACCURACY_LEVELS):
            raise EngineError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} "
                              f"(1: fp32 activations, 4: int8 activations), got {accuracy_level}")
    elif block_size is not None or accuracy_level is not None:
        raise EngineError("--block-size and --accuracy-level are for --backend onnxruntime --precision int8|int4")
    if backend != "onnxruntime":
        _require_gpu_toolchain(backend, precision)  # before minutes of export that could not be built
    steps = {"onnxruntime": 4 + 2 * quantized, "tensorrt": 5, "tensorrt-llm": 6}[backend]
    progress = progress or Progress(steps)
    t0 = time.perf_counter()
    try:
        progress.step(f"reading {checkpoint} (verifying its checksums)")
        # The structure, config and tokenizer now; each part's weights when it is exported (one at a time).
        skeleton, tokenizer, config = load_checkpoint(checkpoint, dtype="fp32", parts=())
        if expect_spec is not None and config.get("spec") not in (None, expect_spec):
            raise EngineError(f"the recipe is for {expect_spec!r} but {checkpoint} holds {config.get('spec')!r}")
        source = {"path": str(checkpoint.resolve()), "sha256": checkpoint_hash(checkpoint),
                  "spec": config.get("spec"), "family": config["family"]}

        def load(parts: tuple[str, ...] | None):
            return load_checkpoint(checkpoint, dtype="fp32", verify=False, parts=parts)[0]

        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        if backend == "tensorrt-llm":
            _check_trtllm_model(skeleton, precision, tp_size, pp_size)  # before the export: what TensorRT-LLM cannot build
        _build_into(out, skeleton, load, tokenizer, config, checkpoint=checkpoint, source=source, backend=backend,
                    precision=precision, max_batch=max_batch, max_new_tokens=max_new_tokens, simplify=simplify,
                    command=command, progress=progress, t0=t0, max_images=max_images, max_tiles=max_tiles,
                    tp_size=tp_size, pp_size=pp_size, block_size=block_size, accuracy_level=accuracy_level,
                    check_accuracy=check_accuracy)
    except BaseException:
        if out.is_dir() and not (out / "manifest.json").exists():
            shutil.rmtree(out, ignore_errors=True)  # no half-built folder left behind
        raise
    finally:
        progress.close()
    return out


def _build_into(out: Path, model, load: Callable, tokenizer, config: dict, *, checkpoint: Path, source: dict,
                backend: str, precision: str, max_batch: int, max_new_tokens: int, simplify: bool,
                command: str | None, progress: Progress, t0: float, max_images: int = DEFAULT_MAX_IMAGES,
                max_tiles: int = DEFAULT_MAX_TILES, tp_size: int = 1, pp_size: int = 1,
                block_size: int | None = None, accuracy_level: int | None = None, check_accuracy: bool = True) -> None:
    """The build proper, into the fresh folder `out`. `model` is the checkpoint's structure without
    weights; `load(parts)` loads those parts' weights (runtime.checkpoint.load_checkpoint; None: all)."""
    from export.onnx_export import export_onnx, llm_layout

    work = out if backend == "onnxruntime" else Path(tempfile.mkdtemp(prefix=".onnx-", dir=out))
    progress.step(f"exporting ONNX graphs (opset 17{', onnxslim' if simplify else ''})")
    components = export_onnx(load, work, simplify=simplify, progress=progress, onnxruntime_ops=backend == "onnxruntime")
    for entry in components.values():
        entry.setdefault("precision", "fp32")
        if entry["kind"] == "onnx":
            entry["target"] = "cpu"
    spec_model = {
        "family": model.family, "vocab_size": model.vocab_size,
        "num_image_tokens": model.num_image_tokens, "num_seg_tokens": model.num_seg_tokens,
        "num_classes": config["parser"]["num_classes"] if model.num_seg_tokens else None,
        "llm": llm_layout(model),
        "limits": {"max_batch": max_batch, "max_new_tokens": max_new_tokens, "max_images": max_images,
                   "max_tiles": max_tiles},
    }
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "backend": backend, "target": "cpu",
                "precision": precision, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "build_command": command or build_command(checkpoint, backend, out, precision, max_batch,
                                                          max_new_tokens, max_images, max_tiles, tp_size, pp_size,
                                                          block_size, accuracy_level),
                "source": source, "tools": tool_versions(), "exporter": "torch.onnx.export(dynamo=False)",
                "spec": config, "model": spec_model}
    onnx_manifest = {**manifest, "backend": "onnxruntime", "components": components}

    batches = vision_batch_limits(model, max_batch, max_images, max_tiles)
    if backend == "tensorrt":
        progress.step(f"building TensorRT plans ({precision})")
        manifest["components"] = _tensorrt_plans(onnx_manifest, work, out, precision, max_batch, progress, batches)
    elif backend == "tensorrt-llm":
        # the vision side is TensorRT plans in the engine's activation type (quantization is the LLM's)
        plan_precision = precision if precision in ("fp32", *HALF_PRECISIONS) else half_precision()
        progress.step(f"building TensorRT plans for the vision side ({plan_precision})")
        vision_side = {k: v for k, v in components.items() if not k.startswith("llm_")}
        manifest["components"] = _tensorrt_plans({**onnx_manifest, "components": vision_side}, work, out,
                                                 plan_precision, max_batch, progress, batches)
        progress.step(f"converting the LLM to a TensorRT-LLM checkpoint ({precision}) and building its engine")
        # the whole model: fp8 calibration runs the vision side too, to splice real image rows in
        manifest["components"]["llm"] = _trtllm_engine(load(None), tokenizer, config, out, precision, max_batch,
                                                       max_new_tokens, progress, max_images, max_tiles, tp_size,
                                                       pp_size)
    else:
        manifest["components"] = components
        if precision in ("int8", "int4"):
            manifest["quantization"] = _quantize(load, tokenizer, out, components, spec_model["llm"], precision,
                                                 block_size, accuracy_level, check_accuracy, progress)
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


def _quantize(load: Callable, tokenizer, out: Path, components: dict, layout: dict, precision: str,
              block_size: int, accuracy_level: int | None, check_accuracy: bool, progress: Progress) -> dict:
    """int8/int4 LLM graphs in place of the fp32 ones, and what they cost in accuracy; the manifest's
    `quantization` record. The check loads the fp32 LLM (torch) once the quantized graphs are written,
    runs it, and lets it go before it opens the quantized session (--no-accuracy-check where the fp32
    LLM does not fit)."""
    from export.quant_accuracy import build_check
    from export.quantize import quantize_llm

    progress.step(f"quantizing the LLM's matmuls to {precision} (onnxruntime MatMulNBits, block {block_size})")
    record = quantize_llm(out, components, precision, block_size, accuracy_level, progress=progress)
    if check_accuracy:
        progress.step(f"measuring the {precision} LLM against the fp32 model (teacher-forced next-token agreement)")
        check = record["accuracy_check"] = build_check(load, tokenizer, out, components, layout, precision)
        progress(f"{precision}: top-1 agreement {check['top1_agreement']:.1%} over {check['positions']} positions "
                 f"(goal {check['goal_top1']:.0%}), mean KL {check['mean_kl']:.4f}, identical answers "
                 f"{check['identical_answers']:.0%} of {check['prompts']}")
    else:
        progress.step("accuracy check skipped (--no-accuracy-check)")
    return record


def vision_batch_limits(model, max_batch: int, max_images: int, max_tiles: int) -> dict[str, int]:
    """Largest batch of each vision-side graph: every image of every request of a full batch, and for
    the vision tower every tile of them (runtime.serving / the pipeline batch them across requests)."""
    from export.trtllm_convert import tiles_per_image

    images = max_batch * max_images
    return {"vision": images * tiles_per_image(model, max_tiles), "parser": images, "seg": images,
            "attributes": images}


def _check_trtllm_model(model, precision: str, tp_size: int = 1, pp_size: int = 1) -> None:
    """Refuse, before the export, an LLM TensorRT-LLM cannot build at `precision`, or split tp_size x pp_size."""
    from export import trtllm_convert

    llm_cfg = model.llm.config
    heads = llm_cfg.num_attention_heads
    trtllm_convert.check_engine_config({"head_size": getattr(llm_cfg, "head_dim", None) or llm_cfg.hidden_size // heads,
                                        "hidden_size": llm_cfg.hidden_size, "num_attention_heads": heads})
    trtllm_convert.trtllm_config(model.llm, "float16", None, tp_size, pp_size)  # the split (check_parallel)
    if precision in trtllm_convert.WEIGHT_ONLY:
        trtllm_convert.check_weight_only_shapes(model.llm, tp_size)


def calibration_embeds(model, tokenizer, count: int = 16) -> list:
    """Prompt embeddings for fp8 calibration: what the LLM sees in service, text tokens with a real
    face photo's image (and seg) rows spliced in, over `count` crops of the public-domain astronaut
    photo and a fixed set of face questions. No data set is downloaded."""
    import io

    from PIL import Image

    from runtime.cli import DEMO_IMAGE
    from runtime.backends.torch_backend import TorchComponents
    from runtime.pipeline import FacePipeline

    questions = ["Is this person smiling?", "Describe this face.", "What is the hair colour?",
                 "Does this person wear glasses?", "How old does this person look?", "Is the person wearing a hat?",
                 "Describe the expression.", "Which way is the person looking?"]
    photo = Image.open(DEMO_IMAGE).convert("RGB")
    w, h = photo.size
    images = []
    for i in range(count):
        side = int(min(w, h) * (0.5 + 0.5 * ((i * 7) % count) / max(count - 1, 1)))
        x, y = (i * 37) % max(w - side, 1), (i * 53) % max(h - side, 1)
        buf = io.BytesIO()
        photo.crop((x, y, x + side, y + side)).save(buf, format="PNG")
        images.append(buf.getvalue())
    pipe = FacePipeline(TorchComponents(model, "cpu", cuda_graphs=False), tokenizer)
    prepared = pipe.prepare(images, [questions[i % len(questions)] for i in range(count)], 1)
    return [e.detach().float().cpu() for e in prepared.prompt_embeds]


def _require_gpu_toolchain(backend: str, precision: str = "bf16") -> None:
    """Fail fast, saying what to install, where TensorRT (or TensorRT-LLM) or a GPU is missing."""
    try:
        from runtime.backends.tensorrt_backend import device_target, require_tensorrt
    except ModuleNotFoundError as e:
        if e.name != "export.tensorrt_build":
            raise
        raise EngineError("this facert has no TensorRT builder (export/tensorrt_build.py)") from None
    require_tensorrt()
    device_target()
    if backend == "tensorrt-llm":
        try:
            from runtime.backends.trtllm_backend import require_tensorrt_llm
        except ModuleNotFoundError as e:
            if e.name != "export.trtllm_convert":
                raise
            raise EngineError("this facert has no TensorRT-LLM converter (export/trtllm_convert.py)") from None
        require_tensorrt_llm()
        if precision == "fp8":
            from export.trtllm_convert import MODELOPT_HINT, TrtLlmError

            try:
                import modelopt.torch.quantization  # noqa: F401
            except ImportError as e:
                raise TrtLlmError(f"--precision fp8 is calibrated by NVIDIA ModelOpt ({e}); {MODELOPT_HINT}") from e


def _tensorrt_plans(onnx_manifest: dict, onnx_dir: Path, out: Path, precision: str, max_batch: int,
                    progress, batch_limits: dict[str, int] | None = None) -> dict:
    try:
        from export.tensorrt_build import build_plans
    except ModuleNotFoundError as e:
        if e.name != "export.tensorrt_build":
            raise
        raise EngineError("this facert has no TensorRT builder (export/tensorrt_build.py)") from None
    return build_plans(onnx_manifest, onnx_dir, out, precision, max_batch, progress, batch_limits=batch_limits)


def _trtllm_engine(model, tokenizer, config: dict, out: Path, precision: str, max_batch: int, max_new_tokens: int,
                   progress, max_images: int = DEFAULT_MAX_IMAGES, max_tiles: int = DEFAULT_MAX_TILES,
                   tp_size: int = 1, pp_size: int = 1) -> dict:
    try:
        from export import trtllm_convert
    except ModuleNotFoundError as e:
        if e.name != "export.trtllm_convert":
            raise
        raise EngineError("this facert has no TensorRT-LLM converter (export/trtllm_convert.py)") from None
    # fp32/fp16/bf16 engines run in that type; quantized ones keep their activations in the GPU's half type
    dtype = precision if precision in ("fp32", *HALF_PRECISIONS) else half_precision()
    quantization = None if precision == dtype else precision
    ckpt_dir = out / "trtllm_checkpoint"
    if quantization == "fp8":
        progress("calibrating FP8 scales with NVIDIA ModelOpt on the calibration prompts")
        ckpt = trtllm_convert.quantize_fp8(model, config, ckpt_dir, calibration_embeds(model, tokenizer), dtype=dtype,
                                           tp_size=tp_size, pp_size=pp_size)
    else:
        ckpt = trtllm_convert.convert_checkpoint(model, config, ckpt_dir, dtype=dtype, quantization=quantization,
                                                 tp_size=tp_size, pp_size=pp_size)
    quant_algo = (trtllm_convert.checkpoint_config(ckpt).get("quantization") or {}).get("quant_algo")
    rows = trtllm_convert.prompt_rows_per_request(model, max_images, max_tiles)
    table_rows = trtllm_convert.prompt_table_size(model, max_batch, max_images, max_tiles)
    engine_dir = trtllm_convert.build_engine(
        ckpt, out / "llm_engine", max_batch=max_batch, max_input_len=rows + MAX_TEXT_TOKENS,
        max_output_len=max_new_tokens, max_prompt_embedding_table_size=table_rows, progress=progress)
    shutil.rmtree(ckpt)  # the engine is what runs; the checkpoint can be rebuilt from the source
    files = sorted(str(p.relative_to(out)) for p in Path(engine_dir).rglob("*") if p.is_file())
    main = str((Path(engine_dir) / "rank0.engine").relative_to(out))
    return {"file": main, "kind": "tensorrt-llm-engine", "data_files": [f for f in files if f != main],
            "precision": precision, "dtype": dtype, "quant_algo": quant_algo, "max_batch": max_batch,
            "max_input_len": rows + MAX_TEXT_TOKENS, "max_output_len": max_new_tokens,
            "prompt_table_rows": table_rows,
            # the ranks the engine runs as, one GPU each (the native repository launches them)
            "mapping": {"world_size": tp_size * pp_size, "tp_size": tp_size, "pp_size": pp_size},
            "target": _gpu_target()}


def _gpu_target() -> str:
    from runtime.backends.tensorrt_backend import device_target

    return device_target()
