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


@pytest.fixture(scope="module", params=SPECS)
def source(request):
    return _model(request.param)


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


def test_build_command(tmp_path):
    cmd = tc.trtllm_build_command(tmp_path / "ck", tmp_path / "eng", max_batch=4, max_input_len=300,
                                  max_output_len=64, max_prompt_embedding_table_size=4 * 20)
    args = dict(zip(cmd[3::2], cmd[4::2]))
    assert cmd[1:3] == ["-m", "tensorrt_llm.commands.build"]
    assert args == {"--checkpoint_dir": str(tmp_path / "ck"), "--output_dir": str(tmp_path / "eng"),
                    "--max_batch_size": "4", "--max_input_len": "300", "--max_seq_len": "364",
                    "--max_prompt_embedding_table_size": "80", "--gemm_plugin": "auto"}
    with pytest.raises(ValueError, match="max_output_len"):
        tc.trtllm_build_command("a", "b", 1, 10, 0, 0)


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
def test_build_engine_says_what_to_install(fp32_ckpt, tmp_path):
    with pytest.raises(tc.TrtLlmError, match=r"TensorRT-LLM is not installed.*pip install tensorrt-llm.*container"):
        tc.build_engine(fp32_ckpt, tmp_path / "engine", max_batch=2, max_input_len=64, max_output_len=16,
                        max_prompt_embedding_table_size=8)
    with pytest.raises(tc.TrtLlmError, match="config.json is missing"):
        tc.build_engine(tmp_path / "nowhere", tmp_path / "engine", 1, 8, 8, 0)
    from runtime.backends.trtllm_backend import TrtLlmGenerator

    with pytest.raises(tc.TrtLlmError, match="TensorRT-LLM is not installed"):
        TrtLlmGenerator(tmp_path)


# ------------------------------------------------------- engine build and run (TensorRT-LLM + GPU)

@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_ENGINE_REASON), reason=NO_ENGINE_REASON)
def test_engine_with_prompt_table_matches_torch(source, tmp_path):
    """Build the fp16 engine, feed a prompt whose ids >= vocab_size index a per-request prompt table,
    compare greedy tokens and first-step logits with the torch LLM run on the spliced embeddings.
    Tolerance: fp16 engine vs fp32 torch, first logits within 5e-2 * max|logits|; greedy tokens equal."""
    from runtime.backends.trtllm_backend import TrtLlmGenerator
    from runtime.generate import SamplingParams, TorchLLM, generate
    from runtime.prompt import splice_prompt_table

    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float16")
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
    assert got.tokens == want.tokens
    scale = want.first_logits.abs().max().item()
    assert (got.first_logits - want.first_logits).abs().max().item() <= 5e-2 * scale
