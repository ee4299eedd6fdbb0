"""manifest.json of an engines folder: reading it, and the checks a runtime makes before using it.

The manifest is the contract between `facert build` (export/manifest.py writes it) and every
backend that runs an engines folder (this module reads and verifies it). Its fields:

  format, format_version      "facert-engines", 1
  backend, target, precision   e.g. "onnxruntime", "cpu", "fp32" (TensorRT: target "sm_90")
  build_command, created       how and when it was built
  source                       the checkpoint: path, sha256 (runtime.checkpoint.checkpoint_hash), spec, family
  tools                        versions of facert, python, torch, transformers, onnx, onnxruntime, ...
  model                        family, vocab_size, num_image_tokens, num_seg_tokens, num_classes,
                               llm layout (layers, heads, KV heads, head_dim, hidden), limits (max_batch,
                               max_images, max_tiles, ...)
  files                        {name: sha256} of config.json and the tokenizer files
  components                   {name: entry}; an entry has file, sha256, data_files + data_sha256
                               (external weights), kind ("onnx", "npy", or a TensorRT kind),
                               inputs/outputs [{name, shape, dtype}], precision, opset, target

Loading verifies, in this order, and refuses with an `EngineError` that names the file: the
manifest's format; the backend and target it was built for against the ones asked for; the
sha256 of every file (runtime.file_hashes: a file unchanged since its last full hash, by device,
inode, size, mtime and ctime, is not read again unless FACERT_VERIFY=full); and, for ONNX graphs
and npy tables, that the file's own input/output names, shapes and dtypes are the ones the
manifest records, and that a graph holds quantized matmuls (MatMulNBits of the recorded bits and
block size) exactly where the manifest says its precision is int8/int4.

int8/int4 onnxruntime folders also carry `quantization`: scheme, bits, block size, accuracy level,
the quantizer and its version, and the build's accuracy check against fp32 (export/quantize.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from runtime.file_hashes import file_sha256, verify_mode as _verify_mode

FORMAT = "facert-engines"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
QUANTIZED_BITS = {"int8": 8, "int4": 4}  # onnxruntime precisions whose LLM matmuls are MatMulNBits
QUANTIZED_OP = "MatMulNBits"
# What a MatMulNBits multiplies, by the suffix of its input's name: [x, x] (an 8-bit weight as two 4-bit
# nibble planes), then the means of x's blocks (block offsets held as rows of the weight)
TWICE, WITH_BLOCK_MEANS = "_twice", "_with_block_means"
# The decode graph's inputs, besides inputs_embeds, position_ids and the cache, where its attention is
# onnxruntime's GroupQueryAttention writing the cache in place (export.onnx_export.KVCacheLLM.decode_in_place);
# what tells a runtime which of the two decode graphs an engine folder holds.
IN_PLACE_DECODE_INPUTS = ("seqlens_k", "total_sequence_length", "attention_bias", "query_seqlens")


class EngineError(ValueError):
    """An engines folder that is missing, corrupt, edited, or built for another backend or target."""


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    if not root.is_dir():
        raise EngineError(f"engines folder {root} does not exist")
    path = root / MANIFEST
    if not path.is_file():
        raise EngineError(f"{root} is not an engines folder: {MANIFEST} is missing (build one with `facert build`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EngineError(f"{path} is not a facert engines manifest (format {manifest.get('format')!r})"
                          if isinstance(manifest, dict) else f"{path} is not a facert engines manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path}: format_version {manifest.get('format_version')} is not supported "
                          f"(this facert reads {FORMAT_VERSION})")
    for key in ("backend", "target", "components", "files"):
        if key not in manifest:
            raise EngineError(f"{path} has no {key!r} entry")
    return manifest


def _check_hash(root: Path, rel: str, expected: str | None, what: str, mode: str) -> None:
    path = root / rel
    if not path.is_file():
        raise EngineError(f"{what}: {path} is missing")
    actual = file_sha256(path, mode)
    if actual != expected:
        raise EngineError(f"{what}: {path} has sha256 {actual[:16]}..., the manifest says "
                          f"{str(expected)[:16]}...: the file is corrupt or was edited (rebuild the engines)")


def _load_onnx(path: Path):
    import onnx

    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise EngineError(f"{path} cannot be read as an ONNX graph: {e}") from None


def _check_quantization(name: str, path: Path, graph, entry: dict) -> None:
    """A graph the manifest calls int8/int4 holds MatMulNBits nodes of those bits and block size, as
    many as recorded, and any other graph none: graphs swapped (with their hashes) for ones of another
    precision are refused."""
    from onnx.helper import get_attribute_value

    precision = entry.get("precision", "fp32")
    nodes = [n for n in graph.graph.node if n.op_type == QUANTIZED_OP]
    if precision not in QUANTIZED_BITS:
        if nodes:
            raise EngineError(f"component {name!r}: {path.name} holds {len(nodes)} {QUANTIZED_OP} nodes, but the "
                              f"manifest says {precision} (mismatched manifest or file)")
        return
    want = entry.get("quantization", {})
    if len(nodes) != want.get("quantized_matmuls"):
        raise EngineError(f"component {name!r}: {path.name} holds {len(nodes)} {QUANTIZED_OP} nodes, the manifest "
                          f"says {want.get('quantized_matmuls')} (mismatched manifest or file)")
    planes = {n.name for n in nodes if TWICE in n.input[0]}  # fed [x, x] (and maybe x's block means or sums)
    if len(planes) != want.get("matmuls_as_nibble_planes", 0):
        raise EngineError(f"component {name!r}: {path.name} holds {len(planes)} {QUANTIZED_OP} nodes on nibble planes, "
                          f"the manifest says {want.get('matmuls_as_nibble_planes', 0)} (mismatched manifest or file)")
    outputs = {o.name for o in graph.graph.output}
    for node in nodes:
        attrs = {a.name: get_attribute_value(a) for a in node.attribute}
        writes_output = node.output[0] in outputs  # the lm_head has its own bits
        expected = {"bits": want.get("output_bits", want.get("bits")) if writes_output else want.get("bits"),
                    "block_size": want.get("block_size")}
        if node.name in planes:  # an 8-bit weight as two 4-bit planes
            if expected["bits"] != 8:
                raise EngineError(f"component {name!r}: {QUANTIZED_OP} {node.name} in {path.name} holds nibble planes "
                                  f"(8 bits), the manifest says {expected['bits']} (mismatched manifest or file)")
            expected["bits"] = 4
        for key in ("bits", "block_size"):
            if attrs.get(key) != expected[key]:
                raise EngineError(f"component {name!r}: {QUANTIZED_OP} {node.name} in {path.name} has {key} "
                                  f"{attrs.get(key)}, the manifest says {expected[key]} (mismatched manifest or file)")


def _npy_signature(path: Path) -> dict:
    import numpy as np

    table = np.load(path, mmap_mode="r")
    return {"inputs": [], "outputs": [{"name": path.stem, "shape": list(table.shape), "dtype": str(table.dtype)}]}


def _compare_signature(name: str, path: Path, recorded: dict, actual: dict) -> None:
    for side in ("inputs", "outputs"):
        want = {t["name"]: t for t in recorded.get(side, [])}
        have = {t["name"]: t for t in actual[side]}
        if set(want) != set(have):
            raise EngineError(f"component {name!r}: {path.name} has {side} {sorted(have)}, the manifest says "
                              f"{sorted(want)} (mismatched manifest or file)")
        for tname, t in want.items():
            h = have[tname]
            if list(t.get("shape", [])) != list(h["shape"]) or t.get("dtype") != h["dtype"]:
                raise EngineError(f"component {name!r}: {side[:-1]} {tname!r} of {path.name} is "
                                  f"{h['dtype']} {h['shape']}, the manifest says {t.get('dtype')} "
                                  f"{t.get('shape')} (shape mismatch: mismatched manifest or file)")


def verify(root: str | Path, backend: str | None = None, target: str | None = None,
           check_hashes: bool = True, verify_mode: str | None = None) -> dict:
    """Read and check an engines folder; returns its manifest or raises EngineError saying which check failed.

    verify_mode: how the hashes are checked, "cached" or "full" (runtime.file_hashes; default $FACERT_VERIFY,
    else cached: a file unchanged since its last full hash is not read again)."""
    root = Path(root)
    try:
        mode = _verify_mode(verify_mode)
    except ValueError as e:
        raise EngineError(str(e)) from None
    manifest = read_manifest(root)
    if backend is not None and manifest["backend"] != backend:
        raise EngineError(f"{root} was built for backend {manifest['backend']!r}, not {backend!r} "
                          f"(build it with `facert build --backend {backend}`)")
    if target is not None:
        built_for = {manifest["target"], *(c.get("target", manifest["target"]) for c in manifest["components"].values())}
        if built_for != {target}:
            raise EngineError(f"{root} was built for target {', '.join(sorted(built_for))}, but this machine's "
                              f"{manifest['backend']} runs {target}: engines are not portable across targets, "
                              "rebuild them here with `facert build`")
    if check_hashes:
        for rel, expected in manifest["files"].items():
            _check_hash(root, rel, expected, f"file {rel!r}", mode)
    for name, entry in manifest["components"].items():
        if "file" not in entry:
            raise EngineError(f"component {name!r} in {root / MANIFEST} names no file")
        path = root / entry["file"]
        if check_hashes:
            _check_hash(root, entry["file"], entry.get("sha256"), f"component {name!r}", mode)
            for rel in entry.get("data_files", []):
                _check_hash(root, rel, entry.get("data_sha256", {}).get(rel), f"component {name!r} weights", mode)
        elif not path.is_file():
            raise EngineError(f"component {name!r}: {path} is missing")
        kind = entry.get("kind")
        if kind == "onnx":
            graph = _load_onnx(path)
            _compare_signature(name, path, entry, io_signature(graph))
            _check_quantization(name, path, graph, entry)
        elif kind == "npy":
            _compare_signature(name, path, entry, _npy_signature(path))
        # TensorRT plans and TensorRT-LLM engines: their shapes are checked by their backend when it
        # deserialises them (reading them needs TensorRT).
    return manifest


def io_signature(model) -> dict:
    """Input/output names, shapes (ints, or the dynamic axis' name) and dtypes of an ONNX graph
    (`onnx.ModelProto`): what the manifest records at build time and checks at load time."""
    from onnx import TensorProto

    dtypes = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
              TensorProto.INT64: "int64", TensorProto.INT32: "int32", TensorProto.UINT8: "uint8",
              TensorProto.BOOL: "bool"}

    def entry(v):
        t = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": v.name, "shape": shape, "dtype": dtypes.get(t.elem_type, str(t.elem_type))}

    init = {i.name for i in model.graph.initializer}
    return {"inputs": [entry(v) for v in model.graph.input if v.name not in init],
            "outputs": [entry(v) for v in model.graph.output]}
