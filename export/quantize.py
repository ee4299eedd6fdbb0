"""Weight-only block quantization of the LLM graphs with onnxruntime's own quantizer (MatMulNBits).

`facert build --backend onnxruntime --precision int8|int4 [--block-size 32]` exports the fp32
graphs (export/onnx_export.py) and then rewrites the two LLM graphs here. In both the prefill and
the decode graph every MatMul whose right-hand side is a weight [K, N] -- per layer the fused
q/k/v, o_proj, the fused gate/up and down_proj, and the lm_head -- becomes one `MatMulNBits`
(com.microsoft) node: the weight is cut along K into blocks of `block_size` values, each block
stored as 8- or 4-bit unsigned integers with its own fp32 scale and zero point (round to
nearest from the block's min and max, onnxruntime's default scheme). The lm_head is quantized to
8 bits at both precisions (OUTPUT_BITS).

Block offsets. MatMulNBits' fast CPU kernels take integer zero points, so a block's grid always
holds 0 and cannot be shifted by a fraction of a step. Every quantized block therefore also gets
the mean of what rounding took off it (a float per block and column, [K / block_size, N]), and the
graph adds it back: y = [x, the means of x's blocks] @ [W; block_size * offsets], the offsets as
K / block_size more rows of the same MatMulNBits, quantized to 4 bits in blocks of their own
(append_offset_rows): an AveragePool and a Concat more per matmul, not a MatMul and an Add more. On weights that are
themselves decoded from a min/max grid with a float minimum (the demo model's, from its Q4_1 GGUF
file; GPTQ/AWQ-style asymmetric checkpoints) this reproduces the grid but for the offsets' own
4-bit rounding (about 1/30 of a step); on others it is the least-squares correction of each
block's mean.

What stays fp32, and why:
* RoPE: a RotaryEmbedding node over fp32 cos/sin tables (export.onnx_export.fuse_rotary_embedding),
  or, in a graph it was not fused in, the [head_dim, head_dim] signed permutation KVCacheLLM
  applies as a MatMul: quantizing -1/0/+1 on an asymmetric grid would move every rotated value by ~7 %;
* the token-embedding table (embed_tokens.npy, gathered row by row outside the graphs): a step
  reads one row of it, so its size costs nothing per token, while its precision enters every
  input. With tied embeddings (SmolLM2, Qwen2.5-0.5B) the lm_head's graph weight is its own
  [D, V] copy, quantized like every other matmul, while the table the runtime gathers from keeps
  the exact fp32 rows;
* the vision tower, face parser, seg branch and attribute head (their graphs are left as built:
  they run once per request, and prefill, not them, is what a quantized LLM speeds up).

The pass streams, like the export (export/onnx_export.py): the graphs are read without their
weights, and one weight at a time is read from llm.onnx.data, a slice of columns at a time
(MAX_SLICE_BYTES), quantized by onnxruntime's MatMulNBitsQuantizer (run on a one-node graph
holding just that MatMul) and written to the new data file, so peak memory is about one quantized
weight plus the graphs' structure, not the model. A weight both graphs share (the same bytes in
the fp32 file) is quantized and written once, and both graphs point at it; the weights that stay
fp32 are copied over the same way.

accuracy_level (MatMulNBits' compute type) is chosen per precision by measurement on the demo model
(see ACCURACY_LEVEL): 4 lets onnxruntime's CPU kernels quantize the activations of each block to int8
and multiply in int8 (AVX512-VNNI / AVX2), 1 multiplies in fp32. At level 1 an 8-bit weight is
stored as two 4-bit nibble planes (nibble_planes), the same weight on onnxruntime's fast fp32 4-bit
kernel.

What the scheme costs on the demo model, and the schemes measured against it:
benchmarks/results/2026-11-30-quant-offsets (and NOTES.md there and in 2026-11-30-quant-3d1219c7).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from export.onnx_export import release_freed_memory, use_contrib_domain
from runtime.manifest import QUANTIZED_OP, TWICE, WITH_BLOCK_MEANS, EngineError
from runtime.manifest import QUANTIZED_BITS as BITS

DEFAULT_BLOCK_SIZE = 32
# MatMulNBits' compute type per precision, by measurement on the demo model (2-core AMD EPYC with
# AVX512-VNNI; benchmarks/results/2026-11-30-quant-planes/NOTES.md). Level 4 (activations rounded to
# int8 per block, int8 dot products) is the faster, and its activation rounding is what bounds
# agreement with fp32 (int8 and int4 alike end near 95-97 % top-1 at level 4). int4 is the fast
# precision: level 4 (decode step 32.6 ms against 44.9 at level 1, 2026-11-30-quant-3d1219c7). int8 is
# the near-lossless one: level 1, on nibble planes with block offsets (10 prompts: 99.3 % top-1 against
# 95.7 % at level 4), at about fp32's decode speed and a quarter of its weight bytes.
ACCURACY_LEVEL = {"int8": 1, "int4": 4}
ACCURACY_LEVELS = (1, 4)  # the two compute types onnxruntime's x86 kernels have for fp32 activations
# The lm_head's bits: 8 at both precisions. It is the largest single matmul (a fifth of SmolLM2's
# weights) and what every score goes through; the demo model's agreement with fp32, 10 prompts
# (benchmarks/results/2026-11-30-quant-offsets/NOTES.md): int4 with an int4 lm_head 84.1 %, with an
# int8 one 95.7 % (llama.cpp's 4-bit recipes keep the output matrix at 6-8 bits too).
OUTPUT_BITS = {"int8": 8, "int4": 8}
LLM_GRAPHS = ("llm_prefill", "llm_decode")


def check_block_size(block_size: int) -> None:
    # MatMulNBits' CPU kernels take power-of-two blocks of at least 16 values
    if block_size < 16 or block_size & (block_size - 1):
        raise EngineError(f"--block-size must be a power of two >= 16, got {block_size}")


def quantizer_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


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


# onnxruntime's quantizer takes the weight as one protobuf initializer, which cannot pass 2 GiB (a
# Qwen2 8B lm_head is 2.2 GB in fp32), and holds a few copies of it while it works. A weight goes
# through in slices of columns: MatMulNBits lays out its packed blocks, scales and zero points column
# by column, so the slices' results fit together exactly. The slice is small against the weights a
# build holds elsewhere: each holds ~5 copies of itself in the quantizer and the offsets'
# dequantization (facellm-1b int4 peaked at 4.4 GiB with 256 MiB slices).
MAX_SLICE_BYTES = 64 * 2**20
OFFSETS_SUFFIX = "_block_offsets"


def matmul_layout(bits: int, accuracy_level: int, offsets: bool) -> tuple[bool, bool]:
    """(block offsets?, nibble planes?) for a matmul of `bits` at `accuracy_level`. Offsets go on every
    4-bit matmul, and on 8-bit ones only with fp32 activations: an 8-bit block's grid is off by at
    most 1/16 of a 4-bit one's half step, which level 4's activation rounding swamps (demo model,
    50 prompts: 95.8 % top-1 with offsets against 95.6 % without, 2026-11-30-quant-offsets-shared)
    while at level 1 it is what is left (10 prompts: 99.3 % against 97.1 %)."""
    planes = bits == 8 and accuracy_level == 1
    return offsets and (bits == 4 or planes), planes


def quantize_matmul(node: onnx.NodeProto, weight: np.ndarray, weight_name: str, bits: int,
                    block_size: int = DEFAULT_BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL["int4"],
                    offsets: bool = True) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """One MatMul with its weight [K, N] -> (the MatMulNBits node, its initializers: packed weight,
    scales, zero points), by onnxruntime's MatMulNBitsQuantizer run on a graph of just that node, in
    slices of at most MAX_SLICE_BYTES of columns. With `offsets` (4 bits) the node holds the blocks'
    offsets as K / block_size more rows, to be fed [x, the means of x's blocks] (matmul_input_nodes)."""
    from onnx import numpy_helper

    qnode, arrays = _quantize_columns(node, weight, weight_name, bits, block_size, accuracy_level, offsets)
    return qnode, [numpy_helper.from_array(a, name) for name, a in arrays.items()]


class MappedWeight:
    """A weight [K, N] in a data file that `[:, a:b]` reads a slice of columns of, each slice through a
    map of its own, unmapped once copied: no more of the weight is resident than the slice."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], dtype):
        self.path, self.offset, self.shape, self.dtype = path, offset, shape, np.dtype(dtype)

    def __getitem__(self, index) -> np.ndarray:
        mapped = np.memmap(self.path, self.dtype, "r", self.offset, self.shape)
        try:
            return np.array(mapped[index])
        finally:
            del mapped


def _quantize_columns(node: onnx.NodeProto, weight, weight_name: str, bits: int, block_size: int,
                      accuracy_level: int, offsets: bool) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """quantize_matmul's work, on a weight (an array or a MappedWeight) read a slice of columns at a time;
    the arrays by name, each allocated once at its full size; laid out as matmul_layout says (nibble
    planes, offset rows) where K is a multiple of the block."""
    from onnx import numpy_helper

    k, n = weight.shape
    offsets, planes = (choice and k % block_size == 0 for choice in matmul_layout(bits, accuracy_level, offsets))
    columns = max(1, MAX_SLICE_BYTES // (4 * k))
    qnode, arrays = None, {}
    for start in range(0, n, columns):
        part = weight[:, start:start + columns]
        qnode, inits = _quantize_slice(node, part, weight_name, bits, block_size, accuracy_level)
        pieces = {t.name: numpy_helper.to_array(t) for t in inits}
        if offsets:
            pieces[weight_name + OFFSETS_SUFFIX] = block_offsets(part, inits, bits, block_size)
        del part, inits
        for name, piece in pieces.items():
            # MatMulNBits' tensors are laid out column by column (axis 0), the offsets [blocks, N] (axis 1)
            axis = 1 if name.endswith(OFFSETS_SUFFIX) else 0
            if name not in arrays:
                shape = list(piece.shape)
                shape[axis] = n
                arrays[name] = np.empty(shape, piece.dtype)
            stop = start + piece.shape[axis]
            if axis:
                arrays[name][:, start:stop] = piece
            else:
                arrays[name][start:stop] = piece
    for attribute in qnode.attribute:
        if attribute.name == "N":
            attribute.i = n
    offsets_array = arrays.pop(weight_name + OFFSETS_SUFFIX, None)
    if planes:
        qnode, arrays = nibble_planes(qnode, arrays, block_size)
    if offsets_array is not None:
        qnode, arrays = append_offset_rows(qnode, arrays, offsets_array, block_size, accuracy_level)
    return qnode, arrays


def _quantize_slice(node: onnx.NodeProto, weight: np.ndarray, weight_name: str, bits: int, block_size: int,
                    accuracy_level: int) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info(node.input[0], TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ascontiguousarray(weight, dtype=np.float32), weight_name)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quantizer = _quantizer_class()(model, bits=bits, block_size=block_size, is_symmetric=False,
                                   accuracy_level=accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    out = quantizer.model.model.graph
    if [n.op_type for n in out.node] != [QUANTIZED_OP]:
        raise EngineError(f"onnxruntime's quantizer did not rewrite {node.name} as one {QUANTIZED_OP} "
                          f"(got {[n.op_type for n in out.node]})")
    # copies: a message taken from the quantizer's model keeps that whole model alive, fp32 weight and all
    node_copy = onnx.NodeProto()
    node_copy.CopyFrom(out.node[0])
    inits = []
    for t in out.initializer:
        inits.append(onnx.TensorProto())
        inits[-1].CopyFrom(t)
    return node_copy, inits


def dequantize(qinits: list[onnx.TensorProto], bits: int, k: int) -> np.ndarray:
    """The [K, N] weight a MatMulNBits node's packed weight, scales and zero points stand for
    (its layout: [N, blocks, bytes] codes, low nibble first; [N, blocks] scales; zero points per
    block, packed like the codes)."""
    from onnx import numpy_helper

    packed, scales, zero_points = (numpy_helper.to_array(t) for t in qinits)
    n, blocks = packed.shape[0], packed.shape[1]
    if bits == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1)
        zero_points = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1).reshape(n, -1)[:, :blocks]
    else:
        codes = packed
    w = (codes.astype(np.float32) - zero_points.reshape(n, blocks, 1)) * scales.reshape(n, blocks, 1)
    return w.reshape(n, -1)[:, :k].T


def nibble_planes(qnode: onnx.NodeProto, arrays: dict[str, np.ndarray], block_size: int
                  ) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """An 8-bit MatMulNBits (K, N) as one 4-bit MatMulNBits (2K, N) of the same weight, to be fed [x, x].

    Why: onnxruntime's x86 kernels multiply 8-bit weights either with the activations rounded to int8
    per block (accuracy level 4) or on a slow reference path in fp32 (level 1, ~20x slower), while
    4-bit weights have a fast fp32 kernel. A code c = 16 h + l with zero point z = 16 zh + zl gives
    s (c - z) = 16 s (h - zh) + s (l - zl): the first K rows hold the high nibbles with scales 16 s,
    the next K the low nibbles with scales s. The same int8 weight, exactly (a power-of-two scale
    multiple), at the same bytes."""
    name = qnode.input[1]
    packed, scales, zero_points = (arrays[name], arrays[qnode.input[2]], arrays[qnode.input[3]])
    n, blocks, _ = packed.shape
    if blocks * block_size != _attribute(qnode, "K"):
        raise EngineError(f"{qnode.name}: nibble planes need K a multiple of the block size")

    zero_points = zero_points.reshape(n, blocks)
    scales = scales.reshape(n, blocks)
    four_bit = name.removesuffix("_Q8") + "_Q4"
    planes = {four_bit: _packed_nibbles(np.concatenate([packed >> 4, packed & 0x0F], axis=1)),
              qnode.input[2]: np.concatenate([scales * 16, scales], axis=1).astype(np.float32),
              qnode.input[3]: _packed_nibbles(np.concatenate([zero_points >> 4, zero_points & 0x0F], axis=1))}
    node = onnx.NodeProto()
    node.CopyFrom(qnode)
    node.input[1] = four_bit
    for attribute in node.attribute:
        if attribute.name == "K":
            attribute.i *= 2
        elif attribute.name == "bits":
            attribute.i = 4
    return node, planes


def append_offset_rows(qnode: onnx.NodeProto, arrays: dict[str, np.ndarray], offsets: np.ndarray, block_size: int,
                       accuracy_level: int) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """A 4-bit MatMulNBits (K, N) and its blocks' offsets [K / block_size, N] -> one 4-bit MatMulNBits
    (K + K / block_size, N) to be fed [x, the block means of x]: block_size times the offsets as more rows
    of the weight, quantized to 4 bits in blocks of their own (zero rows pad the last).

    Why not a MatMul of the block means and an Add after MatMulNBits: a decode step is bound by its
    node count (benchmarks/results/2026-11-30-quant-offsets/NOTES.md), and the two nodes per matmul
    cost the demo model's int4 decode step 2.3 of 13.7 ms. What the offsets' 4-bit rounding costs:
    2026-11-30-quant-planes/NOTES.md."""
    k, n = _attribute(qnode, "K"), _attribute(qnode, "N")
    if _attribute(qnode, "bits") != 4:
        raise EngineError(f"{qnode.name}: block offsets go on 4-bit MatMulNBits nodes (or 8-bit ones on nibble planes)")
    name, scales_name, zero_points_name = qnode.input[1:4]
    rows = np.zeros((-(-offsets.shape[0] // block_size) * block_size, n), np.float32)
    rows[:offsets.shape[0]] = offsets * block_size  # fed the blocks' means, not their sums
    rows_node = onnx.helper.make_node("MatMul", ["x", name + "_offset_rows"], ["y"], name=qnode.name + "_offset_rows")
    rows_qnode, rows_arrays = _quantize_columns(rows_node, rows, name + "_offset_rows", 4, block_size, accuracy_level,
                                                offsets=False)
    rows_packed, rows_scales, rows_zero_points = (rows_arrays[i] for i in rows_qnode.input[1:4])
    blocks, rows_blocks = arrays[name].shape[1], rows_packed.shape[1]

    def zero_point_values(packed: np.ndarray, count: int) -> np.ndarray:
        packed = packed.reshape(n, -1)
        return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1)[:, :count]

    merged = {name: np.concatenate([arrays[name], rows_packed], axis=1),
              scales_name: np.concatenate([arrays[scales_name].reshape(n, blocks),
                                           rows_scales.reshape(n, rows_blocks)], axis=1),
              zero_points_name: _packed_nibbles(np.concatenate([zero_point_values(arrays[zero_points_name], blocks),
                                                                zero_point_values(rows_zero_points, rows_blocks)], axis=1))}
    node = onnx.NodeProto()
    node.CopyFrom(qnode)
    for attribute in node.attribute:
        if attribute.name == "K":
            attribute.i = k + offsets.shape[0]
    return node, merged


def _packed_nibbles(values: np.ndarray) -> np.ndarray:
    """Values 0..15 [..., m] in MatMulNBits' 4-bit layout: two to a byte, low nibble first, m padded to even."""
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros(values.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def _attribute(node: onnx.NodeProto, name: str) -> int:
    return next(a.i for a in node.attribute if a.name == name)


def block_offsets(weight: np.ndarray, qinits: list[onnx.TensorProto], bits: int, block_size: int) -> np.ndarray:
    """[K / block_size, N]: per block of each column, the mean of what quantization took off the
    weight (the least-squares constant to add back to the block's dequantized values)."""
    k, n = weight.shape
    residual = weight - dequantize(qinits, bits, k)
    return residual.reshape(k // block_size, block_size, n).mean(axis=1, dtype=np.float64).astype(np.float32)


def _is_quantizable(weight) -> bool:
    """A linear layer's weight [K, N] (an array or a MappedWeight); not the RoPE rotate_half matrix
    (square, entries in {-1, 0, 1}, one non-zero per row), which stays exact."""
    if len(weight.shape) != 2:
        return False
    if weight.shape[0] != weight.shape[1]:
        return True
    w = weight[:, :]
    return not (np.isin(w, (-1.0, 0.0, 1.0)).all() and (np.count_nonzero(w, axis=1) == 1).all())


def _external(tensor: onnx.TensorProto) -> dict | None:
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


class _WeightFiles:
    """Reads initializers from the fp32 folder (inline or external) and writes the new data file,
    each distinct tensor once (keyed by where its bytes came from)."""

    def __init__(self, root: Path, target: Path, location: str):
        self.root, self.location = root, location
        self.target = open(target, "wb")
        self.sources: dict[str, object] = {}
        self.copied: dict[tuple, tuple[int, int]] = {}

    def close(self) -> None:
        self.target.close()
        for f in self.sources.values():
            f.close()

    def key(self, tensor: onnx.TensorProto) -> tuple:
        ext = _external(tensor)
        if ext is None:
            import hashlib

            return ("inline", hashlib.sha256(tensor.raw_data).hexdigest()) if tensor.raw_data else ("proto", id(tensor))
        return (ext["location"], int(ext.get("offset", 0)), int(ext["length"]))

    def weight(self, tensor: onnx.TensorProto):
        """The tensor's values: an array, or for one in a data file a MappedWeight (read a slice at a time)."""
        from onnx import helper, numpy_helper

        ext = _external(tensor)
        if ext is None:
            return numpy_helper.to_array(tensor)
        return MappedWeight(self.root / ext["location"], int(ext.get("offset", 0)), tuple(tensor.dims),
                            helper.tensor_dtype_to_np_dtype(tensor.data_type))

    def _write(self, raw) -> tuple[int, int]:
        self.target.write(b"\0" * ((-self.target.tell()) % 64))  # aligned, as the export writes them
        offset = self.target.tell()
        self.target.write(raw)
        return offset, memoryview(raw).nbytes

    def externalise(self, tensor: onnx.TensorProto, place: tuple[int, int] | None = None) -> tuple[int, int]:
        """Point `tensor` at its bytes in the new file (written now unless `place` says where they are)."""
        from onnx import numpy_helper

        if place is None:
            raw = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.from_array(
                numpy_helper.to_array(tensor)).raw_data
            place = self._write(raw)
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            tensor.ClearField(field)
        del tensor.external_data[:]
        for k, v in (("location", self.location), ("offset", str(place[0])), ("length", str(place[1]))):
            tensor.external_data.add(key=k, value=v)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        return place

    def copy(self, tensor: onnx.TensorProto) -> None:
        """An fp32 weight that stays: its bytes into the new file (once), the tensor pointed there."""
        key = self.key(tensor)
        if key not in self.copied:
            self.copied[key] = self._write(self.weight(tensor)[...].tobytes())
        self.externalise(tensor, self.copied[key])

    def write_array(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """A new tensor `name` holding `array`, its bytes written to the new file."""
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        self.externalise(tensor, self._write(np.ascontiguousarray(array).data))
        return tensor


def _rename(proto, old: str, new: str):
    """A copy of a quantized node or initializer made for weight `old`, for weight `new` (the other graph's
    name for the same weight)."""
    def renamed(name: str) -> str:
        if not name.startswith(old):
            raise EngineError(f"onnxruntime's quantizer named {name!r}, not after its weight {old!r}")
        return new + name[len(old):]

    out = type(proto)()
    out.CopyFrom(proto)
    if isinstance(out, onnx.TensorProto):
        out.name = renamed(out.name)
    else:
        out.input[1:] = [renamed(i) for i in out.input[1:]]
    return out


def matmul_input_nodes(x: str, rank: int, k: int, qnode: onnx.NodeProto, block_size: int
                       ) -> tuple[str, list[onnx.NodeProto], list[onnx.TensorProto]]:
    """What a quantized node of an x [B, S, K] multiplies: x itself, or [x, x] (nibble planes), each
    followed by the means of x's blocks [B, S, K / block_size] where the node holds block offsets as
    rows (its K attribute says which: copies * K + K / block_size). The means are one AveragePool over
    the last axis (x read as [N, C, W]), not a Reshape and a ReduceSum: one node fewer per matmul, in a
    step bound by its node count (demo int4 decode step 10.4 -> 9.7 ms); the rows carry block_size
    times the offsets (append_offset_rows). An x [B, K] is pooled as [B, 1, K]. -> (its name, the nodes
    and constants that make it)."""
    from onnx import helper, numpy_helper

    copies, extra = divmod(_attribute(qnode, "K"), k)
    if copies == 1 and not extra:
        return x, [], []
    inputs, nodes, name = [x] * copies, [], x + (TWICE if copies == 2 else "")
    constants = []
    if extra:
        if rank not in (2, 3):
            raise EngineError(f"cannot feed block offsets to {qnode.name}: its input {x} has rank {rank}, not 2 or 3")
        means = f"{x}_block_means"
        pool = helper.make_node("AveragePool", [x], [means], name=means, kernel_shape=[block_size], strides=[block_size])
        if rank == 2:  # [B, K] (the lm_head's last position): pooled as [B, 1, K], the means back to [B, K / bs]
            constants = [numpy_helper.from_array(np.array(shape, dtype=np.int64), label)
                         for shape, label in (([0, 1, -1], "facert_rank_3"), ([0, -1], "facert_rank_2"))]
            pool.input[0], pool.output[0] = f"{x}_rank_3", f"{means}_rank_3"
            nodes += [helper.make_node("Reshape", [x, "facert_rank_3"], [pool.input[0]], name=pool.input[0]), pool,
                      helper.make_node("Reshape", [pool.output[0], "facert_rank_2"], [means], name=f"{means}_rank_2")]
        else:
            nodes.append(pool)
        inputs.append(means)
        name += WITH_BLOCK_MEANS
    return name, nodes + [helper.make_node("Concat", inputs, [name], name=name, axis=-1)], constants


def _quantize_graph_streaming(graph: onnx.ModelProto, files: _WeightFiles, done: dict, bits: int, output_bits: int,
                              block_size: int, accuracy_level: int, offsets: bool) -> dict:
    """Rewrite one graph (loaded without its weights) in place; `done` maps a source weight to its
    quantized node and initializers, shared across graphs. The matmul that writes a graph output
    (the lm_head, writing the logits) gets `output_bits`, the others `bits`."""
    inits = {t.name: t for t in graph.graph.initializer}
    outputs = {o.name for o in graph.graph.output}
    typed = onnx.shape_inference.infer_shapes(graph).graph
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*typed.input, *typed.value_info)
             if v.type.tensor_type.HasField("shape")}
    nodes, added, quantized, kept, with_offsets, as_planes = [], [], 0, 0, 0, 0
    made: set[str] = set()  # the concatenations of an x already in the graph
    for node in graph.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if weight is None:  # not a MatMul, or q @ k^T / probs @ v (activations on both sides)
            nodes.append(node)
            continue
        key = files.key(weight)
        node_bits = output_bits if node.output[0] in outputs else bits
        if key not in done:
            w = files.weight(weight)
            if not _is_quantizable(w):
                done[key] = None
            else:
                qnode, arrays = _quantize_columns(node, w, weight.name, node_bits, block_size, accuracy_level, offsets)
                done[key] = (weight.name, qnode, [files.write_array(name, a) for name, a in arrays.items()])
                del arrays
            del w
            release_freed_memory(collect=False)
        if done[key] is None:
            kept += 1
            nodes.append(node)
            continue
        source_name, qnode, qinits = done[key]
        qnode = _rename(qnode, source_name, weight.name)
        qinits = [_rename(t, source_name, weight.name) for t in qinits]
        rank = ranks.get(node.input[0])
        if not rank:
            raise EngineError(f"cannot quantize {node.name}: the rank of {node.input[0]} is unknown")
        fed, input_nodes, constants = matmul_input_nodes(node.input[0], rank, weight.dims[0], qnode, block_size)
        if fed not in made:  # two matmuls of one x share what is made of it
            made.add(fed)
            nodes += input_nodes
            added += [t for t in constants if t.name not in {a.name for a in added}]
        as_planes += TWICE in fed
        with_offsets += fed.endswith(WITH_BLOCK_MEANS)
        del qnode.input[0], qnode.output[:]
        qnode.input.insert(0, fed)
        qnode.output.append(node.output[0])
        qnode.name = node.name + f"_Q{node_bits}"
        nodes.append(qnode)
        added += qinits
        quantized += 1
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    used = {i for n in graph.graph.node for i in n.input}
    keep = [t for t in graph.graph.initializer if t.name in used]
    for t in keep:
        if _external(t) is not None:
            files.copy(t)
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(keep + added)
    use_contrib_domain(graph)
    return {"bits": bits, "output_bits": output_bits, "block_size": block_size, "accuracy_level": accuracy_level,
            "quantized_matmuls": quantized, "matmuls_with_offsets": with_offsets, "matmuls_as_nibble_planes": as_planes,
            "fp32_matmuls": kept}


def quantize_llm(out_dir: Path, components: dict[str, dict], precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                 accuracy_level: int | None = None, offsets: bool = True,
                 progress: Callable[[str], None] = lambda _m: None) -> dict:
    """Rewrite the exported LLM graphs in out_dir in `precision`, streaming their weights; updates their
    component entries in place and returns the manifest's `quantization` record."""
    import os

    from export.onnx_export import LLM_DATA_FILE
    from runtime.manifest import io_signature

    if precision not in BITS:
        raise EngineError(f"quantization precision must be one of {', '.join(BITS)}, got {precision!r}")
    check_block_size(block_size)
    bits = BITS[precision]
    if accuracy_level is None:
        accuracy_level = ACCURACY_LEVEL[precision]
    out_dir = Path(out_dir)
    fp32_bytes = (out_dir / LLM_DATA_FILE).stat().st_size
    staging = out_dir / (LLM_DATA_FILE + ".quantizing")
    graphs, per_graph, done = {}, {}, {}
    release_freed_memory()
    t0 = time.perf_counter()
    files = _WeightFiles(out_dir, staging, LLM_DATA_FILE)
    try:
        for name in LLM_GRAPHS:
            progress(f"quantizing {name} to {precision} (MatMulNBits, block {block_size})")
            graph = onnx.load(str(out_dir / components[name]["file"]), load_external_data=False)
            per_graph[name] = _quantize_graph_streaming(graph, files, done, bits, OUTPUT_BITS[precision], block_size,
                                                        accuracy_level, offsets)
            if io_signature(graph) != {k: components[name][k] for k in ("inputs", "outputs")}:
                raise EngineError(f"quantizing {name} changed its inputs or outputs")
            graphs[name] = graph
    finally:
        files.close()
    del done
    os.replace(staging, out_dir / LLM_DATA_FILE)
    for name, graph in graphs.items():
        path = out_dir / components[name]["file"]
        path.write_bytes(graph.SerializeToString())
        onnx.checker.check_model(str(path))  # by path: follows the external data references
        components[name].update(precision=precision, quantization=per_graph[name])
    layouts = {b: matmul_layout(b, accuracy_level, offsets) for b in sorted({bits, OUTPUT_BITS[precision]})}
    offsets_bits = [b for b, (with_offsets, _planes) in layouts.items() if with_offsets]
    planes_bits = [b for b, (_offsets, planes) in layouts.items() if planes]
    scheme = "block-wise weight-only, asymmetric (uint, zero point per block), round to nearest"
    if offsets_bits:
        scheme += (f", plus, in {'/'.join(map(str, offsets_bits))}-bit matmuls, each block's mean residual as an "
                   f"offset: K/{block_size} more 4-bit rows of the weight, fed the block means of x")
    if planes_bits:
        scheme += ", 8-bit codes stored as two 4-bit nibble planes of one 4-bit MatMulNBits over [x, x]"
    return {"scheme": scheme, "operator": f"com.microsoft.{QUANTIZED_OP}", "bits": bits,
            "output_bits": OUTPUT_BITS[precision], "block_size": block_size,
            "block_offsets_bits": offsets_bits, "nibble_planes_bits": planes_bits,
            "accuracy_level": accuracy_level, "components": list(LLM_GRAPHS),
            "quantizer": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
            "quantizer_version": quantizer_version(),
            "kept_fp32": ["embed_tokens (gathered, not multiplied)", "RoPE tables", "vision", "parser", "seg",
                          "attributes"],
            "llm_data_bytes": {"fp32": fp32_bytes, precision: (out_dir / LLM_DATA_FILE).stat().st_size},
            "seconds": round(time.perf_counter() - t0, 1)}


def quantized_copy(fp32_engines: Path, out: Path, precision: str, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int | None = None, offsets: bool = True) -> Path:
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
    manifest["quantization"] = quantize_llm(out, manifest["components"], precision, block_size, accuracy_level, offsets)
    manifest["quantization"]["derived_from"] = str(Path(fp32_engines).resolve())
    manifest["precision"] = precision
    write_manifest(out, manifest)
    return out
