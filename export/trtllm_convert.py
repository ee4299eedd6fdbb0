"""The LLM as a TensorRT-LLM checkpoint, and its engine build.

A TensorRT-LLM checkpoint is a directory (docs: TensorRT-LLM "architecture/checkpoint"):
  config.json         architecture, dtype, shapes, mapping (world/tp/pp size), quantization
  rank{r}.safetensors the weights under TensorRT-LLM's names, one file per rank r of
                      world_size = tp_size x pp_size (rank = pp_rank x tp_size + tp_rank)

The converter needs only torch and safetensors, so it runs (and is tested) anywhere; building the
engine needs TensorRT-LLM on a machine with an NVIDIA GPU.

Name mapping (as in TensorRT-LLM's own `models/llama/convert.py` and `models/qwen/convert.py`):
  model.embed_tokens                      -> transformer.vocab_embedding
  model.layers.{i}.input_layernorm        -> transformer.layers.{i}.input_layernorm
  self_attn.{q,k,v}_proj (weight, bias)   -> transformer.layers.{i}.attention.qkv   (q, k, v concatenated on dim 0)
  self_attn.o_proj                        -> transformer.layers.{i}.attention.dense
  post_attention_layernorm                -> transformer.layers.{i}.post_layernorm
  mlp.gate_proj                           -> transformer.layers.{i}.mlp.fc      (TensorRT-LLM's GatedMLP: act(fc(x)) * gate(x))
  mlp.up_proj                             -> transformer.layers.{i}.mlp.gate
  mlp.down_proj                           -> transformer.layers.{i}.mlp.proj
  model.norm                              -> transformer.ln_f
  lm_head (the embedding when tied)       -> lm_head
Linear weights keep torch's (out_features, in_features) layout, which is what the checkpoint format
specifies for unquantised weights.

Tensor and pipeline parallelism (`tp_size`, `pp_size`), split as TensorRT-LLM's convert code splits
LLaMA and Qwen2 (`models/llama/convert.py`, `models/qwen/convert.py`, `models/convert_utils.py`):
  attention.qkv     column-parallel: q, k and v are each cut into tp_size equal row blocks (whole
                    heads) and rank r holds [q_r; k_r; v_r] (bias alike); with fewer KV heads than
                    tp_size each KV head is first repeated tp_size / num_kv_heads times
                    (`dup_kv_weight`), so every rank holds one
  attention.dense   row-parallel: columns cut in tp_size blocks (the ranks' outputs are summed);
                    its bias (LLaMA with attention_bias) is added once, after the sum: whole on every rank
  mlp.fc, mlp.gate  column-parallel: rows cut in tp_size blocks
  mlp.proj          row-parallel: columns cut in tp_size blocks
  lm_head           rows (vocabulary) cut in tp_size blocks, after zero rows pad the vocabulary to a
                    multiple of tp_size (`pad_vocab_size`); config.json keeps the true vocab_size
  vocab_embedding   whole on every rank (use_parallel_embedding false)
  norms             whole on every rank
Pipeline stage p holds layers [p x L/pp, (p+1) x L/pp), renumbered from 0; the first stage holds the
embedding, the last ln_f and lm_head. L must be a multiple of pp_size: TensorRT-LLM up to 0.1x gives
every stage L // pp_size layers (`Mapping.pp_layers`), so any remainder would be dropped.

Visual and segmentation tokens reach the engine as TensorRT-LLM's prompt table (p-tuning): ids at
and above vocab_size index a per-request table, so the engine is built with
max_prompt_embedding_table_size = max_batch x (image + segmentation tokens) (`prompt_table_size`).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from runtime.backends.trtllm_backend import TrtLlmError, require_tensorrt_llm
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG = "config.json"


def rank_file(rank: int) -> str:
    return f"rank{rank}.safetensors"

# transformers model_type -> TensorRT-LLM `architecture` (its MODEL_MAP key).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# facert's precision names (`facert build --precision`) -> TensorRT-LLM dtype names.
PRECISION_TO_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# facert's quantized precisions -> TensorRT-LLM's QuantAlgo (quantization/mode.py), the documented flows:
#   int8 / int4  weight-only, per output channel (W8A16 / W4A16): the checkpoint holds the float weights
#                and `quantization.quant_algo`; trtllm-build quantizes them itself (modeling_utils
#                preprocess_weights -> convert_utils.weight_only_quantize_dict ->
#                torch.ops.trtllm.symmetric_quantize_last_axis_of_batched_matrix), because the int8 /
#                packed-int4 layout its weight-only GEMM reads is interleaved for the build GPU's
#                architecture (preprocess_weights_for_mixed_gemm). lm_head stays in `dtype`.
#   fp8          FP8 weights and activations with per-tensor scales calibrated by NVIDIA ModelOpt
#                (mtq.quantize with FP8_DEFAULT_CFG on calibration prompts, then
#                export_tensorrt_llm_checkpoint), which writes the checkpoint itself (quantize_fp8).
QUANT_ALGOS = {"int8": "W8A16", "int4": "W4A16", "fp8": "FP8"}
WEIGHT_ONLY = ("int8", "int4")
# TensorRT-LLM's weight-only linears pad in/out features to multiples of 64 (quantization/layers.py),
# which the checkpoint's unpadded weights would not match: facert refuses other shapes.
WEIGHT_ONLY_MULTIPLE = 64
# TensorRT-LLM's attention kernels (fused MHA / XQA / masked MHA) start at head size 32.
MIN_HEAD_SIZE = 32
# ModelOpt's decoder_type for each transformers model_type (modelopt.torch.export).
MODELOPT_DECODER = {"llama": "llama", "qwen2": "qwen"}
MODELOPT_HINT = ("install NVIDIA ModelOpt on the GPU host (pip install 'nvidia-modelopt[torch]'; "
                 "NVIDIA's TensorRT-LLM containers ship it)")

def _dtype_name(dtype: str) -> str:
    name = PRECISION_TO_DTYPE.get(dtype, dtype)
    if name not in DTYPES:
        if dtype == "fp8":
            raise TrtLlmError("fp8 TensorRT-LLM checkpoints need calibrated scales: they are written by NVIDIA "
                              "ModelOpt (quantize_fp8), not by convert_checkpoint")
        if dtype in WEIGHT_ONLY:
            raise TrtLlmError(f"{dtype} is a quantization, not a dtype: convert_checkpoint(..., dtype='float16' "
                              f"or 'bfloat16', quantization={dtype!r})")
        raise TrtLlmError(f"dtype must be one of {', '.join(DTYPES)} (or fp32/fp16/bf16), got {dtype!r}")
    return name


def quant_config(quantization: str | None) -> dict:
    """The checkpoint config's `quantization` (TensorRT-LLM's QuantConfig fields) for facert's precision."""
    if quantization is None:
        return {"quant_algo": None, "kv_cache_quant_algo": None}
    if quantization not in QUANT_ALGOS:
        raise TrtLlmError(f"quantization must be one of {', '.join(QUANT_ALGOS)} or None, got {quantization!r}")
    return {"quant_algo": QUANT_ALGOS[quantization], "kv_cache_quant_algo": None}


def check_weight_only_shapes(llm, tp_size: int = 1) -> None:
    """Every linear TensorRT-LLM quantizes (qkv, dense, fc, gate, proj) has in/out features that are
    multiples of 64 on each of tp_size ranks, else its weight-only layer would be padded and refuse
    the checkpoint's weights."""
    layer = llm.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    kv_rank = max(att.k_proj.out_features // tp_size, att.k_proj.out_features // llm.config.num_key_value_heads)
    odd = []
    # per rank: column-parallel layers split their out_features, row-parallel ones their in_features
    for name, lin, split in (("qkv", att.q_proj, "out"), ("dense", att.o_proj, "in"), ("fc", mlp.gate_proj, "out"),
                             ("proj", mlp.down_proj, "in")):
        for side, n in (("in", lin.in_features), ("out", lin.out_features)):
            n = n // tp_size if side == split else n
            if n % WEIGHT_ONLY_MULTIPLE:
                odd.append(f"{name} {side}_features {n}" + (" per rank" if tp_size > 1 and side == split else ""))
    if kv_rank % WEIGHT_ONLY_MULTIPLE:
        odd.append(f"qkv k/v out_features {kv_rank}" + (" per rank" if tp_size > 1 else ""))
    if odd:
        raise TrtLlmError("int8/int4 weight-only engines need linear sizes that are multiples of "
                          f"{WEIGHT_ONLY_MULTIPLE} (TensorRT-LLM pads the others); this LLM has " + ", ".join(odd))


def _rope(cfg) -> tuple[float, dict | None]:
    """rotary_base and rotary_scaling from a transformers config.

    transformers 5 keeps both in `rope_parameters`; transformers 4.57 (what TensorRT-LLM 1.x runs on)
    has `rope_theta` and a separate `rope_scaling` dict or None (runtime.compat.rope_of reads either).
    TensorRT-LLM's own LLaMA/Qwen configs take that `rope_scaling` dict as `rotary_scaling`
    (models/llama/config.py); facert writes it with both "type" (what its attention layer reads)
    and "rope_type" (what transformers writes).
    """
    from runtime.compat import rope_of

    base, scaling = rope_of(cfg)
    if scaling is None:
        return base, None
    return base, {"type": scaling["rope_type"], **scaling}


def trtllm_config(llm, dtype: str = "float16", quantization: str | None = None, tp_size: int = 1,
                  pp_size: int = 1) -> dict:
    """config.json of the TensorRT-LLM checkpoint for a transformers LlamaForCausalLM / Qwen2ForCausalLM,
    split over tp_size x pp_size ranks (check_parallel says which splits the LLM allows)."""
    cfg = llm.config
    if cfg.model_type not in ARCHITECTURES:
        raise TrtLlmError(f"TensorRT-LLM conversion supports {', '.join(ARCHITECTURES)} LLMs, "
                          f"not {cfg.model_type!r}")
    if getattr(cfg, "mlp_bias", False):
        raise TrtLlmError("LLMs with MLP biases are not supported by this converter")
    heads = cfg.num_attention_heads
    head_size = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rotary_base, rotary_scaling = _rope(cfg)
    attn_bias = llm.model.layers[0].self_attn.q_proj.bias is not None
    out = {
        "architecture": ARCHITECTURES[cfg.model_type],
        "dtype": _dtype_name(dtype),
        "logits_dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", None) or heads,
        "head_size": head_size,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": cfg.hidden_act,
        "norm_epsilon": cfg.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": rotary_base,
        "rotary_scaling": rotary_scaling,
        "attn_bias": attn_bias,
        "mlp_bias": False,
        "tie_word_embeddings": bool(cfg.tie_word_embeddings),
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "mapping": {"world_size": tp_size * pp_size, "tp_size": tp_size, "pp_size": pp_size},
        "quantization": quant_config(quantization),
    }
    check_parallel(out)
    if cfg.model_type == "qwen2":
        # QWenConfig fields (TensorRT-LLM models/qwen/config.py); qwen_type selects the Qwen2 layout.
        out.update({"qwen_type": "qwen2", "seq_length": cfg.max_position_embeddings, "use_logn_attn": False,
                    "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0})
    return out


def check_parallel(config: dict) -> None:
    """A TrtLlmError unless the config's tp_size / pp_size split the LLM as TensorRT-LLM can."""
    m = config["mapping"]
    tp, pp = m["tp_size"], m["pp_size"]
    if not (isinstance(tp, int) and isinstance(pp, int) and tp >= 1 and pp >= 1):
        raise TrtLlmError(f"tp_size and pp_size must be integers >= 1, got tp={tp!r}, pp={pp!r}")
    if m["world_size"] != tp * pp:
        raise TrtLlmError(f"mapping.world_size {m['world_size']} is not tp_size x pp_size = {tp * pp}")
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    layers, inter = config["num_hidden_layers"], config["intermediate_size"]
    problems = []
    if heads % tp:
        problems.append(f"its {heads} attention heads do not split over tp={tp}")
    if kv >= tp and kv % tp:
        problems.append(f"its {kv} KV heads do not split over tp={tp}")
    if kv < tp and tp % kv:
        problems.append(f"its {kv} KV heads cannot be repeated up to tp={tp} (tp must be a multiple of them)")
    if inter % tp:
        problems.append(f"its MLP width {inter} does not split over tp={tp}")
    if layers % pp:
        problems.append(f"its {layers} layers do not split evenly over pp={pp}")
    if problems:
        raise TrtLlmError("cannot split this LLM for TensorRT-LLM: " + "; ".join(problems))


def _tp_pp(config: dict, rank: int) -> tuple[int, int, int, int]:
    """(tp_size, pp_size, tp_rank, pp_rank) of `rank` (TensorRT-LLM's Mapping: rank = pp_rank x tp + tp_rank)."""
    m = config["mapping"]
    tp, pp = m["tp_size"], m["pp_size"]
    if not 0 <= rank < tp * pp:
        raise TrtLlmError(f"rank {rank} is outside world_size {tp * pp}")
    return tp, pp, rank % tp, rank // tp


def stage_layers(config: dict, pp_rank: int) -> range:
    """The (global) layer indices pipeline stage `pp_rank` holds."""
    per_stage = config["num_hidden_layers"] // config["mapping"]["pp_size"]
    return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)


def _padded_vocab(config: dict) -> int:
    tp = config["mapping"]["tp_size"]
    return -(-config["vocab_size"] // tp) * tp


def _qkv_sizes(config: dict) -> tuple[int, int]:
    """Rows of q and of k (= of v) in the unsplit qkv."""
    d = config["head_size"]
    return config["num_attention_heads"] * d, config["num_key_value_heads"] * d


def _repeat_kv(t: torch.Tensor, kv_heads: int, tp: int) -> torch.Tensor:
    """TensorRT-LLM's dup_kv_weight (and Qwen's dup_kv_bias): each KV head repeated tp / kv_heads times."""
    reps = tp // kv_heads
    heads = t.reshape(kv_heads, 1, t.shape[0] // kv_heads, *t.shape[1:])
    return heads.expand(kv_heads, reps, *heads.shape[2:]).reshape(kv_heads * reps * heads.shape[2], *t.shape[1:])


def shard_weights(full: dict[str, torch.Tensor], config: dict, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors, cut from the unsplit (tp = pp = 1) weights as TensorRT-LLM cuts them
    (see the module docstring)."""
    tp, _pp, r, p = _tp_pp(config, rank)
    layers = stage_layers(config, p)
    last_stage = p == config["mapping"]["pp_size"] - 1

    def cols(t: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.chunk(t, tp, dim=dim)[r]

    out = {}
    if p == 0:
        out["transformer.vocab_embedding.weight"] = full["transformer.vocab_embedding.weight"]
    q_rows, kv_rows = _qkv_sizes(config)
    kv_heads = config["num_key_value_heads"]
    for local, i in enumerate(layers):
        src, dst = f"transformer.layers.{i}.", f"transformer.layers.{local}."
        for kind in ("weight", "bias"):
            qkv = full.get(src + f"attention.qkv.{kind}")
            if qkv is None:
                continue
            q, k, v = torch.split(qkv, [q_rows, kv_rows, kv_rows], dim=0)
            if kv_heads < tp:
                k, v = _repeat_kv(k, kv_heads, tp), _repeat_kv(v, kv_heads, tp)
            out[dst + f"attention.qkv.{kind}"] = torch.cat([cols(q, 0), cols(k, 0), cols(v, 0)])
        out[dst + "attention.dense.weight"] = cols(full[src + "attention.dense.weight"], 1)
        if src + "attention.dense.bias" in full:  # added after the ranks' sum: whole on each
            out[dst + "attention.dense.bias"] = full[src + "attention.dense.bias"]
        out[dst + "mlp.fc.weight"] = cols(full[src + "mlp.fc.weight"], 0)
        out[dst + "mlp.gate.weight"] = cols(full[src + "mlp.gate.weight"], 0)
        out[dst + "mlp.proj.weight"] = cols(full[src + "mlp.proj.weight"], 1)
        for norm in ("input_layernorm.weight", "post_layernorm.weight"):
            out[dst + norm] = full[src + norm]
    if last_stage:
        out["transformer.ln_f.weight"] = full["transformer.ln_f.weight"]
        head = full["lm_head.weight"]
        pad = _padded_vocab(config) - head.shape[0]
        if pad:
            head = torch.cat([head, head.new_zeros(pad, head.shape[1])])
        out["lm_head.weight"] = cols(head, 0)
    return {k: v.contiguous().clone() for k, v in out.items()}  # clone: one storage per tensor for safetensors


def merge_shards(config: dict, ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The unsplit (tp = pp = 1) weights from every rank's tensors: the inverse of shard_weights.

    Tensors that every rank of a stage holds whole (norms, embedding), and repeated KV heads, must be
    equal across the ranks that hold them; a mismatch is a TrtLlmError (a corrupt or mixed checkpoint).
    """
    m = config["mapping"]
    tp, pp = m["tp_size"], m["pp_size"]
    if len(ranks) != tp * pp:
        raise TrtLlmError(f"{len(ranks)} rank files for world_size {tp * pp}")
    q_rows, kv_rows = _qkv_sizes(config)
    kv_heads = config["num_key_value_heads"]
    q_local = q_rows // tp
    kv_local = kv_rows // tp if kv_heads >= tp else config["head_size"]

    def same(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        if any(not torch.equal(t, tensors[0]) for t in tensors[1:]):
            raise TrtLlmError(f"{name}: the ranks that each hold it whole disagree")
        return tensors[0]

    def kv_merge(name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        if kv_heads >= tp:
            return torch.cat(parts)
        reps = tp // kv_heads  # ranks r, r+1, ..., r+reps-1 hold copies of one KV head
        return torch.cat([same(f"{name} (KV head {h})", parts[h * reps:(h + 1) * reps]) for h in range(kv_heads)])

    out = {}
    for p in range(pp):
        stage = ranks[p * tp:(p + 1) * tp]
        for local, i in enumerate(stage_layers(config, p)):
            src, dst = f"transformer.layers.{local}.", f"transformer.layers.{i}."
            for kind in ("weight", "bias"):
                if src + f"attention.qkv.{kind}" not in stage[0]:
                    continue
                pieces = [torch.split(w[src + f"attention.qkv.{kind}"], [q_local, kv_local, kv_local]) for w in stage]
                out[dst + f"attention.qkv.{kind}"] = torch.cat([
                    torch.cat([x[0] for x in pieces]),
                    kv_merge(dst + f"attention.qkv.{kind} k", [x[1] for x in pieces]),
                    kv_merge(dst + f"attention.qkv.{kind} v", [x[2] for x in pieces])])
            out[dst + "attention.dense.weight"] = torch.cat([w[src + "attention.dense.weight"] for w in stage], dim=1)
            if src + "attention.dense.bias" in stage[0]:
                out[dst + "attention.dense.bias"] = same(dst + "attention.dense.bias",
                                                         [w[src + "attention.dense.bias"] for w in stage])
            out[dst + "mlp.fc.weight"] = torch.cat([w[src + "mlp.fc.weight"] for w in stage])
            out[dst + "mlp.gate.weight"] = torch.cat([w[src + "mlp.gate.weight"] for w in stage])
            out[dst + "mlp.proj.weight"] = torch.cat([w[src + "mlp.proj.weight"] for w in stage], dim=1)
            for norm in ("input_layernorm.weight", "post_layernorm.weight"):
                out[dst + norm] = same(dst + norm, [w[src + norm] for w in stage])
    first, last = ranks[:tp], ranks[(pp - 1) * tp:]
    out["transformer.vocab_embedding.weight"] = same("transformer.vocab_embedding.weight",
                                                     [w["transformer.vocab_embedding.weight"] for w in first])
    out["transformer.ln_f.weight"] = same("transformer.ln_f.weight", [w["transformer.ln_f.weight"] for w in last])
    head = torch.cat([w["lm_head.weight"] for w in last])
    if head[config["vocab_size"]:].any():
        raise TrtLlmError("lm_head.weight: the rows that pad the vocabulary to a multiple of tp_size are not zero")
    out["lm_head.weight"] = head[:config["vocab_size"]]
    return out


def trtllm_weights(llm, dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The unsplit (tp = pp = 1) weights under TensorRT-LLM's names, cast to `dtype`, contiguous and unshared."""
    torch_dtype = DTYPES[_dtype_name(dtype)]

    def t(x: torch.Tensor) -> torch.Tensor:
        # clone: safetensors refuses tensors that share storage (a tied lm_head would).
        return x.detach().to("cpu", torch_dtype).contiguous().clone()

    body = llm.model
    out = {"transformer.vocab_embedding.weight": t(body.embed_tokens.weight)}
    for i, layer in enumerate(body.layers):
        p = f"transformer.layers.{i}."
        att, mlp = layer.self_attn, layer.mlp
        out[p + "input_layernorm.weight"] = t(layer.input_layernorm.weight)
        out[p + "attention.qkv.weight"] = t(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
        if att.q_proj.bias is not None:
            out[p + "attention.qkv.bias"] = t(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))
        out[p + "attention.dense.weight"] = t(att.o_proj.weight)
        if att.o_proj.bias is not None:  # LLaMA with attention_bias: TensorRT-LLM's dense layer has a bias too
            out[p + "attention.dense.bias"] = t(att.o_proj.bias)
        out[p + "post_layernorm.weight"] = t(layer.post_attention_layernorm.weight)
        out[p + "mlp.fc.weight"] = t(mlp.gate_proj.weight)
        out[p + "mlp.gate.weight"] = t(mlp.up_proj.weight)
        out[p + "mlp.proj.weight"] = t(mlp.down_proj.weight)
    out["transformer.ln_f.weight"] = t(body.norm.weight)
    out["lm_head.weight"] = t(llm.get_output_embeddings().weight)  # the embedding itself when tied
    return out


def expected_tensors(config: dict, rank: int = 0) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor rank `rank` of a checkpoint with this config.json must hold: name -> (shape, dtype name)."""
    tp, pp, _r, p = _tp_pp(config, rank)
    h, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    d, heads, kv = config["head_size"], config["num_attention_heads"], config["num_key_value_heads"]
    qkv = (heads // tp + 2 * max(kv // tp, 1)) * d
    dt = config["dtype"]
    out = {}
    if p == 0:
        out["transformer.vocab_embedding.weight"] = ((v, h), dt)
    if p == pp - 1:
        out["transformer.ln_f.weight"] = ((h,), dt)
        out["lm_head.weight"] = ((_padded_vocab(config) // tp, h), dt)
    for i in range(len(stage_layers(config, p))):
        prefix = f"transformer.layers.{i}."
        out[prefix + "input_layernorm.weight"] = ((h,), dt)
        out[prefix + "attention.qkv.weight"] = ((qkv, h), dt)
        if config.get("attn_bias"):
            out[prefix + "attention.qkv.bias"] = ((qkv,), dt)
        out[prefix + "attention.dense.weight"] = ((h, heads * d // tp), dt)
        if config.get("attn_bias") and config["architecture"] == "LlamaForCausalLM":
            out[prefix + "attention.dense.bias"] = ((h,), dt)  # Qwen2's Attention has dense_bias=False
        out[prefix + "post_layernorm.weight"] = ((h,), dt)
        out[prefix + "mlp.fc.weight"] = ((f // tp, h), dt)
        out[prefix + "mlp.gate.weight"] = ((f // tp, h), dt)
        out[prefix + "mlp.proj.weight"] = ((h, f // tp), dt)
    return out


def convert_checkpoint(model, spec: dict, out_dir, dtype: str = "float16", quantization: str | None = None,
                       tp_size: int = 1, pp_size: int = 1) -> Path:
    """Write the LLM of a facert model (`model.llm`, transformers) as a TensorRT-LLM checkpoint split
    over tp_size x pp_size ranks (rank{r}.safetensors each).

    `spec` is the facert spec; it is not needed for the weights, but a spec naming another LLM than
    the model holds is refused. `quantization` "int8" / "int4" writes a weight-only (W8A16 / W4A16)
    checkpoint: `dtype` weights (float16 or bfloat16, the activations' type) that trtllm-build
    quantizes per output channel (see QUANT_ALGOS); fp8 is quantize_fp8's. Returns the directory.
    """
    llm = model.llm
    llm_spec = spec.get("llm") if isinstance(spec, dict) else None
    if isinstance(llm_spec, dict) and llm_spec.get("model_type") not in (None, llm.config.model_type):
        raise TrtLlmError(f"spec says the LLM is {llm_spec['model_type']!r} but the model holds "
                          f"{llm.config.model_type!r}")
    if quantization == "fp8":
        raise TrtLlmError("fp8 checkpoints are calibrated and written by NVIDIA ModelOpt: use quantize_fp8")
    if quantization is not None:
        if _dtype_name(dtype) == "float32":
            raise TrtLlmError(f"{quantization} weight-only engines run float16 or bfloat16 activations, not float32")
        check_weight_only_shapes(llm, tp_size)
    config = trtllm_config(llm, dtype, quantization, tp_size, pp_size)
    weights = trtllm_weights(llm, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rank in range(config["mapping"]["world_size"]):
        save_file(shard_weights(weights, config, rank), str(out / rank_file(rank)), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def quantize_fp8(model, spec: dict, out_dir, calibration, dtype: str = "float16", device: str = "cuda",
                 tp_size: int = 1, pp_size: int = 1) -> Path:
    """An FP8 TensorRT-LLM checkpoint of `model.llm`, calibrated by NVIDIA ModelOpt.

    `calibration` is an iterable of prompt embeddings [1, T, D] (what the LLM sees in facert: text
    tokens with the image/seg rows spliced in, export.build.calibration_embeds): ModelOpt's
    forward_loop runs the LLM on each, its quantizers record the activation ranges, and
    export_tensorrt_llm_checkpoint writes config.json (quant_algo FP8) and rank{r}.safetensors (one
    per rank of tp_size x pp_size, split by ModelOpt) with FP8 weights and their scales. Needs ModelOpt and a CUDA GPU (its FP8 kernels); the source
    model's LLM is quantized in place on `device`.
    """
    llm = model.llm
    trtllm_config(llm, dtype, None, tp_size, pp_size)  # a split TensorRT-LLM cannot do fails before calibration
    if llm.config.model_type not in MODELOPT_DECODER:
        raise TrtLlmError(f"fp8 quantization supports {', '.join(MODELOPT_DECODER)} LLMs, not {llm.config.model_type!r}")
    torch_dtype = DTYPES[_dtype_name(dtype)]
    if torch_dtype == torch.float32:
        raise TrtLlmError("fp8 engines keep their non-FP8 layers in float16 or bfloat16, not float32")
    try:
        mtq = importlib.import_module("modelopt.torch.quantization")
        export = importlib.import_module("modelopt.torch.export")
    except ImportError as e:
        raise TrtLlmError(f"fp8 needs NVIDIA ModelOpt ({e}); {MODELOPT_HINT}") from e
    if not torch.cuda.is_available():
        raise TrtLlmError("fp8 calibration runs on an NVIDIA GPU; no CUDA device is visible")
    samples = [torch.as_tensor(x) for x in calibration]
    if not samples:
        raise TrtLlmError("fp8 calibration needs at least one prompt")
    llm.to(device, torch_dtype).eval()

    def forward_loop(m):
        with torch.no_grad():
            for embeds in samples:
                m(inputs_embeds=embeds.to(device, torch_dtype).reshape(1, -1, embeds.shape[-1]))

    mtq.quantize(llm, mtq.FP8_DEFAULT_CFG, forward_loop)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        export.export_tensorrt_llm_checkpoint(llm, decoder_type=MODELOPT_DECODER[llm.config.model_type],
                                              dtype=torch_dtype, export_dir=str(out),
                                              inference_tensor_parallel=tp_size,
                                              inference_pipeline_parallel=pp_size)
    config = checkpoint_config(out)
    if (config.get("quantization") or {}).get("quant_algo") != "FP8":
        raise TrtLlmError(f"ModelOpt wrote {out / CONFIG} without quant_algo FP8: {config.get('quantization')}")
    return out


def checkpoint_config(ckpt_dir) -> dict:
    """config.json of a TensorRT-LLM checkpoint directory, after checking it and every rank's file are there."""
    d = Path(ckpt_dir)
    if not (d / CONFIG).is_file():
        raise TrtLlmError(f"{d} is not a TensorRT-LLM checkpoint: {CONFIG} is missing")
    try:
        config = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise TrtLlmError(f"{d / CONFIG} is not valid JSON: {e}") from e
    world = config.get("mapping", {}).get("world_size", 1)
    for rank in range(world):
        if not (d / rank_file(rank)).is_file():
            raise TrtLlmError(f"{d} is not a TensorRT-LLM checkpoint: {rank_file(rank)} is missing "
                              f"(world_size {world})")
    return config


def read_rank(ckpt_dir, rank: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s tensors as written."""
    with safe_open(str(Path(ckpt_dir) / rank_file(rank)), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def read_checkpoint(ckpt_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, unsplit tensors) of a TensorRT-LLM checkpoint: a checkpoint split over several
    ranks is merged back (merge_shards); a missing file is a TrtLlmError."""
    config = checkpoint_config(ckpt_dir)
    if config.get("mapping", {}).get("world_size", 1) == 1:
        return config, read_rank(ckpt_dir, 0)
    check_parallel(config)
    return config, merge_shards(config, [read_rank(ckpt_dir, r) for r in range(config["mapping"]["world_size"])])


def invert_checkpoint(ckpt_dir) -> dict[str, torch.Tensor]:
    """The inverse mapping: a TensorRT-LLM checkpoint's weights under transformers' names."""
    config, w = read_checkpoint(ckpt_dir)
    d = config["head_size"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    out = {"model.embed_tokens.weight": w["transformer.vocab_embedding.weight"],
           "model.norm.weight": w["transformer.ln_f.weight"], "lm_head.weight": w["lm_head.weight"]}
    for i in range(config["num_hidden_layers"]):
        p, hf = f"transformer.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"attention.qkv.{kind}" in w:
                wq, wk, wv = torch.split(w[p + f"attention.qkv.{kind}"], [q, kv, kv], dim=0)
                out[hf + f"self_attn.q_proj.{kind}"] = wq
                out[hf + f"self_attn.k_proj.{kind}"] = wk
                out[hf + f"self_attn.v_proj.{kind}"] = wv
        out[hf + "self_attn.o_proj.weight"] = w[p + "attention.dense.weight"]
        if p + "attention.dense.bias" in w:
            out[hf + "self_attn.o_proj.bias"] = w[p + "attention.dense.bias"]
        out[hf + "input_layernorm.weight"] = w[p + "input_layernorm.weight"]
        out[hf + "post_attention_layernorm.weight"] = w[p + "post_layernorm.weight"]
        out[hf + "mlp.gate_proj.weight"] = w[p + "mlp.fc.weight"]
        out[hf + "mlp.up_proj.weight"] = w[p + "mlp.gate.weight"]
        out[hf + "mlp.down_proj.weight"] = w[p + "mlp.proj.weight"]
    return out


def reference_llm(ckpt_dir, dtype: torch.dtype = torch.float32):
    """A transformers LLM rebuilt from the checkpoint alone (config.json + inverted weights).

    The parity reference: if it reproduces the source model's logits, both the weights and the
    config fields TensorRT-LLM builds from (heads, eps, rope base, ...) are right.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from runtime.compat import rope_config_kwargs

    config = checkpoint_config(ckpt_dir)
    model_type = {a: t for t, a in ARCHITECTURES.items()}.get(config["architecture"])
    if model_type is None:
        raise TrtLlmError(f"unknown architecture {config['architecture']!r} in {ckpt_dir}")
    hf_cfg = AutoConfig.for_model(
        model_type, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_size"], max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["norm_epsilon"], hidden_act=config["hidden_act"],
        **rope_config_kwargs(config["rotary_base"], config.get("rotary_scaling")),
        tie_word_embeddings=config["tie_word_embeddings"],
        **({"attention_bias": config["attn_bias"]} if model_type == "llama" else {}))
    llm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    state = {k: v.to(dtype) for k, v in invert_checkpoint(ckpt_dir).items()}
    llm.load_state_dict(state, strict=True)
    return llm


# ----------------------------------------------------------------------------------- engine build

def tiles_per_image(model, max_tiles: int = 1) -> int:
    """Vision-tower passes per image: InternVL (FaceLLM) tiles an image into up to max_tiles crops and
    adds a thumbnail once there is more than one; LLaVA (FaceInsight) encodes one square image."""
    if max_tiles < 1:
        raise ValueError(f"max_tiles must be >= 1, got {max_tiles}")
    if getattr(model, "family", None) == "facellm" and max_tiles > 1:
        return max_tiles + 1
    return 1


def prompt_rows_per_request(model, max_images: int = 1, max_tiles: int = 1) -> int:
    """Prompt-table rows of the largest request: every image brings its tiles' image tokens and its seg tokens."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    per_image = tiles_per_image(model, max_tiles) * int(model.num_image_tokens) + int(model.num_seg_tokens)
    return max_images * per_image


def prompt_table_size(model, max_batch: int, max_images: int = 1, max_tiles: int = 1) -> int:
    """Rows of prompt table an engine needs: every request of a full batch brings its images' rows
    (TensorRT-LLM concatenates the batch's tables; max_prompt_embedding_table_size bounds the total).

    `model` is anything with num_image_tokens and num_seg_tokens (a facert model or components).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return max_batch * prompt_rows_per_request(model, max_images, max_tiles)


def trtllm_build_command(ckpt_dir, out_dir, max_batch: int, max_input_len: int, max_output_len: int,
                         max_prompt_embedding_table_size: int, quant_algo: str | None = None,
                         workers: int = 1) -> list[str]:
    """The `trtllm-build` command line (run as `python -m tensorrt_llm.commands.build`).

    The engine's world size is the checkpoint's (trtllm-build reads its mapping and writes one
    rank{r}.engine per rank); `workers` ranks are built at once, each on its own GPU (rank % workers).
    The Python that runs it is FACERT_TRTLLM_PYTHON if set (NVIDIA's container: its system python3,
    whose transformers is the one TensorRT-LLM pins, where facert runs from a venv), else this one.

    --gather_generation_logits: the runtime returns the first answer token's logits (facert's
    `first_logits`, what `facert eval verify` scores): TensorRT-LLM up to 0.1x needs the engine built
    with it, later versions only warn that the build flag is no longer required (the executor's
    gather_generation_logits, set by runtime.backends.trtllm_backend, is what counts there).
    Weight-only checkpoints (W8A16 / W4A16) also get the weight-only GEMM plugin, which int4 requires.
    """
    for name, value in (("max_batch", max_batch), ("max_input_len", max_input_len),
                        ("max_output_len", max_output_len)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_prompt_embedding_table_size < 0:
        raise ValueError(f"max_prompt_embedding_table_size must be >= 0, got {max_prompt_embedding_table_size}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    python = os.environ.get("FACERT_TRTLLM_PYTHON") or sys.executable
    cmd = [python, "-m", "tensorrt_llm.commands.build",
           "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out_dir),
           "--max_batch_size", str(max_batch), "--max_input_len", str(max_input_len),
           "--max_seq_len", str(max_input_len + max_output_len),
           "--max_prompt_embedding_table_size", str(max_prompt_embedding_table_size),
           "--gemm_plugin", "auto", "--gather_generation_logits"]
    if quant_algo in ("W8A16", "W4A16"):
        cmd += ["--weight_only_quant_matmul_plugin", "auto"]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    return cmd


def check_engine_config(config: dict) -> None:
    """Refuse, before any build, a checkpoint TensorRT-LLM's kernels cannot run."""
    head = int(config.get("head_size") or config["hidden_size"] // config["num_attention_heads"])
    if head < MIN_HEAD_SIZE:
        raise TrtLlmError(f"head size {head} is below the {MIN_HEAD_SIZE} TensorRT-LLM's attention kernels start at "
                          "(\"unsupported head_size\"): this LLM cannot be built into a TensorRT-LLM engine")


def build_engine(ckpt_dir, out_dir, max_batch: int, max_input_len: int, max_output_len: int,
                 max_prompt_embedding_table_size: int, progress=print) -> Path:
    """Build the checkpoint into a TensorRT-LLM engine directory (config.json + rank{r}.engine per rank).

    Runs TensorRT-LLM's own `trtllm-build` in a child process: it is the documented, versioned
    interface (the Python builder API has changed between releases), and the build's GPU memory is
    returned when it exits.
    """
    config = checkpoint_config(ckpt_dir)  # a missing or malformed checkpoint fails here, before the slow part
    check_engine_config(config)
    world = config.get("mapping", {}).get("world_size", 1)
    require_tensorrt_llm()
    gpus = torch.cuda.device_count()
    if gpus < world:
        # trtllm-build builds any world size on one GPU, but the engine runs one rank per GPU
        progress(f"note: building {world} ranks on {gpus} GPU(s); serving them needs {world} GPUs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = trtllm_build_command(ckpt_dir, out, max_batch, max_input_len, max_output_len,
                               max_prompt_embedding_table_size, (config.get("quantization") or {}).get("quant_algo"),
                               workers=max(1, min(world, gpus)))
    progress("building TensorRT-LLM engine: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise TrtLlmError(f"trtllm-build failed (exit {proc.returncode}):\n{tail}")
    missing = [name for name in [CONFIG, *(f"rank{r}.engine" for r in range(world))] if not (out / name).is_file()]
    if missing:
        raise TrtLlmError(f"trtllm-build finished but {out} lacks {', '.join(missing)}")
    return out

