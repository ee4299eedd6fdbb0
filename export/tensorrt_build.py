"""TensorRT plans from facert's ONNX graphs: one .plan per ONNX component.

For each ONNX component of the manifest (export/onnx_export.py): parse the graph with TensorRT's
ONNX parser into an explicit-batch network, add one optimisation profile whose min/opt/max cover
batch 1..max_batch and sequence 1..max_seq (every symbolic dim of every input), set the precision
flags, and build a serialized plan. One timing cache file (`timing.cache` in out_dir) is loaded
before and saved after every build, so a rebuild — or the next component, which shares layer
shapes — skips the tactic timing already done. Components that are not graphs (the token
embedding table, embed_tokens.npy) are copied as they are.

Precision (TensorRT 10 and 11):
  fp32  no reduced-precision types; TF32 is switched off so the plans keep fp32 parity with torch
  fp16  TensorRT 10: BuilderFlag.FP16 (TensorRT may run any layer in fp16, I/O as the graph declares).
        TensorRT 11 removed the weak-typing flags (networks are always strongly typed): the graph is
        first converted to fp16 with NVIDIA ModelOpt AutoCast (modelopt.onnx.autocast, keep_io_types),
        the documented replacement, then built as it is typed
  bf16  the same with BuilderFlag.BF16 / AutoCast bf16
  fp8   needs graphs with Q/DQ nodes (explicit quantisation, e.g. from NVIDIA ModelOpt): a plain graph
        is refused, TensorRT does not calibrate fp8. TensorRT 10: BuilderFlag.FP8 (+FP16 for the rest);
        TensorRT 11: the Q/DQ graph's own types
Networks are created with no creation flags: explicit batch is the only mode since TensorRT 10, and
NetworkDefinitionCreationFlag.EXPLICIT_BATCH is gone in 11.

TensorRT is imported lazily: this module imports anywhere and says what to install where
TensorRT is absent.
"""

from __future__ import annotations

import importlib
import shutil
import time
from pathlib import Path

from runtime.backends.tensorrt_backend import TensorRTError, device_target, require_tensorrt
from runtime.file_hashes import file_sha256

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
TIMING_CACHE = "timing.cache"
WORKSPACE_BYTES = 4 << 30  # scratch memory one layer's tactic may use; the builder keeps to tactics that fit
# TensorRT reserves activation memory for the profile's max shapes, and attention scores grow with
# the square of the sequence, so the plans' context is capped (the runtime refuses longer prompts).
DEFAULT_MAX_SEQ = 2048
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


# ----------------------------------------------------------------------------------- profiles

def is_graph(entry: dict) -> bool:
    return entry.get("kind", "onnx") == "onnx" and str(entry.get("file", "")).endswith(".onnx")


def io_specs(entry: dict, key: str) -> list[dict]:
    """A component's inputs or outputs as [{name, shape, dtype}] (symbolic dims are strings)."""
    specs = entry.get(key)
    if not isinstance(specs, list) or not all(isinstance(s, dict) and "name" in s and "shape" in s for s in specs):
        raise TensorRTError(f"manifest entry {entry.get('file', '?')}: {key} must be a list of "
                            "{name, shape, dtype}")
    return specs


def dim_range(dim, max_batch: int, max_seq: int, decode: bool = False) -> tuple[int, int, int]:
    """(min, opt, max) of one input dimension.

    Fixed dims stay fixed. Symbolic dims carry the ONNX export's names: `batch` covers 1..max_batch
    (tuned at half of it); `seq` (the tokens of this call) covers 1..max_seq, tuned at 1 in a
    decode graph and at a short prompt elsewhere; `past` (the preallocated KV cache buffer, prompt
    + new tokens long) covers 1..max_seq, tuned at half of it; `past_plus_seq` (the decode mask:
    buffer + new tokens) covers 2..2*max_seq.
    """
    if isinstance(dim, int):
        return dim, dim, dim
    if dim == "batch":
        return 1, max(1, max_batch // 2), max_batch
    if dim == "seq":
        return 1, 1 if decode else min(max_seq, 256), max_seq
    if dim == "past_plus_seq":  # the decode mask spans the cache buffer and the new tokens
        return 2, max_seq // 2 + 1, 2 * max_seq
    return 1, max(1, max_seq // 2), max_seq


def profile_shapes(entry: dict, max_batch: int, max_seq: int) -> dict[str, dict[str, list[int]]]:
    """{input name: {"min": shape, "opt": shape, "max": shape}} for one component."""
    inputs = io_specs(entry, "inputs")
    decode = any(d == "past" for spec in inputs for d in spec["shape"])  # the graph reads a KV cache
    out = {}
    for spec in inputs:
        ranges = [dim_range(d, max_batch, max_seq, decode) for d in spec["shape"]]
        out[spec["name"]] = {k: [r[i] for r in ranges] for i, k in enumerate(("min", "opt", "max"))}
    return out


def default_max_seq(onnx_manifest: dict) -> int:
    """The model's context (the manifest's model.llm layout, else its spec), capped at DEFAULT_MAX_SEQ."""
    layout = (onnx_manifest.get("model") or {}).get("llm") or {}
    spec_llm = (onnx_manifest.get("spec") or {}).get("llm")
    context = layout.get("max_position_embeddings")
    if context is None and isinstance(spec_llm, dict):
        context = spec_llm.get("max_position_embeddings")
    return min(int(context), DEFAULT_MAX_SEQ) if context else DEFAULT_MAX_SEQ


def has_qdq(onnx_path: Path) -> bool:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(node.op_type in QDQ_OPS for node in graph.node)


# --------------------------------------------------------------------------------------- build

# The weak-typing builder flags each precision sets where they exist (TensorRT 10).
WEAK_TYPING_FLAGS = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "fp8": ["FP8", "FP16"]}
AUTOCAST_TYPES = {"fp16": "fp16", "bf16": "bf16"}


def precision_plan(builder_flags, precision: str) -> tuple[list[str], str | None]:
    """(builder flags to set, ModelOpt AutoCast low-precision type or None) for `precision`.

    `builder_flags` are the names of the installed TensorRT's BuilderFlag members: TensorRT 10 has
    FP16/BF16/FP8 and gets them set (weak typing); TensorRT 11 has none of them and gets fp16/bf16
    graphs converted by AutoCast (strong typing); fp32 and Q/DQ (fp8) graphs build as typed.
    """
    if precision not in WEAK_TYPING_FLAGS:
        raise TensorRTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    names = set(builder_flags)
    weak = WEAK_TYPING_FLAGS[precision]
    if all(f in names for f in weak):
        return weak, None
    return [], AUTOCAST_TYPES.get(precision)


def builder_flag_names(trt) -> set[str]:
    return {name for name in dir(trt.BuilderFlag) if name.isupper()}


def autocast_graph(onnx_path: Path, low_precision_type: str, out_dir: Path) -> Path:
    """The graph converted to `low_precision_type` by ModelOpt AutoCast (TensorRT 11's replacement for
    the FP16/BF16 builder flags), written beside the original; graph inputs and outputs keep their types."""
    import onnx

    try:
        autocast = importlib.import_module("modelopt.onnx.autocast")
    except ImportError as e:
        raise TensorRTError(f"TensorRT 11 builds {low_precision_type} plans from graphs already in that precision, "
                            f"converted by NVIDIA ModelOpt AutoCast ({e}): pip install 'nvidia-modelopt[onnx]', "
                            "or build with TensorRT 10 (pip install 'tensorrt>=10.8,<11')") from e
    model = autocast.convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=low_precision_type,
                                                keep_io_types=True)
    out = out_dir / f"{onnx_path.stem}.{low_precision_type}.onnx"
    onnx.save(model, str(out), save_as_external_data=True, location=f"{out.name}.data")  # any size
    return out


def load_timing_cache(config, path: Path):
    """The timing cache for `config`: the file's if TensorRT accepts it, else a fresh one.

    create_timing_cache returns None for bytes it cannot parse (a corrupt or truncated file), and
    set_timing_cache refuses a cache from another GPU or TensorRT version (ignore_mismatch=False):
    either way the build starts from an empty cache, which is written back after it.
    """
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data) if data else None
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_plan(trt, logger, onnx_path: Path, plan_path: Path, profile: dict, precision: str,
               timing_cache_path: Path) -> None:
    """Parse one ONNX graph and write its serialized plan; the timing cache file is read and rewritten."""
    flags, autocast = precision_plan(builder_flag_names(trt), precision)
    if autocast is not None:
        onnx_path = autocast_graph(onnx_path, autocast, plan_path.parent)
    builder = trt.Builder(logger)
    # No creation flags: explicit batch is the only mode since TensorRT 10 (EXPLICIT_BATCH is removed in 11).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the path, so external data beside it is found
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"TensorRT could not parse {onnx_path.name}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)

    opt_profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in profile:
            raise TensorRTError(f"{onnx_path.name}: input {tensor.name!r} is not in the manifest")
        if tensor.is_shape_tensor:
            raise TensorRTError(f"{onnx_path.name}: input {tensor.name!r} is a shape tensor; "
                                "facert's graphs take every shape from data tensors")
        p = profile[tensor.name]
        opt_profile.set_shape(tensor.name, p["min"], p["opt"], p["max"])
    config.add_optimization_profile(opt_profile)

    load_timing_cache(config, timing_cache_path)

    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"TensorRT failed to build {onnx_path.name} at {precision} (see its log above)")
    plan_path.write_bytes(memoryview(plan))
    timing_cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))


def build_plans(onnx_manifest: dict, onnx_dir: Path, out_dir: Path, precision: str, max_batch: int,
                progress=print, max_seq: int | None = None, batch_limits: dict[str, int] | None = None) -> dict:
    """Build one .plan per ONNX component of `onnx_manifest` (its "components": {name: entry}).

    Returns {component: entry} for the engines manifest. A plan's entry: file, sha256, kind "plan",
    inputs/outputs (as in the ONNX manifest), profiles (min/opt/max per input), max_batch, max_seq,
    precision, target ('sm_XY'), tensorrt (version), build_seconds. Other components (kind "npy")
    are copied into out_dir with their sha256. max_seq defaults to `default_max_seq(onnx_manifest)`.
    batch_limits: {component: largest batch} where it differs from max_batch (the vision side batches
    every image, or tile, of every request).
    """
    if precision not in PRECISIONS:
        raise TensorRTError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_batch < 1:
        raise TensorRTError(f"max_batch must be >= 1, got {max_batch}")
    comps = onnx_manifest.get("components")
    if not isinstance(comps, dict) or not any(is_graph(e) for e in comps.values()):
        raise TensorRTError("the ONNX manifest has no ONNX components to build")
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    for name, entry in comps.items():
        if not (onnx_dir / entry["file"]).is_file():
            raise TensorRTError(f"component {name}: {onnx_dir / entry['file']} is missing")
        if is_graph(entry):
            profile_shapes(entry, max_batch, 1)  # a malformed entry fails before TensorRT is touched
    if precision == "fp8":
        plain = [n for n, e in comps.items() if is_graph(e) and not has_qdq(onnx_dir / e["file"])]
        if plain:
            raise TensorRTError("fp8 needs graphs with Q/DQ nodes (quantise them with NVIDIA ModelOpt first); "
                                f"these have none: {', '.join(plain)}")
    trt = require_tensorrt()
    target = device_target()
    logger = trt.Logger(trt.Logger.WARNING)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_path = out_dir / TIMING_CACHE
    max_seq = int(max_seq or default_max_seq(onnx_manifest))

    built = {}
    graphs = [n for n, e in comps.items() if is_graph(e)]
    for name, entry in comps.items():
        if not is_graph(entry):
            if onnx_dir.resolve() != out_dir.resolve():
                shutil.copy2(onnx_dir / entry["file"], out_dir / entry["file"])
            built[name] = {**entry, "sha256": file_sha256(out_dir / entry["file"], "full")}
            continue
        batch = int((batch_limits or {}).get(name, max_batch))
        profile = profile_shapes(entry, batch, max_seq)
        plan_file = Path(entry["file"]).with_suffix(".plan").name
        progress(f"[{graphs.index(name) + 1}/{len(graphs)}] TensorRT {precision}: {entry['file']} -> {plan_file}")
        t0 = time.perf_counter()
        build_plan(trt, logger, onnx_dir / entry["file"], out_dir / plan_file, profile, precision, cache_path)
        built[name] = {
            "file": plan_file,
            "kind": "plan",
            "sha256": file_sha256(out_dir / plan_file, "full"),
            "inputs": io_specs(entry, "inputs"),
            "outputs": io_specs(entry, "outputs"),
            "profiles": profile,
            "max_batch": batch,
            "max_seq": max_seq,
            "precision": precision,
            "target": target,
            "tensorrt": trt.__version__,
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
    return built
