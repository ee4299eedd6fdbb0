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

from runtime.backends.trtllm_backend import TrtLlmError, require_tensorrt_llm
from safetensors import safe_open
from safetensors.torch import save_file

CONFIG = "config.json"
WEIGHTS = "rank0.safetensors"

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


def check_weight_only_shapes(llm) -> None:
    """Every linear TensorRT-LLM quantizes (qkv, dense, fc, gate, proj) has in/out features that are
    multiples of 64, else its weight-only layer would be padded and refuse the checkpoint's weights."""
    layer = llm.model.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    odd = []
    for name, lin in (("qkv", att.q_proj), ("qkv", att.k_proj), ("dense", att.o_proj), ("fc", mlp.gate_proj),
                      ("proj", mlp.down_proj)):
        for side, n in (("in", lin.in_features), ("out", lin.out_features)):
            if n % WEIGHT_ONLY_MULTIPLE:
                odd.append(f"{name} {side}_features {n}")
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


def trtllm_config(llm, dtype: str = "float16", quantization: str | None = None) -> dict:
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
        "quantization": quant_config(quantization),
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
        if att.o_proj.bias is not None:  # LLaMA with attention_bias: TensorRT-LLM's dense layer has a bias too
            out[p + "attention.dense.bias"] = t(att.o_proj.bias)
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
        if config.get("attn_bias") and config["architecture"] == "LlamaForCausalLM":
            out[p + "attention.dense.bias"] = ((h,), dt)  # Qwen2's Attention has dense_bias=False
        out[p + "post_layernorm.weight"] = ((h,), dt)
        out[p + "mlp.fc.weight"] = ((f, h), dt)
        out[p + "mlp.gate.weight"] = ((f, h), dt)
        out[p + "mlp.proj.weight"] = ((h, f), dt)
    return out


def convert_checkpoint(model, spec: dict, out_dir, dtype: str = "float16", quantization: str | None = None) -> Path:
    """Write the LLM of a facert model (`model.llm`, transformers) as a TensorRT-LLM checkpoint.

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
        check_weight_only_shapes(llm)
    config = trtllm_config(llm, dtype, quantization)
    weights = trtllm_weights(llm, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return out


def quantize_fp8(model, spec: dict, out_dir, calibration, dtype: str = "float16", device: str = "cuda") -> Path:
    """An FP8 TensorRT-LLM checkpoint of `model.llm`, calibrated by NVIDIA ModelOpt.

    `calibration` is an iterable of prompt embeddings [1, T, D] (what the LLM sees in facert: text
    tokens with the image/seg rows spliced in, export.build.calibration_embeds): ModelOpt's
    forward_loop runs the LLM on each, its quantizers record the activation ranges, and
    export_tensorrt_llm_checkpoint writes config.json (quant_algo FP8) and rank0.safetensors with
    FP8 weights and their scales. Needs ModelOpt and a CUDA GPU (its FP8 kernels); the source
    model's LLM is quantized in place on `device`.
    """
    llm = model.llm
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
                                              inference_tensor_parallel=1, inference_pipeline_parallel=1)
    config = checkpoint_config(out)
    if (config.get("quantization") or {}).get("quant_algo") != "FP8":
        raise TrtLlmError(f"ModelOpt wrote {out / CONFIG} without quant_algo FP8: {config.get('quantization')}")
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
                         max_prompt_embedding_table_size: int, quant_algo: str | None = None) -> list[str]:
    """The `trtllm-build` command line (run as `python -m tensorrt_llm.commands.build`).

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
    cmd = [sys.executable, "-m", "tensorrt_llm.commands.build",
           "--checkpoint_dir", str(ckpt_dir), "--output_dir", str(out_dir),
           "--max_batch_size", str(max_batch), "--max_input_len", str(max_input_len),
           "--max_seq_len", str(max_input_len + max_output_len),
           "--max_prompt_embedding_table_size", str(max_prompt_embedding_table_size),
           "--gemm_plugin", "auto", "--gather_generation_logits"]
    if quant_algo in ("W8A16", "W4A16"):
        cmd += ["--weight_only_quant_matmul_plugin", "auto"]
    return cmd


def check_engine_config(config: dict) -> None:
    """Refuse, before any build, a checkpoint TensorRT-LLM's kernels cannot run."""
    head = int(config.get("head_size") or config["hidden_size"] // config["num_attention_heads"])
    if head < MIN_HEAD_SIZE:
        raise TrtLlmError(f"head size {head} is below the {MIN_HEAD_SIZE} TensorRT-LLM's attention kernels start at "
                          "(\"unsupported head_size\"): this LLM cannot be built into a TensorRT-LLM engine")


def build_engine(ckpt_dir, out_dir, max_batch: int, max_input_len: int, max_output_len: int,
                 max_prompt_embedding_table_size: int, progress=print) -> Path:
    """Build the checkpoint into a TensorRT-LLM engine directory (config.json + rank0.engine).

    Runs TensorRT-LLM's own `trtllm-build` in a child process: it is the documented, versioned
    interface (the Python builder API has changed between releases), and the build's GPU memory is
    returned when it exits.
    """
    config = checkpoint_config(ckpt_dir)  # a missing or malformed checkpoint fails here, before the slow part
    check_engine_config(config)
    require_tensorrt_llm()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cmd = trtllm_build_command(ckpt_dir, out, max_batch, max_input_len, max_output_len,
                               max_prompt_embedding_table_size, (config.get("quantization") or {}).get("quant_algo"))
    progress("building TensorRT-LLM engine: " + " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise TrtLlmError(f"trtllm-build failed (exit {proc.returncode}):\n{tail}")
    engine = out / "rank0.engine"
    if not engine.is_file() or not (out / CONFIG).is_file():
        raise TrtLlmError(f"trtllm-build finished but {out} holds no rank0.engine + config.json")
    return out

