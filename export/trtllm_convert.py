"""The LLM as a TensorRT-LLM checkpoint, and its engine build.

A TensorRT-LLM checkpoint is a directory (docs: TensorRT-LLM "architecture/checkpoint"):
  config.json         architecture, dtype, shapes, mapping (world/tp/pp size), quantization
  rank0.safetensors   the weights under TensorRT-LLM's names (one file per rank; facert writes tp=pp=1)

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

Visual and segmentation tokens reach the engine as TensorRT-LLM's prompt table (p-tuning): ids at
and above vocab_size index a per-request table, so the engine is built with
max_prompt_embedding_table_size = max_batch x (image + segmentation tokens) (`prompt_table_size`).
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
WEIGHTS = "rank0.safetensors"

# transformers model_type -> TensorRT-LLM `architecture` (its MODEL_MAP key).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# facert's precision names (`facert build --precision`) -> TensorRT-LLM dtype names.
PRECISION_TO_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

INSTALL_HINT = ("install TensorRT-LLM on a Linux machine with an NVIDIA GPU "
                "(pip install tensorrt-llm --extra-index-url https://pypi.nvidia.com, matching your CUDA), "
                "or run inside NVIDIA's TensorRT-LLM container (nvcr.io/nvidia/tensorrt-llm/release)")


class TrtLlmError(RuntimeError):
    """TensorRT-LLM is missing, or a checkpoint / engine build is not what it should be."""


def require_tensorrt_llm():
    """The tensorrt_llm module, or a TrtLlmError that says what to install."""
    try:
        return importlib.import_module("tensorrt_llm")
    except ImportError as e:  # also a broken install (missing CUDA libraries raise ImportError/OSError)
        raise TrtLlmError(f"TensorRT-LLM is not installed ({e}); {INSTALL_HINT}") from e
    except OSError as e:
        raise TrtLlmError(f"TensorRT-LLM failed to load ({e}); {INSTALL_HINT}") from e


def _dtype_name(dtype: str) -> str:
    name = PRECISION_TO_DTYPE.get(dtype, dtype)
    if name not in DTYPES:
        if dtype == "fp8":
            raise TrtLlmError("fp8 TensorRT-LLM checkpoints need calibrated scales (NVIDIA ModelOpt quantisation); "
                              "convert with float16 or bfloat16")
        raise TrtLlmError(f"dtype must be one of {', '.join(DTYPES)} (or fp32/fp16/bf16), got {dtype!r}")
    return name


def _rope(cfg) -> tuple[float, dict | None]:
    """rotary_base and rotary_scaling from a transformers config (v5 keeps them in rope_parameters)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    base = float(rope.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    kind = rope.pop("rope_type", "default")
    return base, (None if kind == "default" else {"type": kind, **rope})


def trtllm_config(llm, dtype: str = "float16") -> dict:
    """config.json of the TensorRT-LLM checkpoint for a transformers LlamaForCausalLM / Qwen2ForCausalLM."""
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
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }
    if cfg.model_type == "qwen2":
        # QWenConfig fields (TensorRT-LLM models/qwen/config.py); qwen_type selects the Qwen2 layout.
        out.update({"qwen_type": "qwen2", "seq_length": cfg.max_position_embeddings, "use_logn_attn": False,
                    "moe_intermediate_size": 0, "moe_shared_expert_intermediate_size": 0})
    return out


def trtllm_weights(llm, dtype: str = "float16") -> dict[str, torch.Tensor]:
    """The rank-0 weights under TensorRT-LLM's names, cast to `dtype`, contiguous and unshared."""
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
        out[p + "post_layernorm.weight"] = t(layer.post_attention_layernorm.weight)
        out[p + "mlp.fc.weight"] = t(mlp.gate_proj.weight)
        out[p + "mlp.gate.weight"] = t(mlp.up_proj.weight)
        out[p + "mlp.proj.weight"] = t(mlp.down_proj.weight)
    out["transformer.ln_f.weight"] = t(body.norm.weight)
    out["lm_head.weight"] = t(llm.get_output_embeddings().weight)  # the embedding itself when tied
    return out


def expected_tensors(config: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor a checkpoint with this config.json must hold: name -> (shape, dtype name)."""
    h, v, f = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    d = config["head_size"]
    qkv = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * d
    dt = config["dtype"]
    out = {"transformer.vocab_embedding.weight": ((v, h), dt), "transformer.ln_f.weight": ((h,), dt),
           "lm_head.weight": ((v, h), dt)}
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        out[p + "input_layernorm.weight"] = ((h,), dt)
        out[p + "attention.qkv.weight"] = ((qkv, h), dt)
        if config.get("attn_bias"):
            out[p + "attention.qkv.bias"] = ((qkv,), dt)
        out[p + "attention.dense.weight"] = ((h, config["num_attention_heads"] * d), dt)
        out[p + "post_layernorm.weight"] = ((h,), dt)
        out[p + "mlp.fc.weight"] = ((f, h), dt)
        out[p + "mlp.gate.weight"] = ((f, h), dt)
        out[p + "mlp.proj.weight"] = ((h, f), dt)
    return out


def convert_checkpoint(model, spec: dict, out_dir, dtype: str = "float16") -> Path:
    """Write the LLM of a facert model (`model.llm`, transformers) as a TensorRT-LLM checkpoint.

    `spec` is the facert spec; it is not needed for the weights, but a spec naming another LLM than
    the model holds is refused. Returns the checkpoint directory.
    """
    llm = model.llm
    llm_spec = spec.get("llm") if isinstance(spec, dict) else None
    if isinstance(llm_spec, dict) and llm_spec.get("model_type") not in (None, llm.config.model_type):
        raise TrtLlmError(f"spec says the LLM is {llm_spec['model_type']!r} but the model holds "
                          f"{llm.config.model_type!r}")
    config = trtllm_config(llm, dtype)
    weights = trtllm_weights(llm, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def checkpoint_config(ckpt_dir) -> dict:
    """config.json of a TensorRT-LLM checkpoint directory, after checking both files are there."""
    d = Path(ckpt_dir)
    for name in (CONFIG, WEIGHTS):
        if not (d / name).is_file():
            raise TrtLlmError(f"{d} is not a TensorRT-LLM checkpoint: {name} is missing")
    try:
        return json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise TrtLlmError(f"{d / CONFIG} is not valid JSON: {e}") from e


def read_checkpoint(ckpt_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, rank-0 tensors) of a TensorRT-LLM checkpoint; a missing file is a TrtLlmError."""
    d = Path(ckpt_dir)
    config = checkpoint_config(d)
    if config.get("mapping", {}).get("world_size", 1) != 1:
        raise TrtLlmError(f"{d} is split over {config['mapping']['world_size']} ranks; only rank 0 of tp=pp=1 is read")
    with safe_open(str(d / WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return config, tensors


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

    config = checkpoint_config(ckpt_dir)
    model_type = {a: t for t, a in ARCHITECTURES.items()}.get(config["architecture"])
    if model_type is None:
        raise TrtLlmError(f"unknown architecture {config['architecture']!r} in {ckpt_dir}")
    rope = {"rope_type": "default", "rope_theta": config["rotary_base"]}
    if config.get("rotary_scaling"):
        scaling = dict(config["rotary_scaling"])
        rope = {"rope_type": scaling.pop("type"), "rope_theta": config["rotary_base"], **scaling}
    hf_cfg = AutoConfig.for_model(
        model_type, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"], num_key_value_heads=config["num_key_value_heads"],
        head_dim=config["head_size"], max_position_embeddings=config["max_position_embeddings"],
        rms_norm_eps=config["norm_epsilon"], hidden_act=config["hidden_act"], rope_parameters=rope,
        tie_word_embeddings=config["tie_word_embeddings"],
        **({"attention_bias": config["attn_bias"]} if model_type == "llama" else {}))
    llm = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    state = {k: v.to(dtype) for k, v in invert_checkpoint(ckpt_dir).items()}
    llm.load_state_dict(state, strict=True)
    return llm


# ----------------------------------------------------------------------------------- engine build

def prompt_table_size(model, max_batch: int) -> int:
    """Rows of prompt table an engine needs: every request of a full batch brings its image and seg tokens.

    `model` is anything with num_image_tokens and num_seg_tokens (a facert model or components).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    return max_batch * (int(model.num_image_tokens) + int(model.num_seg_tokens))


def trtllm_build_command(ckpt_dir, out_dir, max_batch: int, max_input_len: int, max_output_len: int,
                         max_prompt_embedding_table_size: int) -> list[str]:
    """The `trtllm-build` command line (run as `python -m tensorrt_llm.commands.build`)."""
    for name, value in (("max_batch", max_batch), ("max_input_len", max_input_len),
                        ("max_output_len", max_output_len)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if max_prompt_embedding_table_size < 0:
        raise ValueError(f"max_prompt_embedding_table_size must be >= 0, got {max_prompt_embedding_table_size}")
    return [sys.executable, "-m", "tensorrt_llm.commands.build",
            "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out_dir),
            "--max_batch_size", str(max_batch), "--max_input_len", str(max_input_len),
            "--max_seq_len", str(max_input_len + max_output_len),
            "--max_prompt_embedding_table_size", str(max_prompt_embedding_table_size),
            "--gemm_plugin", "auto"]


def build_engine(ckpt_dir, out_dir, max_batch: int, max_input_len: int, max_output_len: int,
                 max_prompt_embedding_table_size: int, progress=print) -> Path:
    """Build the checkpoint into a TensorRT-LLM engine directory (config.json + rank0.engine).

    Runs TensorRT-LLM's own `trtllm-build` in a child process: it is the documented, versioned
    interface (the Python builder API has changed between releases), and the build's GPU memory is
    returned when it exits.
    """
    checkpoint_config(ckpt_dir)  # a missing or malformed checkpoint fails here, before the slow part
    require_tensorrt_llm()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = trtllm_build_command(ckpt_dir, out, max_batch, max_input_len, max_output_len,
                               max_prompt_embedding_table_size)
    progress("building TensorRT-LLM engine: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise TrtLlmError(f"trtllm-build failed (exit {proc.returncode}):\n{tail}")
    engine = out / "rank0.engine"
    if not engine.is_file() or not (out / CONFIG).is_file():
        raise TrtLlmError(f"trtllm-build finished but {out} holds no rank0.engine + config.json")
    return out

