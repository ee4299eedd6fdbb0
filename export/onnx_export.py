"""ONNX export: every component of a facert model as an ONNX graph, opset 17, dynamic batch.

Graphs (file -> inputs -> outputs):

  vision.onnx       pixel_values [B,3,S,S] f32 -> image_tokens [B,N,D], pooled [B,D_vis]
  parser.onnx       parser_pixels [B,3,P,P] f32 -> labels [B,L,L] uint8   (FaceInsight)
  seg.onnx          labels [B,L,L] uint8 -> seg_tokens [B,N_seg,D]        (FaceInsight)
  attributes.onnx   pooled [B,D_vis] -> probs [B,40]                       (FaceInsight)
  llm_prefill.onnx  inputs_embeds [B,T,D], attention_mask [B,T], position_ids [B,T]
                    -> logits [B,V] (last position), present_key_i / present_value_i [B,Hkv,T,hd]
  llm_decode.onnx   inputs_embeds [B,S,D], attention_mask [B,P+S], position_ids [B,S],
                    past_key_i / past_value_i [B,Hkv,P,hd]
                    -> logits [B,V], present_key_i / present_value_i [B,Hkv,S,hd]
  llm.onnx.data     the LLM weights, stored once and shared by both LLM graphs (external data)
  embed_tokens.npy  the token-embedding matrix [V,D]: the prompt-table splice stays outside the
                    graphs, so the runtime gathers token rows itself (numpy, memory-mapped)

The parser graph ends in argmax and a nearest resize, so it returns the label map at the seg
branch's label size as uint8 (what the seg graph takes); the attribute graph returns probabilities
(the logical-constraint step stays in Python, `runtime.models.attributes.apply_constraints`).

The LLM graphs. transformers' decoder forward threads a Cache object through the layers, which
does not export to a graph with plain KV tensors, so `KVCacheLLM` runs the HF module's own
weights and submodules (RMSNorm, o/down_proj, activation, lm_head, rotary inv_freq; q/k/v and
gate/up concatenated into one matmul each) with an attention written here over explicit K/V
tensors. Its choices are for the runtime's preallocated cache:

* `present_*` holds the K/V of the tokens of this call only. The caller owns a cache buffer
  [B,Hkv,max_len,hd] per layer and writes those few rows into it at cache_position.
* The decode graph attends to the past buffer and to the new tokens in two matmuls and one
  softmax over the concatenated scores, so the graph never concatenates (copies) the cache:
  a decode step reads the cache in place and writes only the new rows.
* Grouped-query attention groups the query heads per KV head ([B,Hkv,G*S,hd] @ K^T) instead
  of repeating K/V, which would copy the cache G times per step.
* `attention_mask` is 1 for real tokens and 0 for left padding or unwritten cache rows;
  masked scores are set to the dtype's minimum (no -inf, so a fully masked padded row stays
  finite). Softmax runs in fp32.

Exporter: torch.onnx.export's TorchScript-based exporter (`dynamo=False`), then onnxslim.
Measured on the demo model (2-core CPU, first version of KVCacheLLM): the torch.export-based exporter (`dynamo=True`, which
also needs the onnxscript package) took 108 s for the prefill graph against 15 s here, and
12.5 s against 0.4 s for the vision graph; ORT ran both exporters' graphs at the same speed
(prefill 170 vs 191 ms, vision 17.3 vs 16.8 ms, unslimmed). Its graphs have fewer nodes (1777 vs
5402 for prefill) but onnxslim brings the TorchScript ones to 2284 in about 10 s, so the faster,
dependency-free exporter is the one used. Every graph passes `onnx.checker`. With the fused
projections and constant-shape reshapes of the current KVCacheLLM the demo's decode graph is
3372 nodes as exported, 1572 after onnxslim (was 5951 / 2505).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import external_data_helper
from torch import nn

from runtime.manifest import io_signature

OPSET = 17
LLM_DATA_FILE = "llm.onnx.data"
EMBED_FILE = "embed_tokens.npy"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GiB limit, with headroom


class ExportError(RuntimeError):
    """A graph that failed to export, check or simplify."""


# ------------------------------------------------------------------------------- graph modules

class VisionGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values)


class ParserGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, parser_pixels):
        return self.model.parse_face(parser_pixels)


class SegGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.seg = model.seg

    def forward(self, labels):
        return self.seg.reference(labels)  # plain torch ops; the Triton kernel is CUDA-only


class AttributeGraph(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.head = model.attributes

    def forward(self, pooled):
        return self.head(pooled)


class Reshape(torch.autograd.Function):
    """x.reshape(shape) with ONNX Reshape's conventions (0: keep that input dim, -1: infer), exported
    as one Reshape with a constant shape. torch's view(b, s, ...) with traced sizes would export as a
    Shape -> Gather -> Unsqueeze -> Concat chain per call, a few hundred small nodes per decode step."""

    @staticmethod
    def forward(ctx, x, shape):
        return x.reshape([x.shape[i] if d == 0 else d for i, d in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def reshape(x, *shape):
    return Reshape.apply(x, shape)


class KVCacheLLM(nn.Module):
    """A transformers Llama/Qwen2 *ForCausalLM run with explicit K/V tensors (see module doc).

    The HF module's own RMSNorm modules, o_proj/down_proj Linears, activation, final norm, lm_head
    and rotary inv_freq are used as they are; three weights are re-laid out once, here:
    q/k/v_proj as one [(H + 2 Hkv) hd, D] matrix (with q pre-multiplied by the attention scaling,
    which commutes with RoPE) and gate/up_proj as one matrix, so a layer runs 4 matmuls on its
    input instead of 7; and RoPE's rotate_half is a constant signed permutation (a [hd, hd]
    matmul) applied to q and k together. Same arithmetic, fewer and larger ops: at batch 1 each
    op is a few microseconds of fixed cost against a decode step of a few tens of milliseconds.
    """

    def __init__(self, causal_lm):
        super().__init__()
        self.lm = causal_lm
        cfg = causal_lm.config
        self.num_layers = cfg.num_hidden_layers
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.groups = self.num_heads // self.num_kv_heads
        rotary = causal_lm.model.rotary_emb
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        half = self.head_dim // 2
        rotate = torch.zeros(self.head_dim, self.head_dim)
        rotate[torch.arange(half) + half, torch.arange(half)] = -1.0  # out[:half] = -x[half:]
        rotate[torch.arange(half), torch.arange(half) + half] = 1.0  # out[half:] = x[:half]
        self.register_buffer("rotate", rotate.to(causal_lm.lm_head.weight.dtype), persistent=False)
        with torch.no_grad():
            for i, layer in enumerate(causal_lm.model.layers):
                a, mlp = layer.self_attn, layer.mlp
                self.register_buffer(f"qkv_weight_{i}", torch.cat(
                    [a.q_proj.weight * a.scaling, a.k_proj.weight, a.v_proj.weight]), persistent=False)
                bias = None
                if a.q_proj.bias is not None:
                    bias = torch.cat([a.q_proj.bias * a.scaling, a.k_proj.bias, a.v_proj.bias])
                self.register_buffer(f"qkv_bias_{i}", bias, persistent=False)
                self.register_buffer(f"gate_up_weight_{i}", torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                     persistent=False)
                gate_up_bias = None
                if mlp.gate_proj.bias is not None:
                    gate_up_bias = torch.cat([mlp.gate_proj.bias, mlp.up_proj.bias])
                self.register_buffer(f"gate_up_bias_{i}", gate_up_bias, persistent=False)

    def _rope(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq  # [B,S,hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B,1,S,hd]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def _qkv(self, i, layer, x, cos, sin):
        """q [B,Hkv,G*S,hd] (the G query heads of each KV head side by side, pre-scaled), k, v [B,Hkv,S,hd]."""
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = F.linear(layer.input_layernorm(x), getattr(self, f"qkv_weight_{i}"), getattr(self, f"qkv_bias_{i}"))
        qkv = reshape(qkv, 0, -1, h + 2 * hkv, hd).transpose(1, 2)  # [B, H+2Hkv, S, hd]
        qk, v = qkv[:, :h + hkv], qkv[:, h + hkv:]
        qk = qk * cos + torch.matmul(qk, self.rotate) * sin
        return reshape(qk[:, :h], 0, hkv, -1, hd), qk[:, h:], v

    def _allowed(self, allowed):
        """[B,1,S,K] -> [B,1,G*S,K], in the order of the grouped query rows."""
        return allowed.repeat(1, 1, self.groups, 1)

    def _finish_layer(self, i, layer, x, attn_out):
        """attn_out [B,Hkv,G*S,hd] -> o_proj + residual, then the MLP + residual."""
        out = reshape(reshape(attn_out, 0, self.num_heads, -1, self.head_dim).transpose(1, 2), 0, 0, -1)
        x = x + layer.self_attn.o_proj(out)
        gate_up = F.linear(layer.post_attention_layernorm(x), getattr(self, f"gate_up_weight_{i}"),
                           getattr(self, f"gate_up_bias_{i}"))
        gate, up = gate_up.chunk(2, dim=-1)
        return x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)

    @staticmethod
    def _softmax(scores, allowed):
        scores = torch.where(allowed, scores.float(), torch.finfo(torch.float32).min)
        return scores.softmax(dim=-1)

    def _logits(self, x):
        return self.lm.lm_head(self.lm.model.norm(x[:, -1])).float()

    def prefill(self, inputs_embeds, attention_mask, position_ids):
        s = inputs_embeds.shape[1]
        idx = torch.arange(s, device=inputs_embeds.device)
        causal = idx[None, :] <= idx[:, None]  # [S,S]: query i sees keys j <= i
        allowed = self._allowed(causal[None, None] & (attention_mask[:, None, None, :] > 0))
        cos, sin = self._rope(position_ids, inputs_embeds.dtype)
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.lm.model.layers):
            q, k, v = self._qkv(i, layer, x, cos, sin)
            probs = self._softmax(torch.matmul(q, k.transpose(-1, -2)), allowed).to(v.dtype)
            x = self._finish_layer(i, layer, x, torch.matmul(probs, v))
            presents += [k, v]
        return (self._logits(x), *presents)

    def decode(self, inputs_embeds, attention_mask, position_ids, *past):
        b, s = inputs_embeds.shape[0], inputs_embeds.shape[1]
        p = past[0].shape[2]
        idx = torch.arange(s, device=inputs_embeds.device)
        causal = idx[None, :] <= idx[:, None]
        past_mask = attention_mask[:, :p] > 0  # [B,P]
        new_mask = attention_mask[:, p:] > 0  # [B,S]
        allowed = self._allowed(torch.cat([past_mask[:, None, None, :].expand(b, 1, s, p),
                                           causal[None, None] & new_mask[:, None, None, :]], dim=-1))
        cos, sin = self._rope(position_ids, inputs_embeds.dtype)
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.lm.model.layers):
            past_k, past_v = past[2 * i], past[2 * i + 1]
            q, k, v = self._qkv(i, layer, x, cos, sin)
            scores = torch.cat([torch.matmul(q, past_k.transpose(-1, -2)), torch.matmul(q, k.transpose(-1, -2))], dim=-1)
            probs = self._softmax(scores, allowed).to(v.dtype)
            out = torch.matmul(probs[..., :p], past_v) + torch.matmul(probs[..., p:], v)
            x = self._finish_layer(i, layer, x, out)
            presents += [k, v]
        return (self._logits(x), *presents)


class LLMPrefillGraph(nn.Module):
    def __init__(self, core: KVCacheLLM):
        super().__init__()
        self.core = core

    def forward(self, inputs_embeds, attention_mask, position_ids):
        return self.core.prefill(inputs_embeds, attention_mask, position_ids)


class LLMDecodeGraph(nn.Module):
    def __init__(self, core: KVCacheLLM):
        super().__init__()
        self.core = core

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        return self.core.decode(inputs_embeds, attention_mask, position_ids, *past)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    out = []
    for i in range(num_layers):
        out += [f"{prefix}_key_{i}", f"{prefix}_value_{i}"]
    return out


# ----------------------------------------------------------------------------------- exporting

def _trace(module: nn.Module, args: tuple, input_names, output_names, dynamic_axes) -> onnx.ModelProto:
    import tempfile
    import warnings

    # Through a file, not a buffer: graphs over 2 GB come out with external data, which onnx.load
    # reads back into memory.
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        path = Path(tmp) / "graph.onnx"
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
        return onnx.load(str(path))


def _node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """onnxslim (constant folding, dead-node removal, fusing shape arithmetic); what it changed."""
    import onnxslim

    before = _node_count(model)
    if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        # onnxslim's shape inference serialises the model, which protobuf refuses over 2 GB
        return model, {"tool": f"onnxslim {onnxslim.__version__}", "skipped": "graph over 2 GB",
                       "nodes_before": before, "nodes_after": before}
    t0 = time.perf_counter()
    slim = onnxslim.slim(model)
    if slim is None:
        raise ExportError("onnxslim returned no model")
    return slim, {"tool": f"onnxslim {onnxslim.__version__}", "nodes_before": before,
                  "nodes_after": _node_count(slim), "seconds": round(time.perf_counter() - t0, 3)}


def _initializer_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _save(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write a graph, with its weights as external data when it is over protobuf's 2 GB limit."""
    if _initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        data = path.name + ".data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_external_data=True,
                        location=data, size_threshold=1024)
        onnx.checker.check_model(str(path))  # by path: the checker cannot hold it in one message
        return [data]
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path))
    return []


def save_sharing_weights(models: dict[str, onnx.ModelProto], out_dir: Path, data_file: str) -> None:
    """Write several graphs whose weights live once in one external data file.

    The prefill and decode graphs are traced from the same modules, so their weights are the same
    tensors (the exporter names folded constants differently per graph, so they are matched by
    content): each distinct tensor is written once and every graph points at it. Tensors under
    1 KiB stay inside their graph.
    """
    import hashlib

    written: dict[bytes, tuple[int, int]] = {}  # sha256 of the bytes -> (offset, length)
    with open(out_dir / data_file, "wb") as f:
        for model in models.values():
            for t in model.graph.initializer:
                if not t.HasField("raw_data"):
                    # the exporter writes raw_data; typed fields (e.g. float_data) are re-encoded
                    t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
                raw = t.raw_data
                if len(raw) < 1024:
                    continue
                digest = hashlib.sha256(raw).digest()
                if digest not in written:
                    f.write(b"\0" * ((-f.tell()) % 64))  # aligned, so a runtime can map tensors in place
                    written[digest] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = written[digest]
                external_data_helper.set_external_data(t, location=data_file, offset=offset, length=length)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
    for name, model in models.items():
        with open(out_dir / name, "wb") as g:
            g.write(model.SerializeToString())
        onnx.checker.check_model(str(out_dir / name))  # by path: checks the external data references


def _example_inputs(model, batch: int = 2):
    g = torch.Generator().manual_seed(0)
    spec = model.spec
    size = spec["image_size"]
    ex = {"vision": (torch.randn(batch, 3, size, size, generator=g),)}
    if model.num_seg_tokens:
        p = spec["parser"]["input_size"]
        ls = model.seg.label_size
        ex["parser"] = (torch.randn(batch, 3, p, p, generator=g),)
        ex["seg"] = (torch.randint(0, model.seg.num_classes, (batch, ls, ls), generator=g).to(torch.uint8),)
        ex["attributes"] = (torch.randn(batch, model.attributes.proj.in_features, generator=g),)
    return ex


def export_onnx(model, out_dir: Path, simplify: bool = True,
                progress: Callable[[str], None] = lambda _m: None) -> dict[str, dict]:
    """Export every component of `model` (fp32) into out_dir; returns the manifest's component entries.

    Each entry: file, data_files, kind "onnx", opset, inputs/outputs (names, shapes, dtypes),
    simplify (what onnxslim changed) and export_seconds. Hashes are added by the caller.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    batch = {0: "batch"}
    components: dict[str, dict] = {}
    examples = _example_inputs(model)

    plain = [("vision", VisionGraph(model), ["pixel_values"], ["image_tokens", "pooled"],
              {"pixel_values": batch, "image_tokens": batch, "pooled": batch})]
    if model.num_seg_tokens:  # FaceInsight with trained parser, seg and attribute weights
        plain += [
            ("parser", ParserGraph(model), ["parser_pixels"], ["labels"], {"parser_pixels": batch, "labels": batch}),
            ("seg", SegGraph(model), ["labels"], ["seg_tokens"], {"labels": batch, "seg_tokens": batch}),
            ("attributes", AttributeGraph(model), ["pooled"], ["probs"], {"pooled": batch, "probs": batch}),
        ]
    for name, module, ins, outs, axes in plain:
        progress(f"exporting {name}")
        t0 = time.perf_counter()
        graph = _trace(module, examples[name], ins, outs, axes)
        entry = {"file": f"{name}.onnx", "kind": "onnx", "opset": OPSET}
        if simplify:
            graph, entry["simplify"] = _simplify(graph)
        entry["data_files"] = _save(graph, out_dir / entry["file"])
        entry["export_seconds"] = round(time.perf_counter() - t0, 2)
        entry.update(io_signature(graph))
        components[name] = entry

    progress("exporting llm (prefill and decode graphs)")
    t0 = time.perf_counter()
    core = KVCacheLLM(model.llm).eval()
    n, d = core.num_layers, model.llm.config.hidden_size
    g = torch.Generator().manual_seed(1)
    b, t, s = 2, 5, 1
    embeds = torch.randn(b, t, d, generator=g) * 0.02
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, :2] = 0  # left padding, so the traced graph keeps the mask path
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    kv_axes = {0: "batch", 2: "past"}
    prefill_axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                    "position_ids": {0: "batch", 1: "seq"}, "logits": batch}
    prefill_axes.update({k: {0: "batch", 2: "seq"} for k in kv_names(n, "present")})
    prefill = _trace(LLMPrefillGraph(core), (embeds, mask, pos),
                     ["inputs_embeds", "attention_mask", "position_ids"], ["logits", *kv_names(n, "present")],
                     prefill_axes)
    past = tuple(torch.randn(b, core.num_kv_heads, t, core.head_dim, generator=g) for _ in range(2 * n))
    decode_axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past_plus_seq"},
                   "position_ids": {0: "batch", 1: "seq"}, "logits": batch}
    decode_axes.update({k: kv_axes for k in kv_names(n, "past")})
    decode_axes.update({k: {0: "batch", 2: "seq"} for k in kv_names(n, "present")})
    decode = _trace(LLMDecodeGraph(core), (embeds[:, :s], torch.ones(b, t + s, dtype=torch.long), pos[:, -1:] + 1,
                                           *past),
                    ["inputs_embeds", "attention_mask", "position_ids", *kv_names(n, "past")],
                    ["logits", *kv_names(n, "present")], decode_axes)
    graphs = {"llm_prefill": prefill, "llm_decode": decode}
    slim_info = {}
    if simplify:
        for name in graphs:
            graphs[name], slim_info[name] = _simplify(graphs[name])
    save_sharing_weights({f"{k}.onnx": v for k, v in graphs.items()}, out_dir, LLM_DATA_FILE)
    seconds = round(time.perf_counter() - t0, 2)
    for name, graph in graphs.items():
        entry = {"file": f"{name}.onnx", "kind": "onnx", "opset": OPSET, "data_files": [LLM_DATA_FILE],
                 "export_seconds": seconds}
        if name in slim_info:
            entry["simplify"] = slim_info[name]
        entry.update(io_signature(graph))
        components[name] = entry

    progress("saving the token-embedding table")
    table = model.llm.get_input_embeddings().weight.detach().float().numpy()
    np.save(out_dir / EMBED_FILE, np.ascontiguousarray(table))
    components["embed_tokens"] = {"file": EMBED_FILE, "kind": "npy", "data_files": [],
                                  "outputs": [{"name": "embed_tokens", "shape": list(table.shape),
                                               "dtype": str(table.dtype)}], "inputs": []}
    return components


def llm_layout(model) -> dict:
    """What a runtime needs to allocate the KV cache and drive the LLM graphs."""
    core_cfg = model.llm.config
    head_dim = getattr(core_cfg, "head_dim", None) or core_cfg.hidden_size // core_cfg.num_attention_heads
    return {"num_layers": core_cfg.num_hidden_layers, "num_heads": core_cfg.num_attention_heads,
            "num_kv_heads": core_cfg.num_key_value_heads, "head_dim": head_dim,
            "hidden_size": core_cfg.hidden_size, "vocab_size": core_cfg.vocab_size,
            "max_position_embeddings": core_cfg.max_position_embeddings}
