"""TensorRT-LLM checkpoints: the converter (runs here) and the engine build + run (needs TensorRT-LLM).

Converter checks: every tensor TensorRT-LLM's LLaMA / Qwen2 models load is present with the right
name, shape and dtype; the name mapping follows TensorRT-LLM's own convert code (gate_proj -> mlp.fc,
up_proj -> mlp.gate); config.json carries the fields trtllm-build reads; and the checkpoint, turned
back into a transformers LLM from config.json + the inverse mapping alone, reproduces the source LLM.

Tolerances (logits, against the fp32 torch LLM on random token ids):
  float32 checkpoint: bit-exact for the weights, logits atol 1e-5
  float16 checkpoint: weights rounded to fp16, evaluated in fp32: |diff| <= 1e-2 * max|logits|
  bfloat16 checkpoint: 8-bit mantissa: |diff| <= 5e-2 * max|logits|
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from export import trtllm_convert as tc
from runtime.models.mllm import build_model
from runtime.specs import get_spec

SPECS = ("tiny", "tiny-facellm")
LOGIT_TOL = {"float32": 0.0, "float16": 1e-2, "bfloat16": 5e-2}  # relative to max |logits|; fp32 uses atol 1e-5


def _model(name: str):
    """The spec's model with every LLM parameter perturbed, so norms are not all ones and a swapped
    pair of tensors of equal shape (input/post norm, gate/up) changes the output."""
    torch.manual_seed(0)
    spec = get_spec(name)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, spec


def _trt_model(name: str):
    """The spec's model with an LLM TensorRT-LLM's kernels run: head size 64 (LLaMA, 2 heads, 1 KV head)
    or 32 (Qwen2, 4 heads, 2 KV heads), and every linear a multiple of 64 wide (weight-only layers)."""
    spec = get_spec(name)
    heads, kv = (2, 1) if spec["llm"]["model_type"] == "llama" else (4, 2)
    spec["llm"].update(hidden_size=128, intermediate_size=192, num_attention_heads=heads, num_key_value_heads=kv)
    torch.manual_seed(0)
    model = build_model(spec)
    with torch.no_grad():
        for p in model.llm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, spec


@pytest.fixture(scope="module", params=SPECS)
def source(request):
    return _model(request.param)


@pytest.fixture(scope="module", params=SPECS)
def trt_source(request):
    return _trt_model(request.param)


@pytest.fixture(scope="module")
def fp32_ckpt(source, tmp_path_factory):
    model, spec = source
    return tc.convert_checkpoint(model, spec, tmp_path_factory.mktemp("trtllm") / spec["spec"], dtype="float32")


def _logits(llm, ids):
    with torch.no_grad():
        return llm(ids).logits.float()


# -------------------------------------------------------------------------------- tensor inventory

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_every_tensor_present_with_name_shape_dtype(source, tmp_path, dtype):
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype=dtype)
    config = json.loads((ckpt / "config.json").read_text())
    with safe_open(str(ckpt / "rank0.safetensors"), framework="pt") as f:
        got = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    st_dtype = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}[dtype]

    # The inventory, written out from the LLM's own shapes (independent of expected_tensors()).
    c = model.llm.config
    h, f_, v, layers = c.hidden_size, c.intermediate_size, c.vocab_size, c.num_hidden_layers
    d = c.hidden_size // c.num_attention_heads
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * d
    want = {"transformer.vocab_embedding.weight": (v, h), "transformer.ln_f.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        want |= {p + "input_layernorm.weight": (h,), p + "post_layernorm.weight": (h,),
                 p + "attention.qkv.weight": (qkv, h), p + "attention.dense.weight": (h, h),
                 p + "mlp.fc.weight": (f_, h), p + "mlp.gate.weight": (f_, h), p + "mlp.proj.weight": (h, f_)}
        if c.model_type == "qwen2":  # Qwen2 has q/k/v biases; LLaMA has none
            want[p + "attention.qkv.bias"] = (qkv,)
    assert set(got) == set(want), f"missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    for name, shape in want.items():
        assert got[name] == (shape, st_dtype), name
    # expected_tensors() (what a reader of config.json expects) agrees with the file.
    assert {k: s for k, (s, _) in tc.expected_tensors(config).items()} == {k: s for k, (s, _) in got.items()}


def test_config_json_fields(source, fp32_ckpt):
    model, spec = source
    c = model.llm.config
    cfg = json.loads((fp32_ckpt / "config.json").read_text())
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[spec["llm"]["model_type"]]
    assert cfg["architecture"] == arch
    assert cfg["dtype"] == "float32" and cfg["logits_dtype"] == "float32"
    for key, want in {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
                      "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                      "num_key_value_heads": c.num_key_value_heads, "intermediate_size": c.intermediate_size,
                      "max_position_embeddings": c.max_position_embeddings, "hidden_act": "silu",
                      "norm_epsilon": spec["llm"]["rms_norm_eps"],
                      "rotary_base": spec["llm"].get("rope_theta", 10000.0),
                      "head_size": c.hidden_size // c.num_attention_heads,
                      "position_embedding_type": "rope_gpt_neox",
                      "tie_word_embeddings": spec["llm"]["tie_word_embeddings"]}.items():
        assert cfg[key] == want, key
    assert cfg["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert cfg["quantization"]["quant_algo"] is None
    assert cfg["attn_bias"] is (arch == "Qwen2ForCausalLM")
    if arch == "Qwen2ForCausalLM":
        assert cfg["qwen_type"] == "qwen2"


def test_names_follow_tensorrt_llm_convert(source, fp32_ckpt):
    """Pinned against TensorRT-LLM's models/llama/convert.py and models/qwen/convert.py: gate_proj is
    `mlp.fc` (its GatedMLP computes act(fc(x)) * gate(x)), up_proj is `mlp.gate`, q|k|v stack on dim 0."""
    model, _ = source
    w = load_file(str(fp32_ckpt / "rank0.safetensors"))
    layer = model.llm.model.layers[1]
    att, mlp = layer.self_attn, layer.mlp
    p = "transformer.layers.1."
    assert torch.equal(w[p + "mlp.fc.weight"], mlp.gate_proj.weight)
    assert torch.equal(w[p + "mlp.gate.weight"], mlp.up_proj.weight)
    assert torch.equal(w[p + "mlp.proj.weight"], mlp.down_proj.weight)
    assert torch.equal(w[p + "attention.qkv.weight"],
                       torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    assert torch.equal(w[p + "attention.dense.weight"], att.o_proj.weight)
    assert torch.equal(w[p + "input_layernorm.weight"], layer.input_layernorm.weight)
    assert torch.equal(w[p + "post_layernorm.weight"], layer.post_attention_layernorm.weight)
    assert torch.equal(w["transformer.ln_f.weight"], model.llm.model.norm.weight)
    assert torch.equal(w["lm_head.weight"], model.llm.get_output_embeddings().weight)
    if att.q_proj.bias is not None:
        assert torch.equal(w[p + "attention.qkv.bias"], torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias]))


# ------------------------------------------------------------------------------- logits parity

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_converted_weights_reproduce_torch_logits(source, tmp_path, dtype):
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype=dtype)
    rebuilt = tc.reference_llm(ckpt)  # transformers LLM from config.json + inverse mapping, fp32
    torch.manual_seed(3)
    ids = torch.randint(0, model.vocab_size, (2, 13))  # fresh random tokens
    want, got = _logits(model.llm, ids), _logits(rebuilt, ids)
    if dtype == "float32":
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:
        err = (got - want).abs().max().item()
        assert err <= LOGIT_TOL[dtype] * want.abs().max().item(), f"{dtype}: max |diff| {err}"


def test_inverse_mapping_is_exact(source, fp32_ckpt):
    model, _ = source
    inverted = tc.invert_checkpoint(fp32_ckpt)
    state = model.llm.state_dict()
    assert set(inverted) == set(state)
    for k, v in state.items():
        assert torch.equal(inverted[k], v), k


def test_parity_catches_a_wrong_mapping(source, fp32_ckpt, tmp_path):
    """The parity check can fail: swap fc and gate (the mapping mistake that is easy to make)."""
    model, _ = source
    bad = tmp_path / "bad"
    shutil.copytree(fp32_ckpt, bad)
    w = load_file(str(bad / "rank0.safetensors"))
    p = "transformer.layers.0.mlp."
    w[p + "fc.weight"], w[p + "gate.weight"] = w[p + "gate.weight"].clone(), w[p + "fc.weight"].clone()
    save_file(w, str(bad / "rank0.safetensors"))
    ids = torch.randint(0, model.vocab_size, (1, 9))
    assert (_logits(tc.reference_llm(bad), ids) - _logits(model.llm, ids)).abs().max() > 1e-3


# ------------------------------------------------------------------------------ refusals, sizing

def test_refusals(tmp_path, source):
    model, spec = source
    with pytest.raises(tc.TrtLlmError, match="rank0.safetensors is missing"):
        (tmp_path / "half").mkdir()
        (tmp_path / "half" / "config.json").write_text("{}")
        tc.invert_checkpoint(tmp_path / "half")
    with pytest.raises(tc.TrtLlmError, match="ModelOpt"):
        tc.convert_checkpoint(model, spec, tmp_path / "fp8", dtype="fp8")
    with pytest.raises(tc.TrtLlmError, match="dtype must be one of"):
        tc.convert_checkpoint(model, spec, tmp_path / "x", dtype="int3")
    other = dict(spec, llm=dict(spec["llm"], model_type="qwen2" if spec["llm"]["model_type"] == "llama" else "llama"))
    with pytest.raises(tc.TrtLlmError, match="spec says the LLM is"):
        tc.convert_checkpoint(model, other, tmp_path / "y")
    # facert's precision names are accepted too
    ck = tc.convert_checkpoint(model, spec, tmp_path / "bf16", dtype="bf16")
    assert json.loads((ck / "config.json").read_text())["dtype"] == "bfloat16"


def test_unsupported_llm_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    class Holder:
        llm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))

    with pytest.raises(tc.TrtLlmError, match="supports llama, qwen2"):
        tc.convert_checkpoint(Holder(), {}, "/nonexistent-never-written")


def test_prompt_table_size_counts_image_and_seg_tokens():
    tiny, _ = _model("tiny")
    facellm, _ = _model("tiny-facellm")
    assert tiny.num_seg_tokens > 0 and facellm.num_seg_tokens == 0
    assert tc.prompt_table_size(tiny, 4) == 4 * (tiny.num_image_tokens + tiny.num_seg_tokens)
    assert tc.prompt_table_size(facellm, 3) == 3 * facellm.num_image_tokens
    with pytest.raises(ValueError):
        tc.prompt_table_size(tiny, 0)


def _options(cmd: list[str]) -> dict:
    """--flag value pairs of a command line; a flag with no value maps to True."""
    out, i = {}, 3
    while i < len(cmd):
        if i + 1 < len(cmd) and not cmd[i + 1].startswith("--"):
            out[cmd[i]], i = cmd[i + 1], i + 2
        else:
            out[cmd[i]], i = True, i + 1
    return out


def test_build_command(tmp_path):
    cmd = tc.trtllm_build_command(tmp_path / "ck", tmp_path / "eng", max_batch=4, max_input_len=300,
                                  max_output_len=64, max_prompt_embedding_table_size=4 * 20)
    assert cmd[1:3] == ["-m", "tensorrt_llm.commands.build"]
    # generation logits are gathered: the runtime returns the first answer token's logits
    assert _options(cmd) == {"--checkpoint_dir": str(tmp_path / "ck"), "--output_dir": str(tmp_path / "eng"),
                             "--max_batch_size": "4", "--max_input_len": "300", "--max_seq_len": "364",
                             "--max_prompt_embedding_table_size": "80", "--gemm_plugin": "auto",
                             "--gather_generation_logits": True}
    for algo in ("W8A16", "W4A16"):  # weight-only: its GEMM plugin (int4 has no other kernel)
        opts = _options(tc.trtllm_build_command("a", "b", 1, 10, 5, 0, quant_algo=algo))
        assert opts["--weight_only_quant_matmul_plugin"] == "auto"
    assert "--weight_only_quant_matmul_plugin" not in _options(tc.trtllm_build_command("a", "b", 1, 10, 5, 0, "FP8"))
    with pytest.raises(ValueError, match="max_output_len"):
        tc.trtllm_build_command("a", "b", 1, 10, 0, 0)


def test_head_sizes_below_32_are_refused_before_any_build(fp32_ckpt, tmp_path):
    """TensorRT-LLM's attention kernels start at head size 32 ("unsupported head_size"): the tiny specs'
    16 and 12 are refused before TensorRT-LLM is needed, with the reason."""
    with pytest.raises(tc.TrtLlmError, match=r"head size (16|12) is below the 32"):
        tc.build_engine(fp32_ckpt, tmp_path / "engine", 1, 8, 8, 0)
    tc.check_engine_config({"head_size": 64, "hidden_size": 128, "num_attention_heads": 2})
    from export.build import _check_trtllm_model

    with pytest.raises(tc.TrtLlmError, match="head size"):
        _check_trtllm_model(build_model(get_spec("tiny")), "bf16")


# ------------------------------------------------------------------------- quantized checkpoints

@pytest.mark.parametrize("precision,algo", [("int8", "W8A16"), ("int4", "W4A16")])
def test_weight_only_checkpoint_config_and_tensors(trt_source, tmp_path, precision, algo):
    """Weight-only: config.json's quantization names TensorRT-LLM's QuantAlgo; the weights stay float
    in the activation dtype (trtllm-build quantizes them into its kernels' layout) and unchanged."""
    model, spec = trt_source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="bfloat16", quantization=precision)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": algo, "kv_cache_quant_algo": None}
    assert config["dtype"] == "bfloat16"
    plain = load_file(str(tc.convert_checkpoint(model, spec, tmp_path / "plain", dtype="bfloat16") / "rank0.safetensors"))
    quant = load_file(str(ckpt / "rank0.safetensors"))
    assert set(quant) == set(plain)
    for name, t in quant.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, plain[name]), name
    opts = _options(tc.trtllm_build_command(ckpt, tmp_path / "e", 1, 8, 8, 0, config["quantization"]["quant_algo"]))
    assert opts["--weight_only_quant_matmul_plugin"] == "auto"


def test_quantization_refusals(source, trt_source, tmp_path):
    model, spec = source  # hidden 64, intermediate 96 (tiny) / 48, 80 (tiny-facellm): not multiples of 64
    with pytest.raises(tc.TrtLlmError, match="multiples of 64"):
        tc.convert_checkpoint(model, spec, tmp_path / "a", dtype="float16", quantization="int8")
    model, spec = trt_source
    with pytest.raises(tc.TrtLlmError, match="float16 or bfloat16 activations"):
        tc.convert_checkpoint(model, spec, tmp_path / "b", dtype="float32", quantization="int4")
    with pytest.raises(tc.TrtLlmError, match="ModelOpt"):
        tc.convert_checkpoint(model, spec, tmp_path / "c", dtype="float16", quantization="fp8")
    with pytest.raises(tc.TrtLlmError, match="quantization must be one of"):
        tc.convert_checkpoint(model, spec, tmp_path / "d", dtype="float16", quantization="int2")
    with pytest.raises(tc.TrtLlmError, match="is a quantization, not a dtype"):
        tc.convert_checkpoint(model, spec, tmp_path / "e", dtype="int8")


def _has_modelopt() -> bool:
    try:
        import modelopt.torch.quantization  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(_has_modelopt(), reason="ModelOpt is installed: the not-installed message cannot be shown")
def test_fp8_says_what_to_install(trt_source, tmp_path):
    model, spec = trt_source
    with pytest.raises(tc.TrtLlmError, match=r"fp8 needs NVIDIA ModelOpt.*nvidia-modelopt"):
        tc.quantize_fp8(model, spec, tmp_path / "fp8", [torch.zeros(1, 4, 128)])
    with pytest.raises(tc.TrtLlmError, match="not float32"):
        tc.quantize_fp8(model, spec, tmp_path / "fp8", [], dtype="float32")


def test_fp8_calibration_prompts_are_image_prompts(tiny_checkpoint):
    """fp8 calibration feeds the LLM what it sees in service: chat-template text with a real photo's
    image and seg rows spliced in (ids >= vocab_size replaced), different for different crops."""
    from export.build import calibration_embeds
    from runtime.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(tiny_checkpoint)
    embeds = calibration_embeds(model, tok, count=3)
    d = model.llm.config.hidden_size
    rows = model.num_image_tokens + model.num_seg_tokens
    assert len(embeds) == 3 and all(e.ndim == 2 and e.shape[1] == d and e.shape[0] > rows for e in embeds)
    assert all(torch.isfinite(e).all() for e in embeds)
    assert not torch.equal(embeds[0], embeds[1])  # the image rows differ between crops


# ------------------------------------------------------------------- rope scaling, attention bias

def _llama(tmp_scaling: bool = True, attention_bias: bool = False):
    """A transformers LLaMA with linear rope scaling (factor 2) and/or attention biases, built with the
    installed transformers' own config keywords (rope_parameters in 5.x, rope_theta + rope_scaling in 4.x)."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, max_position_embeddings=256, attention_bias=attention_bias)
    scaling = {"rope_type": "linear", "factor": 2.0} if tmp_scaling else None
    if int(transformers.__version__.split(".")[0]) >= 5:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0, **(scaling or {})}
    else:
        kw.update(rope_theta=5000.0, rope_scaling=scaling)
    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(0.05 * torch.randn_like(p))

    class Holder:
        pass

    holder = Holder()
    holder.llm = llm
    return holder


def test_rope_scaling_reaches_the_checkpoint(tmp_path):
    """rotary_base and rotary_scaling come from the installed transformers' own fields, and the
    checkpoint rebuilt from config.json alone reproduces the scaled-rope logits (positions past 64)."""
    model = _llama()
    ckpt = tc.convert_checkpoint(model, {}, tmp_path / "ck", dtype="float32")
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["rotary_base"] == 5000.0
    assert cfg["rotary_scaling"]["type"] == cfg["rotary_scaling"]["rope_type"] == "linear"
    assert cfg["rotary_scaling"]["factor"] == 2.0
    ids = torch.randint(0, 96, (1, 120))
    torch.testing.assert_close(_logits(tc.reference_llm(ckpt), ids), _logits(model.llm, ids), atol=1e-5, rtol=0)
    plain = tc.convert_checkpoint(_llama(tmp_scaling=False), {}, tmp_path / "plain", dtype="float32")
    assert json.loads((plain / "config.json").read_text())["rotary_scaling"] is None


def test_llama_attention_bias_keeps_the_output_projection_bias(tmp_path):
    """A LLaMA with attention_bias has an o_proj bias: TensorRT-LLM's LLaMA attention (bias=attn_bias,
    dense_bias defaulting to it) loads it as attention.dense.bias; leaving it out changes every output."""
    model = _llama(tmp_scaling=False, attention_bias=True)
    ckpt = tc.convert_checkpoint(model, {}, tmp_path / "ck", dtype="float32")
    cfg = json.loads((ckpt / "config.json").read_text())
    w = load_file(str(ckpt / "rank0.safetensors"))
    assert cfg["attn_bias"] is True
    assert torch.equal(w["transformer.layers.1.attention.dense.bias"], model.llm.model.layers[1].self_attn.o_proj.bias)
    assert set(tc.expected_tensors(cfg)) == set(w)
    ids = torch.randint(0, 96, (1, 20))
    torch.testing.assert_close(_logits(tc.reference_llm(ckpt), ids), _logits(model.llm, ids), atol=1e-5, rtol=0)


def test_prompt_table_counts_images_and_tiles():
    facellm, _ = _model("tiny-facellm")
    tiny, _ = _model("tiny")
    n = facellm.num_image_tokens
    assert tc.tiles_per_image(facellm, 1) == 1 and tc.tiles_per_image(facellm, 6) == 7  # 6 tiles + thumbnail
    assert tc.tiles_per_image(tiny, 6) == 1  # LLaVA: one square image
    assert tc.prompt_rows_per_request(facellm, 2, 6) == 2 * 7 * n
    assert tc.prompt_table_size(facellm, 4, 2, 6) == 4 * 2 * 7 * n
    assert tc.prompt_table_size(tiny, 3, 2) == 3 * 2 * (tiny.num_image_tokens + tiny.num_seg_tokens)


def _has_tensorrt_llm() -> bool:
    try:
        tc.require_tensorrt_llm()
        return True
    except tc.TrtLlmError:
        return False


HAS_TRTLLM = _has_tensorrt_llm()
NO_ENGINE_REASON = ", ".join(
    ([] if HAS_TRTLLM else ["needs TensorRT-LLM (pip install tensorrt-llm on a machine with an NVIDIA GPU, "
                            "or NVIDIA's TensorRT-LLM container)"])
    + ([] if torch.cuda.is_available() else ["needs a CUDA GPU"]))


@pytest.mark.skipif(HAS_TRTLLM, reason="TensorRT-LLM is installed: the not-installed message cannot be shown")
def test_build_engine_says_what_to_install(trt_source, tmp_path):
    model, spec = trt_source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float16")
    with pytest.raises(tc.TrtLlmError, match=r"TensorRT-LLM is not installed.*pip install tensorrt-llm.*container"):
        tc.build_engine(ckpt, tmp_path / "engine", max_batch=2, max_input_len=64, max_output_len=16,
                        max_prompt_embedding_table_size=8)
    with pytest.raises(tc.TrtLlmError, match="config.json is missing"):
        tc.build_engine(tmp_path / "nowhere", tmp_path / "engine", 1, 8, 8, 0)
    from runtime.backends.trtllm_backend import TrtLlmGenerator

    with pytest.raises(tc.TrtLlmError, match="TensorRT-LLM is not installed"):
        TrtLlmGenerator(tmp_path)


# ------------------------------------------------------- engine build and run (TensorRT-LLM + GPU)

@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_ENGINE_REASON), reason=NO_ENGINE_REASON)
@pytest.mark.parametrize("quantization", [None, "int8", "int4"])
def test_engine_with_prompt_table_matches_torch(trt_source, tmp_path, quantization):
    """Build the fp16 engine (plain, int8 or int4 weight-only), feed a prompt whose ids >= vocab_size
    index a per-request prompt table, compare greedy tokens and first-step logits with the torch LLM
    run on the spliced embeddings (head size 64 / 32: what TensorRT-LLM's kernels run).
    Tolerance: first logits within 5e-2 (fp16), 1e-1 (int8), 3e-1 (int4) x max|logits|; greedy tokens
    equal for fp16 and int8, at least the first for int4."""
    from runtime.backends.trtllm_backend import TrtLlmGenerator
    from runtime.generate import SamplingParams, TorchLLM, generate
    from runtime.prompt import splice_prompt_table

    model, spec = trt_source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float16", quantization=quantization)
    n_table = model.num_image_tokens + model.num_seg_tokens
    engine = tc.build_engine(ckpt, tmp_path / "engine", max_batch=2, max_input_len=64, max_output_len=8,
                             max_prompt_embedding_table_size=tc.prompt_table_size(model, 2), progress=lambda *_: None)
    torch.manual_seed(5)
    d = model.llm.config.hidden_size
    tables = 0.02 * torch.randn(2, n_table, d)
    prompts = [[5, 6] + list(range(model.vocab_size, model.vocab_size + n_table)) + [7, 8, 9],
               [11] + list(range(model.vocab_size, model.vocab_size + n_table)) + [12]]
    params = SamplingParams(max_new_tokens=6)
    llm = TorchLLM(model.llm)
    embeds = [splice_prompt_table(llm.embed, torch.tensor([p]), tables[i:i + 1], model.vocab_size)[0]
              for i, p in enumerate(prompts)]
    want = generate(llm, embeds, params)
    got = TrtLlmGenerator(engine).generate(prompts, tables, params)
    scale = want.first_logits.abs().max().item()
    tol = {None: 5e-2, "int8": 1e-1, "int4": 3e-1}[quantization]
    assert (got.first_logits - want.first_logits).abs().max().item() <= tol * scale
    if quantization == "int4":
        assert [t[:1] for t in got.tokens] == [t[:1] for t in want.tokens]
    else:
        assert got.tokens == want.tokens
