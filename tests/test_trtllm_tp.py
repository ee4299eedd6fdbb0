"""Tensor- and pipeline-parallel TensorRT-LLM checkpoints (`facert build --backend tensorrt-llm --tp N --pp M`).

What runs here (no TensorRT-LLM, no GPU needed):
- the rank files, concatenated back (merge_shards), are the unsplit checkpoint exactly, for tp 2 and 4;
- every rank's slice is the one TensorRT-LLM's convert code takes, written out here from the torch
  LLM's own q/k/v/o/gate/up/down weights (head blocks, repeated KV heads, padded vocabulary);
- the LLM rebuilt from the split checkpoint alone (config.json + ranks) gives the torch logits;
- a tensor-parallel forward pass that uses each rank's weights only as TensorRT-LLM's layers do
  (column-parallel qkv / fc / gate / lm_head, row-parallel dense / proj summed over the ranks) gives
  the torch logits: the split is one the engine can compute with, not just one that inverts;
- config.json's mapping, per-rank shapes, pipeline stages, refusals of splits TensorRT-LLM cannot do.

Tolerances: fp32 checkpoints; merged weights bit-exact; logits of the rebuilt LLM atol 1e-5; the
tensor-parallel forward (float64 from the fp32 weights) against the fp32 torch LLM, atol 1e-4.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from export import trtllm_convert as tc
from test_trtllm_convert import _logits, _model

SPECS = ("tiny", "tiny-facellm")  # LLaMA and Qwen2 (q/k/v biases); both 4 heads, 2 KV heads


@pytest.fixture(scope="module", params=SPECS)
def source(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def unsplit(source, tmp_path_factory):
    """The tp = pp = 1 checkpoint's tensors: what the split ones must merge back to."""
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path_factory.mktemp("tp1") / "ck", dtype="float32")
    return load_file(str(ckpt / "rank0.safetensors"))


def _ranks(ckpt) -> tuple[dict, list[dict]]:
    config = json.loads((ckpt / "config.json").read_text())
    return config, [load_file(str(ckpt / f"rank{r}.safetensors")) for r in range(config["mapping"]["world_size"])]


def _assert_same_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want), f"missing {set(want) - set(got)}, extra {set(got) - set(want)}"
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


# ------------------------------------------------------------------------- tensor parallelism

@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_merge_back_exactly(source, unsplit, tmp_path, tp):
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=tp)
    config, ranks = _ranks(ckpt)
    assert config["mapping"] == {"world_size": tp, "tp_size": tp, "pp_size": 1}
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json"] + [f"rank{r}.safetensors" for r in range(tp)]
    for r, w in enumerate(ranks):  # per-rank names and shapes are what a reader of config.json expects
        assert {k: tuple(v.shape) for k, v in w.items()} == {k: s for k, (s, _) in tc.expected_tensors(config, r).items()}
    _assert_same_tensors(tc.merge_shards(config, ranks), unsplit)
    _assert_same_tensors(tc.read_checkpoint(ckpt)[1], unsplit)


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_slices_are_tensorrt_llm_s(source, tmp_path, tp):
    """Each rank's slice, written out from the torch LLM: q heads [r*H/tp, (r+1)*H/tp); KV heads in
    blocks of KV/tp, or, with fewer KV heads than ranks (tp 4, 2 KV heads), KV head r // (tp/KV)
    repeated; o_proj's and down_proj's matching input columns; gate/up's output rows; lm_head's rows."""
    model, spec = source
    config, ranks = _ranks(tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=tp))
    c = model.llm.config
    d = c.hidden_size // c.num_attention_heads
    hq, kv = c.num_attention_heads // tp, c.num_key_value_heads
    for r, w in enumerate(ranks):
        kv_heads = list(range(r * kv // tp, (r + 1) * kv // tp)) if kv >= tp else [r // (tp // kv)]
        q_rows = slice(r * hq * d, (r + 1) * hq * d)
        kv_rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in kv_heads])
        f_rows = slice(r * c.intermediate_size // tp, (r + 1) * c.intermediate_size // tp)
        for i, layer in enumerate(model.llm.model.layers):
            att, mlp, p = layer.self_attn, layer.mlp, f"transformer.layers.{i}."
            for kind in ("weight", "bias"):
                if getattr(att.q_proj, kind) is None:
                    assert p + f"attention.qkv.{kind}" not in w
                    continue
                want = torch.cat([getattr(att.q_proj, kind)[q_rows], getattr(att.k_proj, kind)[kv_rows],
                                  getattr(att.v_proj, kind)[kv_rows]])
                assert torch.equal(w[p + f"attention.qkv.{kind}"], want), (r, i, kind)
            assert torch.equal(w[p + "attention.dense.weight"], att.o_proj.weight[:, q_rows])
            assert torch.equal(w[p + "mlp.fc.weight"], mlp.gate_proj.weight[f_rows])
            assert torch.equal(w[p + "mlp.gate.weight"], mlp.up_proj.weight[f_rows])
            assert torch.equal(w[p + "mlp.proj.weight"], mlp.down_proj.weight[:, f_rows])
            assert torch.equal(w[p + "input_layernorm.weight"], layer.input_layernorm.weight)
        v = c.vocab_size // tp
        assert torch.equal(w["lm_head.weight"], model.llm.get_output_embeddings().weight[r * v:(r + 1) * v])
        assert torch.equal(w["transformer.vocab_embedding.weight"], model.llm.model.embed_tokens.weight)


@pytest.mark.parametrize("tp", [2, 4])
def test_llm_rebuilt_from_split_checkpoint_gives_torch_logits(source, tmp_path, tp):
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=tp)
    torch.manual_seed(3)
    ids = torch.randint(0, model.vocab_size, (2, 13))
    torch.testing.assert_close(_logits(tc.reference_llm(ckpt), ids), _logits(model.llm, ids), atol=1e-5, rtol=0)


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, base):
    """Rotary embedding as TensorRT-LLM's rope_gpt_neox (rotate-half), positions 0..T-1; x is (heads, T, d)."""
    d = x.shape[-1]
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * inv
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def tensor_parallel_logits(config: dict, ranks: list[dict], ids: torch.Tensor) -> torch.Tensor:
    """Logits of one sequence computed the way a tp-rank TensorRT-LLM engine computes them (pp = 1):
    every rank applies its column-parallel qkv / fc / gate to the whole hidden state and its
    row-parallel dense / proj to its own slice; the ranks' partial outputs are summed (the
    all-reduce); lm_head's per-rank logits are concatenated (the all-gather) and the padding dropped.
    float64 throughout, so what remains is the split, not rounding."""
    tp, d = config["mapping"]["tp_size"], config["head_size"]
    hq = config["num_attention_heads"] // tp
    hk = max(config["num_key_value_heads"] // tp, 1)
    eps, base = config["norm_epsilon"], config["rotary_base"]
    w = [{k: v.double() for k, v in r.items()} for r in ranks]
    x = w[0]["transformer.vocab_embedding.weight"][ids]
    n = len(ids)
    causal = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.layers.{i}."
        h = _rms(x, w[0][p + "input_layernorm.weight"], eps)
        attn = 0
        for rank in w:
            qkv = h @ rank[p + "attention.qkv.weight"].T + rank.get(p + "attention.qkv.bias", 0)
            q, k, v = torch.split(qkv, [hq * d, hk * d, hk * d], dim=-1)
            q, k, v = (t.reshape(n, -1, d).transpose(0, 1) for t in (q, k, v))
            q, k = _rope(q, base), _rope(k, base)
            k, v = k.repeat_interleave(hq // hk, 0), v.repeat_interleave(hq // hk, 0)
            scores = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1)
            attn = attn + (scores @ v).transpose(0, 1).reshape(n, hq * d) @ rank[p + "attention.dense.weight"].T
        x = x + attn + w[0].get(p + "attention.dense.bias", 0)  # the bias once, after the sum
        h = _rms(x, w[0][p + "post_layernorm.weight"], eps)
        x = x + sum((torch.nn.functional.silu(h @ r[p + "mlp.fc.weight"].T) * (h @ r[p + "mlp.gate.weight"].T))
                    @ r[p + "mlp.proj.weight"].T for r in w)
    h = _rms(x, w[0]["transformer.ln_f.weight"], eps)
    return torch.cat([h @ r["lm_head.weight"].T for r in w], dim=-1)[:, :config["vocab_size"]]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_forward_gives_torch_logits(source, tmp_path, tp):
    model, spec = source
    config, ranks = _ranks(tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=tp))
    torch.manual_seed(4)
    ids = torch.randint(0, model.vocab_size, (11,))
    want = _logits(model.llm, ids[None])[0].double()
    torch.testing.assert_close(tensor_parallel_logits(config, ranks, ids), want, atol=1e-4, rtol=0)


def test_tensor_parallel_forward_catches_a_wrong_split(source, tmp_path):
    """The forward check can fail: give rank 1 rank 0's KV rows (the mistake of not repeating KV heads
    per rank, or of repeating them in the wrong order)."""
    model, spec = source
    config, ranks = _ranks(tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=2))
    q_local = config["num_attention_heads"] // 2 * config["head_size"]
    w = ranks[1]["transformer.layers.0.attention.qkv.weight"]
    w[q_local:] = ranks[0]["transformer.layers.0.attention.qkv.weight"][q_local:]
    ids = torch.arange(9) % model.vocab_size
    err = (tensor_parallel_logits(config, ranks, ids) - _logits(model.llm, ids[None])[0].double()).abs().max()
    assert err > 1e-3


# ------------------------------------------------------- MHA, padded vocabulary, pipeline stages

class _Holder:
    def __init__(self, llm):
        self.llm = llm


def _llama(vocab: int, heads: int, kv_heads: int, layers: int = 2, hidden: int = 32, bias: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=48,
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=kv_heads, max_position_embeddings=64,
                                       tie_word_embeddings=False, attention_bias=bias)).eval()
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return llm


def test_mha_with_a_vocabulary_tp_does_not_divide(tmp_path):
    """LLaVA-1.5's LLaMA is multi-head (as many KV heads as heads); a vocabulary of 322 over tp 4 is
    padded with zero rows to 324 (TensorRT-LLM's pad_vocab_size), config.json keeps 322."""
    llm = _llama(vocab=322, heads=4, kv_heads=4)
    ckpt = tc.convert_checkpoint(_Holder(llm), {}, tmp_path / "ck", dtype="float32", tp_size=4)
    config, ranks = _ranks(ckpt)
    assert config["vocab_size"] == 322
    assert [tuple(w["lm_head.weight"].shape) for w in ranks] == [(81, 32)] * 4
    assert torch.equal(ranks[3]["lm_head.weight"][-2:], torch.zeros(2, 32))
    assert torch.equal(ranks[3]["lm_head.weight"][:-2], llm.lm_head.weight[243:])
    full = tc.read_checkpoint(ckpt)[1]
    assert full["lm_head.weight"].shape == (322, 32)
    ids = torch.arange(10) * 31 % 322
    want = _logits(llm, ids[None])
    torch.testing.assert_close(_logits(tc.reference_llm(ckpt), ids[None]), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tensor_parallel_logits(config, ranks, ids), want[0].double(), atol=1e-4, rtol=0)


def test_llama_with_attention_biases(tmp_path):
    """LLaMA with attention_bias: q/k/v biases split with their heads, o_proj's bias (attention.dense.bias)
    whole on every rank, added once after the ranks' outputs are summed (TensorRT-LLM's RowLinear)."""
    llm = _llama(vocab=64, heads=4, kv_heads=2, bias=True)
    ckpt = tc.convert_checkpoint(_Holder(llm), {}, tmp_path / "ck", dtype="float32", tp_size=4)
    config, ranks = _ranks(ckpt)
    for r, w in enumerate(ranks):
        assert torch.equal(w["transformer.layers.1.attention.dense.bias"], llm.model.layers[1].self_attn.o_proj.bias)
        assert {k: tuple(v.shape) for k, v in w.items()} == {k: s for k, (s, _) in tc.expected_tensors(config, r).items()}
    ids = torch.arange(12) * 5 % 64
    want = _logits(llm, ids[None])
    torch.testing.assert_close(_logits(tc.reference_llm(ckpt), ids[None]), want, atol=1e-5, rtol=0)
    torch.testing.assert_close(tensor_parallel_logits(config, ranks, ids), want[0].double(), atol=1e-4, rtol=0)


def test_pipeline_stages(source, unsplit, tmp_path):
    """tp 2 x pp 2 over the 2-layer LLM: ranks 0, 1 are stage 0 (embedding, layer 0), ranks 2, 3 stage 1
    (layer 1 renumbered 0, ln_f, lm_head); rank = pp_rank x tp + tp_rank."""
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=2, pp_size=2)
    config, ranks = _ranks(ckpt)
    assert config["mapping"] == {"world_size": 4, "tp_size": 2, "pp_size": 2}
    for r, w in enumerate(ranks):
        stage = r // 2
        assert ("transformer.vocab_embedding.weight" in w) == (stage == 0)
        assert ("lm_head.weight" in w) == ("transformer.ln_f.weight" in w) == (stage == 1)
        assert {k.split(".")[2] for k in w if k.startswith("transformer.layers.")} == {"0"}
        assert {k: tuple(v.shape) for k, v in w.items()} == {k: s for k, (s, _) in tc.expected_tensors(config, r).items()}
    layer1 = model.llm.model.layers[1]
    assert torch.equal(ranks[3]["transformer.layers.0.post_layernorm.weight"], layer1.post_attention_layernorm.weight)
    _assert_same_tensors(tc.read_checkpoint(ckpt)[1], unsplit)
    ids = torch.randint(0, model.vocab_size, (1, 9))
    torch.testing.assert_close(_logits(tc.reference_llm(ckpt), ids), _logits(model.llm, ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------- refusals

def test_splits_tensorrt_llm_cannot_do_are_refused(source, tmp_path):
    model, spec = source
    with pytest.raises(tc.TrtLlmError, match="4 attention heads do not split over tp=3"):
        tc.convert_checkpoint(model, spec, tmp_path / "a", tp_size=3)
    with pytest.raises(tc.TrtLlmError, match="2 layers do not split evenly over pp=3"):
        tc.convert_checkpoint(model, spec, tmp_path / "b", pp_size=3)
    with pytest.raises(tc.TrtLlmError, match="tp_size and pp_size must be integers >= 1"):
        tc.convert_checkpoint(model, spec, tmp_path / "c", tp_size=0)
    with pytest.raises(tc.TrtLlmError, match="KV heads cannot be repeated up to tp=3"):
        tc.convert_checkpoint(_Holder(_llama(vocab=64, heads=6, kv_heads=2, hidden=48)), {}, tmp_path / "d", tp_size=3)
    assert not any((tmp_path / n).exists() for n in "abcd")  # refused before anything is written


def test_a_missing_or_inconsistent_rank_is_refused(source, tmp_path):
    model, spec = source
    ckpt = tc.convert_checkpoint(model, spec, tmp_path / "ck", dtype="float32", tp_size=4)
    # with 2 KV heads over 4 ranks, ranks 0 and 1 hold copies of KV head 0: make them disagree
    config, ranks = _ranks(ckpt)
    w = ranks[1]
    q_local = config["num_attention_heads"] // 4 * config["head_size"]
    w["transformer.layers.0.attention.qkv.weight"][q_local] += 1.0
    save_file(w, str(ckpt / "rank1.safetensors"))
    with pytest.raises(tc.TrtLlmError, match="disagree"):
        tc.read_checkpoint(ckpt)
    (ckpt / "rank3.safetensors").unlink()
    with pytest.raises(tc.TrtLlmError, match=r"rank3.safetensors is missing \(world_size 4\)"):
        tc.read_checkpoint(ckpt)


def test_build_command_builds_ranks_in_parallel(tmp_path, monkeypatch):
    cmd = tc.trtllm_build_command(tmp_path / "ck", tmp_path / "eng", 4, 300, 64, 80, workers=4)
    assert cmd[cmd.index("--checkpoint_dir") + 1] == str(tmp_path / "ck")
    assert cmd[cmd.index("--workers") + 1] == "4"
    assert "--workers" not in tc.trtllm_build_command(tmp_path / "ck", tmp_path / "eng", 4, 300, 64, 80)
    monkeypatch.setenv("FACERT_TRTLLM_PYTHON", "/usr/bin/python3")  # NVIDIA's container: its own python
    assert tc.trtllm_build_command(tmp_path / "ck", tmp_path / "eng", 1, 8, 8, 0)[0] == "/usr/bin/python3"


def test_facert_build_refuses_tp_outside_tensorrt_llm(tiny_checkpoint, tmp_path):
    from export.build import build_engines
    from export.manifest import EngineError

    with pytest.raises(EngineError, match="--tp / --pp split the LLM over GPUs with TensorRT-LLM"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "e", tp_size=2)
    with pytest.raises(EngineError, match="--tp and --pp must be >= 1"):
        build_engines(tiny_checkpoint, "tensorrt-llm", tmp_path / "e", precision="fp16", pp_size=0)
    assert not (tmp_path / "e").exists()


def test_native_repository_for_a_multi_gpu_engine(tiny_checkpoint, tmp_path):
    """An engines folder whose TensorRT-LLM engine has 2 ranks (the manifest's mapping, as `facert build
    --tp 2` writes it): the tensorrt_llm model names GPUs 0,1 and the backend's worker binary, and
    `facert serve` reads the world size from the repository (it then runs the orchestrator mode)."""
    import shutil

    from export.build import Progress, build_engines
    from runtime.serving.native import EXECUTOR_WORKER
    from runtime.serving.repo import tensorrt_llm_world_size
    from runtime.serving.repo import fill_repository

    engines = build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "engines", progress=Progress(4, quiet=True))
    fill_repository(tmp_path / "portable", engines=engines)
    assert tensorrt_llm_world_size(tmp_path / "portable") == 1  # no tensorrt_llm model
    for world in (1, 2):
        trt = tmp_path / f"trtllm-{world}"
        shutil.copytree(engines, trt)
        manifest = json.loads((trt / "manifest.json").read_text())
        (trt / "llm_engine").mkdir()
        for r in range(world):
            (trt / "llm_engine" / f"rank{r}.engine").write_bytes(b"")
        manifest["components"]["llm"] = {
            "file": "llm_engine/rank0.engine", "kind": "tensorrt-llm-engine", "precision": "bf16",
            "data_files": [f"llm_engine/rank{r}.engine" for r in range(1, world)],
            "mapping": {"world_size": world, "tp_size": world, "pp_size": 1}}
        (trt / "manifest.json").write_text(json.dumps(manifest))
        repo = tmp_path / f"repo-{world}"
        params = fill_repository(repo, engines=trt, backend="tensorrt-llm", target="native")["tensorrt_llm"].parameters
        assert tensorrt_llm_world_size(repo) == world
        if world == 1:
            assert "gpu_device_ids" not in params and "executor_worker_path" not in params
        else:
            assert params["gpu_device_ids"].string_value == "0,1"
            assert params["executor_worker_path"].string_value == EXECUTOR_WORKER
