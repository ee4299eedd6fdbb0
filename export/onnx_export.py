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
                    or, for onnxruntime where its kernel takes the head size (in-place decode below):
                    inputs_embeds [B,S,D], position_ids [B,S], seqlens_k [B] int32 (positions
                    filled after the step - 1), total_sequence_length int32 scalar (C),
                    attention_bias [B,1,S,C] (0 or the float minimum), query_seqlens [B] int32 (S),
                    past_key_i / past_value_i [B,Hkv,C,hd] (the cache, C its capacity)
                    -> logits [B,V], present_key_i / present_value_i [B,Hkv,C,hd] (the same buffers)
  llm.onnx.data     the LLM weights, stored once and shared by both LLM graphs (external data)
  vision.onnx.data  (and so on) the weights of a graph that has 64 MiB of them or more; smaller
                    graphs keep theirs inside
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
* For onnxruntime (`onnxruntime_ops=True`: `facert build --backend onnxruntime`, not the graphs
  TensorRT builds from) each layer's RoPE, q*cos + (q @ rotate)*sin, becomes one
  com.microsoft.RotaryEmbedding node over cos/sin tables of every position the model takes
  (`fuse_rotary_embedding`), and each residual add with the RMSNorm of its sum one
  SkipSimplifiedLayerNormalization (`fuse_skip_rms_norm`): fewer nodes per layer, which a decode
  step, bound by its node count, feels (demo int4 decode step 11.2 -> 10.4 -> 9.8 ms;
  benchmarks/results/2026-11-30-quant-planes/NOTES.md).
* In-place decode (onnxruntime, head size a multiple of GQA_HEAD_DIM_MULTIPLE): each layer's
  attention is one com.microsoft.GroupQueryAttention (`KVCacheLLM.decode_in_place`): RoPE from the
  cos/sin tables, the write of the new K/V rows into the cache and attention over each row's
  filled positions, the cache buffers bound as both its past and present (onnxruntime writes them
  in place when the two share an address). A step reads only the positions filled so far, not the
  buffer's capacity, and its node count falls by ~15 a layer (demo int4 decode: 844 onnxruntime
  nodes against 1,229; step 11.7 -> 10.3 ms on the same machine, 2026-11-30-quant-gqa). Other head
  sizes keep the plain decode graph above.

Exporter: torch.onnx.export's TorchScript-based exporter (`dynamo=False`), then onnxslim.
Measured on the demo model (2-core CPU, first version of KVCacheLLM): the torch.export-based exporter (`dynamo=True`, which
also needs the onnxscript package) took 108 s for the prefill graph against 15 s here, and
12.5 s against 0.4 s for the vision graph; ORT ran both exporters' graphs at the same speed
(prefill 170 vs 191 ms, vision 17.3 vs 16.8 ms, unslimmed). Its graphs have fewer nodes (1777 vs
5402 for prefill) but onnxslim brings the TorchScript ones to 2284 in about 10 s, so the faster,
dependency-free exporter is the one used. Every graph passes `onnx.checker`. With the fused
projections and constant-shape reshapes of the current KVCacheLLM the demo's decode graph is
3281 nodes as exported, 1572 after onnxslim (was 5951 / 2505).

Memory: the build holds each weight once. The exporter would hold several copies of every weight
(its graph-level shape inference, the ModelProto, its serialised bytes, the graph loaded back):
facellm-1b's 3 GB checkpoint peaked at 19.7 GB. Here `_trace` takes the weights from the exporter
and leaves them out of its graph (`_exporter_without_weights`), onnxslim runs on that weightless
graph, and `WeightFile` streams each tensor into the external data file; the vision side and the
LLM are loaded and exported one after the other (`export_onnx(load, ...)`), and KVCacheLLM takes
over the weights it fuses. Measured (benchmarks/results/2026-11-30-build-cost): peak RSS about
1.05x the engines folder for facellm-1b and facellm-8b --layers 2; what bounds it is the LLM's
fp32 weights, held whole in torch while its graphs are traced.
"""

from __future__ import annotations

import contextlib
import gc
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from runtime.manifest import IN_PLACE_DECODE_INPUTS, io_signature

OPSET = 17
LLM_DATA_FILE = "llm.onnx.data"
EMBED_FILE = "embed_tokens.npy"
WEIGHT_BLOCK_BYTES = 64 * 1024**2  # weights are hashed and written in blocks of this size
INLINE_TENSOR_BYTES = 1024  # smaller weights stay inside their graph
INLINE_GRAPH_BYTES = 64 * 1024**2  # a graph with fewer weight bytes than this keeps them all inside (one file)


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


# onnxruntime's CPU GroupQueryAttention kernel refuses head sizes that are not a multiple of this; such
# models keep the plain attention graph (KVCacheLLM.decode) on onnxruntime too
GQA_HEAD_DIM_MULTIPLE = 16


def _no_input(g):
    """An omitted optional input of an ONNX node (its name left empty)."""
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())
    return none


class GroupQueryAttention(torch.autograd.Function):
    """Exported as one com.microsoft.GroupQueryAttention node (onnxruntime's contrib operator); forward is
    that node's arithmetic in torch, for the trace and as its reference.

    qkv [B,S,(H+2Hkv)*hd] packed as KVCacheLLM fuses it (q already scaled, so scale=1); past_key /
    past_value [B,Hkv,C,hd] are the cache buffers, bound to present_key / present_value too, so the op
    writes row b's S new K/V rows (rotated) at positions seqlens_k[b] + 1 - S ... in place and attends
    causally to the positions up to each query's own, plus attention_bias [B,1,S,C] (0, or the float
    minimum where a position is padding). total_sequence_length is C and query_seqlens is S for every
    row (every row's chunk is whole): the op's contract for a shared, fixed-capacity buffer.
    """

    @staticmethod
    def forward(ctx, qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                position_ids, attention_bias, query_seqlens, num_heads, kv_num_heads):
        b, s, _ = qkv.shape
        capacity, hd = past_key.shape[2], past_key.shape[3]
        q, k, v = (t.reshape(b, s, -1, hd).transpose(1, 2)
                   for t in qkv.split([num_heads * hd, kv_num_heads * hd, kv_num_heads * hd], dim=-1))
        cos = torch.cat([cos_cache[position_ids]] * 2, dim=-1)[:, None]  # [B,1,S,hd]
        sin = torch.cat([sin_cache[position_ids]] * 2, dim=-1)[:, None]
        q, k = (x * cos + torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1) * sin for x in (q, k))
        present_key, present_value = past_key.clone(), past_value.clone()
        starts = seqlens_k.long() + 1 - query_seqlens.long()
        for row in range(b):
            present_key[row, :, starts[row]:starts[row] + s] = k[row]
            present_value[row, :, starts[row]:starts[row] + s] = v[row]
        groups = num_heads // kv_num_heads
        scores = q @ present_key.repeat_interleave(groups, dim=1).transpose(-1, -2) + attention_bias  # [B,H,S,C]
        query_at = starts[:, None] + torch.arange(s)  # [B,S]
        causal = torch.arange(capacity)[None, None, :] <= query_at[:, :, None]  # [B,S,C]
        probs = scores.masked_fill(~causal[:, None], float("-inf")).softmax(dim=-1)
        out = probs @ present_value.repeat_interleave(groups, dim=1)  # [B,H,S,hd]
        return out.transpose(1, 2).reshape(b, s, num_heads * hd), present_key, present_value

    @staticmethod
    def symbolic(g, qkv, past_key, past_value, seqlens_k, total_sequence_length, cos_cache, sin_cache,
                 position_ids, attention_bias, query_seqlens, num_heads, kv_num_heads):
        out, present_key, present_value = g.op(
            f"{CONTRIB_DOMAIN}::GroupQueryAttention", qkv, _no_input(g), _no_input(g), past_key, past_value,
            seqlens_k, total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias,
            *(_no_input(g) for _ in range(5)),  # head_sink, k/v_scale, q/k_norm_weight
            query_seqlens, num_heads_i=num_heads, kv_num_heads_i=kv_num_heads, do_rotary_i=1,
            rotary_interleaved_i=0, scale_f=1.0, outputs=3)
        # the exporter cannot infer a contrib operator's outputs: [B,S,H*hd] and the cache's own type
        out.setType(qkv.type().with_sizes([None, None, None]))
        present_key.setType(past_key.type())
        present_value.setType(past_value.type())
        return out, present_key, present_value


def _fuse_taking_over(projections: list[nn.Linear], scales: list[float]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The projections' weights (and biases), each times its scale, stacked along the output rows, as
    torch.cat would; each projection is emptied (meta) once copied, so at most one of them is held
    twice (an 8B's gate_proj is 272 MB in fp32; cat would hold the gate and up copies at once)."""
    first = projections[0]
    rows = sum(p.weight.shape[0] for p in projections)
    weight = torch.empty(rows, first.weight.shape[1], dtype=first.weight.dtype)
    bias = None if first.bias is None else torch.empty(rows, dtype=first.bias.dtype)
    start = 0
    for proj, scale in zip(projections, scales, strict=True):
        stop = start + proj.weight.shape[0]
        weight[start:stop].copy_(proj.weight)
        if bias is not None:
            bias[start:stop].copy_(proj.bias)
        if scale != 1.0:
            weight[start:stop].mul_(scale)
            if bias is not None:
                bias[start:stop].mul_(scale)
        proj.to("meta")
        start = stop
    return weight, bias


class KVCacheLLM(nn.Module):
    """A transformers Llama/Qwen2 *ForCausalLM run with explicit K/V tensors (see module doc).

    The HF module's own RMSNorm modules, o_proj/down_proj Linears, activation, final norm, lm_head
    and rotary inv_freq are used as they are; three weights are re-laid out once, here:
    q/k/v_proj as one [(H + 2 Hkv) hd, D] matrix (with q pre-multiplied by the attention scaling,
    which commutes with RoPE) and gate/up_proj as one matrix, so a layer runs 4 matmuls on its
    input instead of 7; and RoPE's rotate_half is a constant signed permutation (a [hd, hd]
    matmul) applied to q and k together. Same arithmetic, fewer and larger ops: at batch 1 each
    op is a few microseconds of fixed cost against a decode step of a few tens of milliseconds.
    It takes those weights over: the q/k/v and gate/up modules of `causal_lm` are emptied (meta),
    so the export holds each weight once.
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
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone())
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        half = self.head_dim // 2
        rotate = torch.zeros(self.head_dim, self.head_dim)
        rotate[torch.arange(half) + half, torch.arange(half)] = -1.0  # out[:half] = -x[half:]
        rotate[torch.arange(half), torch.arange(half) + half] = 1.0  # out[half:] = x[:half]
        self.register_buffer("rotate", rotate.to(causal_lm.lm_head.weight.dtype))
        # cos/sin of every position the model takes, [max_position_embeddings, hd/2], as _rope computes
        # them: the tables onnxruntime's RotaryEmbedding and GroupQueryAttention nodes read
        freqs = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        self.register_buffer("rope_cos_cache", (freqs.cos() * self.attention_scaling).contiguous())
        self.register_buffer("rope_sin_cache", (freqs.sin() * self.attention_scaling).contiguous())
        # Buffers are persistent (in the state dict): the TorchScript exporter makes those graph weights,
        # where it would bake non-persistent ones into the graph as Constant nodes (copies, inline).
        with torch.no_grad():
            for i, layer in enumerate(causal_lm.model.layers):
                a, mlp = layer.self_attn, layer.mlp
                qkv = _fuse_taking_over([a.q_proj, a.k_proj, a.v_proj], [a.scaling, 1.0, 1.0])
                self.register_buffer(f"qkv_weight_{i}", qkv[0])
                self.register_buffer(f"qkv_bias_{i}", qkv[1])
                gate_up = _fuse_taking_over([mlp.gate_proj, mlp.up_proj], [1.0, 1.0])
                self.register_buffer(f"gate_up_weight_{i}", gate_up[0])
                self.register_buffer(f"gate_up_bias_{i}", gate_up[1])

    def _rope(self, position_ids, dtype):
        freqs = position_ids[..., None].float() * self.inv_freq  # [B,S,hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B,1,S,hd]
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)

    def _packed_qkv(self, i, layer, x):
        """The input norm and the fused q/k/v projection: [B,S,(H+2Hkv)*hd], q pre-scaled."""
        return F.linear(layer.input_layernorm(x), getattr(self, f"qkv_weight_{i}"), getattr(self, f"qkv_bias_{i}"))

    def _qkv(self, i, layer, x, cos, sin):
        """q [B,Hkv,G*S,hd] (the G query heads of each KV head side by side, pre-scaled), k, v [B,Hkv,S,hd]."""
        h, hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = reshape(self._packed_qkv(i, layer, x), 0, -1, h + 2 * hkv, hd).transpose(1, 2)  # [B, H+2Hkv, S, hd]
        qk, v = qkv[:, :h + hkv], qkv[:, h + hkv:]
        qk = qk * cos + torch.matmul(qk, self.rotate) * sin
        return reshape(qk[:, :h], 0, hkv, -1, hd), qk[:, h:], v

    def _allowed(self, allowed):
        """[B,1,S,K] -> [B,1,G*S,K], in the order of the grouped query rows."""
        return allowed.repeat(1, 1, self.groups, 1)

    def _heads_last(self, attn_out):
        """[B,Hkv,G*S,hd] -> [B,S,H*hd]."""
        return reshape(reshape(attn_out, 0, self.num_heads, -1, self.head_dim).transpose(1, 2), 0, 0, -1)

    def _finish_layer(self, i, layer, x, out):
        """out [B,S,H*hd] -> o_proj + residual, then the MLP + residual."""
        x = x + layer.self_attn.o_proj(out)
        gate_up = F.linear(layer.post_attention_layernorm(x), getattr(self, f"gate_up_weight_{i}"),
                           getattr(self, f"gate_up_bias_{i}"))
        half = getattr(self, f"gate_up_weight_{i}").shape[0] // 2
        gate, up = gate_up.split([half, half], dim=-1)  # constant sizes: one Split node, not a shape chain
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
            x = self._finish_layer(i, layer, x, self._heads_last(torch.matmul(probs, v)))
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
            x = self._finish_layer(i, layer, x, self._heads_last(out))
            presents += [k, v]
        return (self._logits(x), *presents)

    def decode_in_place(self, inputs_embeds, position_ids, seqlens_k, total_sequence_length, attention_bias,
                        query_seqlens, *cache):
        """The decode step as onnxruntime runs it best: per layer one GroupQueryAttention node (RoPE, the
        cache write and attention), the cache buffers [B,Hkv,C,hd] both read and written in place."""
        x, presents = inputs_embeds, []
        for i, layer in enumerate(self.lm.model.layers):
            out, k, v = GroupQueryAttention.apply(self._packed_qkv(i, layer, x), cache[2 * i], cache[2 * i + 1], seqlens_k, total_sequence_length,
                                                  self.rope_cos_cache, self.rope_sin_cache, position_ids,
                                                  attention_bias, query_seqlens, self.num_heads, self.num_kv_heads)
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


class LLMDecodeInPlaceGraph(nn.Module):
    def __init__(self, core: KVCacheLLM):
        super().__init__()
        self.core = core

    def forward(self, *inputs):
        return self.core.decode_in_place(*inputs)


def kv_names(num_layers: int, prefix: str) -> list[str]:
    out = []
    for i in range(num_layers):
        out += [f"{prefix}_key_{i}", f"{prefix}_value_{i}"]
    return out


# ----------------------------------------------------------------------------------- exporting

@contextlib.contextmanager
def _exporter_without_weights(weights: dict[str, torch.Tensor]):
    """Within: torch.onnx.export (TorchScript) writes graphs whose weights are graph inputs, and puts
    the weights (named as those inputs) into `weights` instead.

    Left to itself the exporter holds several copies of every weight: its graph-level ONNX shape
    inference builds a model with all of them (measured: +1.5 GB on a 512 MB lm_head), and it puts
    them into a ModelProto, serialises it and hands Python the bytes. So two of its steps are wrapped:
    `_model_to_graph` hands over the weights and returns none to write, and the graph-level shape
    inference runs without their values (it still has their shapes and dtypes from the trace; the
    tiny models' graphs come out node for node the same). The weights handed over are the module's
    own tensors, or views of them where the exporter folded a transpose (measured: every folded
    weight of the InternViT and LLM graphs is a view), so holding them costs nothing.
    """
    try:
        from torch.onnx._internal.torchscript_exporter import utils as exporter
    except ImportError:  # torch < 2.9 kept the TorchScript exporter in torch.onnx.utils
        from torch.onnx import utils as exporter
    shape_inference = getattr(torch._C, "_jit_pass_onnx_graph_shape_type_inference", None)
    model_to_graph = getattr(exporter, "_model_to_graph", None)
    if not (callable(model_to_graph) and callable(shape_inference)):
        raise ExportError(f"torch {torch.__version__}'s TorchScript exporter lacks the steps facert's weight "
                          "streaming wraps (_model_to_graph, _jit_pass_onnx_graph_shape_type_inference)")

    def without_weights(*args, **kwargs):
        graph, params, out = model_to_graph(*args, **kwargs)
        weights.update(params)
        return graph, {}, out

    exporter._model_to_graph = without_weights
    torch._C._jit_pass_onnx_graph_shape_type_inference = lambda graph, _params, opset: shape_inference(graph, {}, opset)
    try:
        yield
    finally:
        exporter._model_to_graph = model_to_graph
        torch._C._jit_pass_onnx_graph_shape_type_inference = shape_inference


def _trace(module: nn.Module, args: tuple, input_names, output_names,
           dynamic_axes) -> tuple[onnx.ModelProto, dict[str, torch.Tensor]]:
    """The ONNX graph of `module` with its weights left out (as graph inputs), and those weights by
    input name; `attach_weights` streams them to disk."""
    import io
    import warnings

    weights: dict[str, torch.Tensor] = {}
    buffer = io.BytesIO()
    with _exporter_without_weights(weights), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(module, args, buffer, dynamo=False, opset_version=OPSET, input_names=input_names,
                          output_names=output_names, dynamic_axes=dynamic_axes, do_constant_folding=True)
    graph = onnx.load_from_string(buffer.getvalue())
    unknown = set(weights) - {i.name for i in graph.graph.input}
    if unknown:
        raise ExportError(f"the exporter named weights that are not inputs of its graph: {sorted(unknown)[:5]}")
    return graph, weights


def _node_count(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def _simplify(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    """onnxslim (constant folding, dead-node removal, fusing shape arithmetic); what it changed.

    Graphs with external weights are slimmed as `_trace` gives them, their weights still graph inputs
    (of known shapes): onnxslim reads the value of every initializer it meets (its dead-node pass alone
    loads them all), so slimming them with their weights attached would hold those in memory again.
    It then folds what depends on the graph's own constants and shapes but not what depends on weight
    values (an RMSNorm gain into the next MatMul's weights, a position-embedding resize); ONNX Runtime
    and TensorRT fold such initializer-only subgraphs when they load the graph. Measured on the demo
    model: the LLM graphs come out with the same node counts as when onnxslim saw the weights."""
    import onnxslim

    before = _node_count(model)
    t0 = time.perf_counter()
    slim = onnxslim.slim(model)
    if slim is None:
        raise ExportError("onnxslim returned no model")
    return slim, {"tool": f"onnxslim {onnxslim.__version__}", "nodes_before": before,
                  "nodes_after": _node_count(slim), "seconds": round(time.perf_counter() - t0, 3)}


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError:  # bfloat16 and other dtypes numpy lacks
        raise ExportError(f"cannot write {dtype} weights (the ONNX graphs are exported in fp32)") from None


def _blocks(tensor: torch.Tensor):
    """The tensor's bytes in row-major order, as contiguous uint8 arrays of about WEIGHT_BLOCK_BYTES
    (a transposed view is made contiguous one block of rows at a time, never whole)."""
    t = tensor.detach()
    if t.dim() == 0:
        t = t.reshape(1)
    row_bytes = max(1, t[0].numel() * t.element_size())
    rows = max(1, WEIGHT_BLOCK_BYTES // row_bytes)
    for i in range(0, t.shape[0], rows):
        yield t[i:i + rows].contiguous().numpy().reshape(-1).view(np.uint8)


class WeightFile:
    """An external data file that graphs' weights are streamed into, each distinct tensor once.

    The prefill and decode graphs are traced from the same modules, so their weights are the same
    tensors (the exporter names folded ones differently per graph, so they are matched by content):
    each is written once, 64-byte aligned so a runtime can map it in place, and every graph points at it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.file = open(self.path, "wb")
        self.written: dict[bytes, tuple[int, int]] = {}  # sha256 of the bytes -> (offset, length)
        self.digests: dict[tuple, bytes] = {}  # the same tensor (or view) met again: its sha256
        self.seen: list[torch.Tensor] = []  # keeps those tensors alive, so their addresses stay theirs

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def _digest(self, tensor: torch.Tensor) -> bytes:
        import hashlib

        key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if key not in self.digests:
            h = hashlib.sha256()
            for block in _blocks(tensor):
                h.update(block)
            self.digests[key] = h.digest()
            self.seen.append(tensor)
        return self.digests[key]

    def tensor_proto(self, name: str, tensor: torch.Tensor) -> onnx.TensorProto:
        """An initializer pointing at `tensor`'s bytes in this file (written now unless already there)."""
        dtype = _numpy_dtype(tensor.dtype)
        digest = self._digest(tensor)
        if digest not in self.written:
            self.file.write(b"\0" * ((-self.file.tell()) % 64))
            offset = self.file.tell()
            for block in _blocks(tensor):
                self.file.write(block)
            self.written[digest] = (offset, self.file.tell() - offset)
        offset, length = self.written[digest]
        proto = onnx.TensorProto(name=name, dims=list(tensor.shape),
                                 data_type=onnx.helper.np_dtype_to_tensor_dtype(dtype))
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
            proto.external_data.add(key=key, value=value)
        proto.data_location = onnx.TensorProto.EXTERNAL
        return proto


def attach_weights(graph: onnx.ModelProto, weights: dict[str, torch.Tensor], data: WeightFile | None) -> None:
    """Turn the graph inputs named in `weights` into initializers: in `data` (external), or inside the
    graph where `data` is None or the tensor is under INLINE_TENSOR_BYTES. Weights that are no longer
    inputs (onnxslim removed what used them) are left out."""
    inputs = {i.name for i in graph.graph.input}
    weights = {name: tensor for name, tensor in weights.items() if name in inputs}
    for name, tensor in weights.items():
        if data is None or tensor.numel() * tensor.element_size() < INLINE_TENSOR_BYTES:
            _numpy_dtype(tensor.dtype)
            proto = onnx.numpy_helper.from_array(tensor.detach().contiguous().numpy(), name)
        else:
            proto = data.tensor_proto(name, tensor)
        graph.graph.initializer.append(proto)
    inputs = [i for i in graph.graph.input if i.name not in weights]
    del graph.graph.input[:]
    graph.graph.input.extend(inputs)


def _save(graph: onnx.ModelProto, path: Path) -> None:
    """Write a graph (its weights are inline or already in their external file) and check it by path,
    which follows the external data references and has no 2 GB limit."""
    with open(path, "wb") as f:
        f.write(graph.SerializeToString())
    onnx.checker.check_model(str(path))


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


# What export_onnx loads at a time: the vision side (every graph but the LLM's), then the LLM (an
# untied one as its token-embedding table, saved and let go, then the rest).
VISION_PARTS = ("vision", "parser", "seg", "attributes")


def export_onnx(load: Callable[[tuple[str, ...]], nn.Module], out_dir: Path, simplify: bool = True,
                progress: Callable[[str], None] = lambda _m: None, onnxruntime_ops: bool = False) -> dict[str, dict]:
    """Export every component of a model (fp32) into out_dir; returns the manifest's component entries.

    `load(parts)` returns a fresh model with those parts' weights (runtime.checkpoint.PARTS; the others
    may be left empty): export_onnx loads the vision side, exports it and lets it go, then the LLM, whose
    weights it takes over (KVCacheLLM). So the build holds one side's weights at a time, once.

    Each entry: file, data_files, kind "onnx", opset, inputs/outputs (names, shapes, dtypes),
    simplify (what onnxslim changed) and export_seconds. Hashes are added by the caller.
    `onnxruntime_ops`: graphs for onnxruntime alone, with its contrib ops where they save nodes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    components = _export_vision_side(load(VISION_PARTS), out_dir, simplify, progress)
    release_freed_memory()
    parts = llm_parts(load)
    if parts != ("llm",):
        components.update(_save_embedding(load(("llm_embed_tokens",)), out_dir, progress))
        release_freed_memory()
    components.update(_export_llm(load(parts), out_dir, simplify, progress, onnxruntime_ops))
    release_freed_memory()
    return components


def llm_parts(load: Callable[[tuple[str, ...]], nn.Module]) -> tuple[str, ...]:
    """What to load of the LLM besides its token-embedding table, which a build keeps in embed_tokens.npy:
    all of it where the lm_head is tied to the table, else its body alone."""
    return ("llm",) if load(()).llm.config.tie_word_embeddings else ("llm_body",)


def release_freed_memory(collect: bool = True) -> None:
    """Collect garbage (unless `collect` is False), then hand glibc's free heap pages back to the
    system: a build's steps free gigabytes of weights that glibc would otherwise keep for the next
    step's peak to stack on."""
    import ctypes

    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _export_vision_side(model, out_dir: Path, simplify: bool, progress) -> dict[str, dict]:
    model = model.float().eval()
    batch = {0: "batch"}
    examples = _example_inputs(model)
    plain = [("vision", VisionGraph(model), ["pixel_values"], ["image_tokens", "pooled"],
              {"pixel_values": batch, "image_tokens": batch, "pooled": batch})]
    if model.num_seg_tokens:  # FaceInsight with trained parser, seg and attribute weights
        plain += [
            ("parser", ParserGraph(model), ["parser_pixels"], ["labels"], {"parser_pixels": batch, "labels": batch}),
            ("seg", SegGraph(model), ["labels"], ["seg_tokens"], {"labels": batch, "seg_tokens": batch}),
            ("attributes", AttributeGraph(model), ["pooled"], ["probs"], {"pooled": batch, "probs": batch}),
        ]
    components = {}
    for name, module, ins, outs, axes in plain:
        progress(f"exporting {name}")
        t0 = time.perf_counter()
        graph, weights = _trace(module, examples[name], ins, outs, axes)
        entry = {"file": f"{name}.onnx", "kind": "onnx", "opset": OPSET, "data_files": []}
        inline = sum(t.numel() * t.element_size() for t in weights.values()) < INLINE_GRAPH_BYTES
        if inline:  # small enough to hold twice: onnxslim may fold what depends on the weights too
            attach_weights(graph, weights, None)
        if simplify:
            graph, entry["simplify"] = _simplify(graph)
        if not inline:
            entry["data_files"] = [f"{name}.onnx.data"]
            with WeightFile(out_dir / entry["data_files"][0]) as data:
                attach_weights(graph, weights, data)
        del weights
        _save(graph, out_dir / entry["file"])
        entry["export_seconds"] = round(time.perf_counter() - t0, 2)
        entry.update(io_signature(graph))
        components[name] = entry
    return components


def _save_embedding(model, out_dir: Path, progress) -> dict[str, dict]:
    """embed_tokens.npy, the token-embedding table the runtime gathers prompt rows from (fp32)."""
    progress("saving the token-embedding table")
    table = model.llm.get_input_embeddings().weight.detach().float().contiguous()
    np.save(out_dir / EMBED_FILE, table.numpy())
    return {"embed_tokens": {"file": EMBED_FILE, "kind": "npy", "data_files": [],
                             "outputs": [{"name": "embed_tokens", "shape": list(table.shape),
                                          "dtype": str(table.numpy().dtype)}], "inputs": []}}


def fuse_rotary_embedding(graph: onnx.ModelProto, weights: dict[str, torch.Tensor], core: KVCacheLLM) -> int:
    """Rewrite each layer's `qk * cos + (qk @ rotate) * sin` (KVCacheLLM._qkv) in a traced, weightless
    graph as one com.microsoft.RotaryEmbedding(qk [B,N,S,hd], position_ids, cos_cache, sin_cache) node,
    the caches [max_position_embeddings, hd/2] computed as KVCacheLLM._rope computes cos and sin and
    added to `weights`. Returns the number of layers rewritten; a graph whose RoPE does not have
    exactly that form is left as it is (0)."""
    from onnx import TensorProto, helper

    inputs = {i.name for i in graph.graph.input}
    rotate = [name for name, w in weights.items() if name in inputs and w.shape == core.rotate.shape
              and torch.equal(w, core.rotate)]
    consumers = _consumers(graph)
    producers = {o: n for n in graph.graph.node for o in n.output}
    replaced, tables = {}, set()
    for matmul in (n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in rotate):
        qk = matmul.input[0]
        times_sin = consumers.get(matmul.output[0], [])
        times_cos = [n for n in consumers.get(qk, []) if n is not matmul]
        if len(times_sin) != 1 or len(times_cos) != 1 or times_sin[0].op_type != "Mul" or times_cos[0].op_type != "Mul":
            return 0
        add = consumers.get(times_sin[0].output[0], [])
        if len(add) != 1 or add[0].op_type != "Add" or set(add[0].input) != {times_cos[0].output[0], times_sin[0].output[0]}:
            return 0
        cos, sin = (next(i for i in m.input if i not in (qk, matmul.output[0])) for m in (times_cos[0], times_sin[0]))
        tables.add((cos, sin))
        for node in (matmul, times_cos[0], times_sin[0]):
            replaced[id(node)] = None
        replaced[id(add[0])] = helper.make_node("RotaryEmbedding", [qk, "position_ids", "rope_cos_cache", "rope_sin_cache"],
                                                [add[0].output[0]], name=add[0].name + "_rotary", domain=CONTRIB_DOMAIN,
                                                interleaved=0)
    # one pair of tables, KVCacheLLM._rope's (a Cos and a Sin of the positions, maybe scaled and cast)
    if len(tables) != 1 or replaced == {} or not all(
            producers.get(t) is not None and producers[t].op_type in ("Cos", "Sin", "Mul", "Cast")
            for t in next(iter(tables))):
        return 0
    _replace_nodes(graph, replaced)
    weights["rope_cos_cache"], weights["rope_sin_cache"] = core.rope_cos_cache, core.rope_sin_cache
    used = {i for n in graph.graph.node for i in n.input}
    kept = [i for i in graph.graph.input if i.name in used or i.name not in weights]
    del graph.graph.input[:]
    graph.graph.input.extend(kept)
    graph.graph.input.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(weights[name].shape))
                             for name in ("rope_cos_cache", "rope_sin_cache"))
    return sum(n.op_type == "RotaryEmbedding" for n in graph.graph.node)


def fuse_skip_rms_norm(graph: onnx.ModelProto) -> int:
    """Rewrite each residual add followed by an RMSNorm of the sum, s = a + b then
    w * (s / sqrt(mean(s^2) + eps)) as traced from the HF module (Pow, ReduceMean, Add, Sqrt, Div,
    Mul, Mul), as one com.microsoft.SkipSimplifiedLayerNormalization(a, b, w) whose fourth output is s
    (what the next residual add reads). Returns the number rewritten."""
    from onnx import helper, numpy_helper

    consumers = _consumers(graph)
    constants = {t.name: t for t in graph.graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})

    def value(name: str) -> float | None:
        t = constants.get(name)
        if t is None:
            return None
        array = numpy_helper.to_array(t)
        return float(array.reshape(-1)[0]) if array.size == 1 else None

    def only(name: str, op: str):
        users = consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    replaced = {}
    for add in (n for n in graph.graph.node if n.op_type == "Add"):
        s = add.output[0]
        pow_ = next((n for n in consumers.get(s, []) if n.op_type == "Pow"), None)
        if pow_ is None or pow_.input[0] != s or value(pow_.input[1]) != 2.0:
            continue
        mean = only(pow_.output[0], "ReduceMean")
        plus = mean and only(mean.output[0], "Add")
        root = plus and only(plus.output[0], "Sqrt")
        inverse = root and only(root.output[0], "Div")
        scaled = inverse and only(inverse.output[0], "Mul")
        gained = scaled and only(scaled.output[0], "Mul")
        if not gained or value(inverse.input[0]) != 1.0 or s not in scaled.input:
            continue
        axes = [a for a in mean.attribute if a.name == "axes"]
        if len(mean.input) > 1 or not axes or list(axes[0].ints) != [-1]:
            continue
        eps = value(next(i for i in plus.input if i != mean.output[0]))
        gamma = next(i for i in gained.input if i != scaled.output[0])
        if eps is None:
            continue
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], gamma],
                                 [gained.output[0], "", "", s], name=add.name + "_skip_rms_norm",
                                 domain=CONTRIB_DOMAIN, epsilon=eps)
        replaced[id(gained)] = fused
        for node in (add, pow_, mean, plus, root, inverse, scaled):
            replaced[id(node)] = None
    _replace_nodes(graph, replaced)
    return sum(n.op_type == "SkipSimplifiedLayerNormalization" for n in graph.graph.node)


CONTRIB_DOMAIN = "com.microsoft"  # onnxruntime's own operators (MatMulNBits, RotaryEmbedding, ...)


def use_contrib_domain(graph: onnx.ModelProto) -> None:
    """Import onnxruntime's operator domain into `graph` (once)."""
    if not any(o.domain == CONTRIB_DOMAIN for o in graph.opset_import):
        graph.opset_import.append(onnx.helper.make_opsetid(CONTRIB_DOMAIN, 1))


def _consumers(graph: onnx.ModelProto) -> dict[str, list]:
    """Each tensor name -> the nodes that read it."""
    consumers: dict[str, list] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _replace_nodes(graph: onnx.ModelProto, replaced: dict[int, onnx.NodeProto | None]) -> None:
    """Put each node whose id() is in `replaced` in its place (None: drop it), then drop the nodes none of
    whose outputs reaches a graph output; import onnxruntime's domain if a new node is in it."""
    nodes = [replaced.get(id(n), n) for n in graph.graph.node]
    needed = {o.name for o in graph.graph.output}
    live = []
    for node in reversed([n for n in nodes if n is not None]):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.graph.node[:]
    graph.graph.node.extend(reversed(live))
    if any(n is not None and n.domain == CONTRIB_DOMAIN for n in replaced.values()):
        use_contrib_domain(graph)


def _type_attention_outputs(graph: onnx.ModelProto, core: KVCacheLLM) -> onnx.ModelProto:
    """ONNX's shape inference knows no contrib operator, so nothing after a GroupQueryAttention node has a
    type: give its outputs theirs (the attention [batch, seq, H*hd]; present_* the type of the past_*
    buffer they are) and infer the rest from them, before the other fusions replace the standard nodes
    whose outputs the quantizer's rank lookup then finds typed. The graph is weightless: cheap."""
    from onnx import TensorProto, helper

    cache = {i.name: i.type for i in graph.graph.input}
    for output in graph.graph.output:
        if output.name.startswith("present_"):
            output.type.CopyFrom(cache[output.name.replace("present_", "past_", 1)])
    attention = {n.output[0] for n in graph.graph.node if n.op_type == "GroupQueryAttention"}
    kept = [v for v in graph.graph.value_info if v.name not in attention and v.type.HasField("tensor_type")]
    del graph.graph.value_info[:]
    graph.graph.value_info.extend(kept)
    graph.graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                ["batch", "seq", core.num_heads * core.head_dim])
                                  for name in sorted(attention))
    return onnx.shape_inference.infer_shapes(graph)


def _export_llm(model, out_dir: Path, simplify: bool, progress, onnxruntime_ops: bool = False) -> dict[str, dict]:
    """The prefill and decode graphs; with a tied lm_head (the table loaded with the rest), the table too.
    With `onnxruntime_ops`, RoPE and residual RMSNorms as onnxruntime's own operators (fuse_rotary_embedding,
    fuse_skip_rms_norm)."""
    model = model.float().eval()
    components = {}
    if model.llm.config.tie_word_embeddings:
        components.update(_save_embedding(model, out_dir, progress))

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
                    "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
    prefill_axes.update({k: {0: "batch", 2: "seq"} for k in kv_names(n, "present")})
    past = tuple(torch.randn(b, core.num_kv_heads, t, core.head_dim, generator=g) for _ in range(2 * n))
    in_place = onnxruntime_ops and core.head_dim % GQA_HEAD_DIM_MULTIPLE == 0
    if in_place:  # the cache buffers are the K/V inputs and outputs both: [B,Hkv,C,hd], C its capacity
        capacity = t + s
        cache = tuple(torch.cat([p, torch.zeros_like(p[:, :, :s])], dim=2) for p in past)
        decode_inputs = ["inputs_embeds", "position_ids", *IN_PLACE_DECODE_INPUTS, *kv_names(n, "past")]
        decode_args = (embeds[:, :s], pos[:, -1:] + 1, torch.full((b,), t + s - 1, dtype=torch.int32),
                       torch.tensor(capacity, dtype=torch.int32), torch.zeros(b, 1, s, capacity),
                       torch.full((b,), s, dtype=torch.int32), *cache)
        decode_axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {0: "batch", 1: "seq"},
                       "seqlens_k": {0: "batch"}, "query_seqlens": {0: "batch"}, "logits": {0: "batch"},
                       "attention_bias": {0: "batch", 2: "seq", 3: "capacity"}}
        decode_axes.update({k: {0: "batch", 2: "capacity"} for k in kv_names(n, "past") + kv_names(n, "present")})
        decode_module = LLMDecodeInPlaceGraph(core)
    else:
        decode_inputs = ["inputs_embeds", "attention_mask", "position_ids", *kv_names(n, "past")]
        decode_args = (embeds[:, :s], torch.ones(b, t + s, dtype=torch.long), pos[:, -1:] + 1, *past)
        decode_axes = {"inputs_embeds": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past_plus_seq"},
                       "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}
        decode_axes.update({k: kv_axes for k in kv_names(n, "past")})
        decode_axes.update({k: {0: "batch", 2: "seq"} for k in kv_names(n, "present")})
        decode_module = LLMDecodeGraph(core)
    traces = {
        "llm_prefill": (LLMPrefillGraph(core), (embeds, mask, pos),
                        ["inputs_embeds", "attention_mask", "position_ids"], prefill_axes),
        "llm_decode": (decode_module, decode_args, decode_inputs, decode_axes),
    }
    graphs = {}
    with WeightFile(out_dir / LLM_DATA_FILE) as data:
        for name, (module, args, inputs, axes) in traces.items():
            graph, weights = _trace(module, args, inputs, ["logits", *kv_names(n, "present")], axes)
            components[name] = {"file": f"{name}.onnx", "kind": "onnx", "opset": OPSET,
                                "data_files": [LLM_DATA_FILE]}
            if simplify:
                graph, components[name]["simplify"] = _simplify(graph)
            if name == "llm_decode" and in_place:
                graph = _type_attention_outputs(graph, core)
            if onnxruntime_ops:
                components[name]["rotary_embedding_nodes"] = fuse_rotary_embedding(graph, weights, core)
                components[name]["skip_rms_norm_nodes"] = fuse_skip_rms_norm(graph)
                components[name]["group_query_attention_nodes"] = sum(
                    node.op_type == "GroupQueryAttention" for node in graph.graph.node)
            attach_weights(graph, weights, data)
            graphs[name] = graph
            del weights
    del traces, core, model, data
    gc.collect()
    for name, graph in graphs.items():
        entry = components[name]
        _save(graph, out_dir / entry["file"])
        entry.update(io_signature(graph))
        components[name] = entry
    for name in graphs:
        components[name]["export_seconds"] = round(time.perf_counter() - t0, 2)
    return components


def llm_layout(model) -> dict:
    """What a runtime needs to allocate the KV cache and drive the LLM graphs."""
    core_cfg = model.llm.config
    head_dim = getattr(core_cfg, "head_dim", None) or core_cfg.hidden_size // core_cfg.num_attention_heads
    return {"num_layers": core_cfg.num_hidden_layers, "num_heads": core_cfg.num_attention_heads,
            "num_kv_heads": core_cfg.num_key_value_heads, "head_dim": head_dim,
            "hidden_size": core_cfg.hidden_size, "vocab_size": core_cfg.vocab_size,
            "max_position_embeddings": core_cfg.max_position_embeddings}
