"""Weight-only block quantization of the LLM graphs with onnxruntime's own quantizer (MatMulNBits).

`facert build --backend onnxruntime --precision int8|int4 [--block-size 32]` exports the fp32
graphs (export/onnx_export.py) and then rewrites the two LLM graphs here. In both the prefill and
the decode graph every MatMul whose right-hand side is a weight [K, N] -- per layer the fused
q/k/v, o_proj, the fused gate/up and down_proj, and the lm_head -- becomes one `MatMulNBits`
(com.microsoft) node: the weight is cut along K into blocks of `block_size` values, each block
stored as 8- or 4-bit unsigned integers with its own fp32 scale and zero point (round to
nearest from the block's min and max, onnxruntime's default scheme). Activations stay fp32.

What stays fp32, and why:
* the RoPE rotation (a [head_dim, head_dim] signed permutation that KVCacheLLM applies as a
  MatMul): quantizing -1/0/+1 on an asymmetric grid would move every rotated value by ~7 %;
* the token-embedding table (embed_tokens.npy, gathered row by row outside the graphs): a step
  reads one row of it, so its size costs nothing per token, while its precision enters every
  input. With tied embeddings (SmolLM2, Qwen2.5-0.5B) the lm_head's graph weight is its own
  [D, V] copy, quantized like every other matmul, while the table the runtime gathers from keeps
  the exact fp32 rows;
* the vision tower, face parser, seg branch and attribute head (their graphs are left as built:
  they run once per request, and prefill, not them, is what a quantized LLM speeds up).

The quantized weights are again written once into llm.onnx.data and shared by both graphs
(export.onnx_export.save_sharing_weights: the quantizer is deterministic, so the two graphs'
copies of a weight quantize to the same bytes).

accuracy_level (MatMulNBits' compute type) is chosen by measurement on the demo model (see
ACCURACY_LEVEL): 4 lets onnxruntime's CPU kernels quantize the activations of each block to int8
and multiply in int8 (AVX512-VNNI / AVX2), 1 dequantizes the weights to fp32 first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from runtime.manifest import QUANTIZED_BITS as BITS
from runtime.manifest import QUANTIZED_OP, EngineError

DEFAULT_BLOCK_SIZE = 32
# Measured on the demo model, 2-core AMD EPYC with AVX512-VNNI (benchmarks/results/<date>-quant-*):
# accuracy level 4 (int8 compute) against 1 (fp32 compute): see README's quantization section.
ACCURACY_LEVEL = 4
LLM_GRAPHS = ("llm_prefill", "llm_decode")


def check_block_size(block_size: int) -> None:
    # MatMulNBits' CPU kernels take power-of-two blocks of at least 16 values
    if block_size < 16 or block_size & (block_size - 1):
        raise EngineError(f"--block-size must be a power of two >= 16, got {block_size}")


def quantizer_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _is_signed_permutation(w: np.ndarray) -> bool:
    """The RoPE rotate_half matrix: square, entries in {-1, 0, 1}, one non-zero per row."""
    return (w.ndim == 2 and w.shape[0] == w.shape[1] and np.isin(w, (-1.0, 0.0, 1.0)).all()
            and (np.count_nonzero(w, axis=1) == 1).all())


def _weight_matmuls(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(names of the MatMuls to quantize, names of the constant-weight MatMuls kept fp32)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    quantize, keep = [], []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue  # q @ k^T and probs @ v multiply activations
        if not node.name:
            raise EngineError("an LLM graph has an unnamed MatMul: the quantizer excludes nodes by name")
        w = numpy_helper.to_array(inits[node.input[1]])
        (keep if w.ndim != 2 or _is_signed_permutation(w) else quantize).append(node.name)
    return quantize, keep


def _quantizer_class():
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # it imports onnx_ir, which onnxruntime does not require
        raise EngineError(f"--precision int8/int4 needs onnxruntime's quantizer and its dependencies "
                          f"(pip install 'facert[onnx]'): {e}") from None
    finally:
        root.handlers[:] = handlers  # the module calls logging.basicConfig(level=INFO) on import
        root.setLevel(level)
    return MatMulNBitsQuantizer


def quantize_graph(model: onnx.ModelProto, bits: int, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int = ACCURACY_LEVEL) -> tuple[onnx.ModelProto, dict]:
    """One graph's weight MatMuls -> MatMulNBits; returns the graph and what was done to it."""
    quantize, keep = _weight_matmuls(model)
    quantizer = _quantizer_class()(model, bits=bits, block_size=block_size, is_symmetric=False,
                                   accuracy_level=accuracy_level, nodes_to_exclude=keep,
                                   op_types_to_quantize=("MatMul",))
    quantizer.process()
    model = quantizer.model.model
    done = sum(1 for n in model.graph.node if n.op_type == QUANTIZED_OP)
    if done != len(quantize):
        raise EngineError(f"the quantizer rewrote {done} of the {len(quantize)} weight MatMuls")
    return model, {"bits": bits, "block_size": block_size, "accuracy_level": accuracy_level,
                   "quantized_matmuls": done, "fp32_matmuls": len(keep)}


def quantize_llm(out_dir: Path, components: dict[str, dict], precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 accuracy_level: int = ACCURACY_LEVEL,
                 progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Rewrite the exported LLM graphs in out_dir in `precision`; updates their component entries in
    place and returns the manifest's `quantization` record."""
    from export.onnx_export import LLM_DATA_FILE, save_sharing_weights
    from runtime.manifest import io_signature

    if precision not in BITS:
        raise EngineError(f"quantization precision must be one of {', '.join(BITS)}, got {precision!r}")
    check_block_size(block_size)
    bits = BITS[precision]
    out_dir = Path(out_dir)
    graphs, per_graph = {}, {}
    t0 = time.perf_counter()
    for name in LLM_GRAPHS:  # one fp32 graph in memory at a time; the quantized ones are 4-8x smaller
        progress(f"quantizing {name} to {precision} (MatMulNBits, block {block_size})")
        fp32 = onnx.load(str(out_dir / components[name]["file"]))
        graphs[name], per_graph[name] = quantize_graph(fp32, bits, block_size, accuracy_level)
        del fp32
        if io_signature(graphs[name]) != {k: components[name][k] for k in ("inputs", "outputs")}:
            raise EngineError(f"quantizing {name} changed its inputs or outputs")
    fp32_bytes = (out_dir / LLM_DATA_FILE).stat().st_size
    save_sharing_weights({components[k]["file"]: g for k, g in graphs.items()}, out_dir, LLM_DATA_FILE)
    for name in LLM_GRAPHS:
        components[name].update(precision=precision, quantization=per_graph[name])
    return {"scheme": "block-wise weight-only, asymmetric (uint, zero point per block), round to nearest",
            "operator": f"com.microsoft.{QUANTIZED_OP}", "bits": bits, "block_size": block_size,
            "accuracy_level": accuracy_level, "components": list(LLM_GRAPHS),
            "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
            "quantizer_version": quantizer_version(),
            "kept_fp32": ["embed_tokens (gathered, not multiplied)", "RoPE rotation", "vision", "parser", "seg",
                          "attributes"],
            "llm_data_bytes": {"fp32": fp32_bytes, precision: (out_dir / LLM_DATA_FILE).stat().st_size},
            "seconds": round(time.perf_counter() - t0, 1)}


def quantized_copy(fp32_engines: Path, out: Path, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int = ACCURACY_LEVEL) -> Path:
    """An int8/int4 engines folder made from an fp32 onnxruntime one, without exporting again: the
    same quantize_llm pass `facert build --precision` runs after its export (no accuracy check;
    `quantization` says so). For benchmarks and tests that compare precisions of one export."""
    import shutil

    from export.manifest import write_manifest
    from runtime.manifest import read_manifest

    manifest = read_manifest(fp32_engines)
    if manifest["backend"] != "onnxruntime" or manifest.get("precision", "fp32") != "fp32":
        raise EngineError(f"{fp32_engines} is not an fp32 onnxruntime engines folder")
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fp32_engines, out)
    manifest["quantization"] = quantize_llm(out, manifest["components"], precision, block_size, accuracy_level)
    manifest["quantization"]["derived_from"] = str(Path(fp32_engines).resolve())
    manifest["precision"] = precision
    write_manifest(out, manifest)
    return out
