"""ONNX export and the onnxruntime backend against torch.

Every graph runs on fresh random inputs (other batch sizes and lengths than the ones it was traced
with) in a real onnxruntime session and is compared with the torch module it came from.
Tolerance, fp32 throughout: max |ort - torch| <= 1e-4 x max |torch| (relative to the output's
scale). The parser's uint8 labels are an argmax, compared exactly (ties at random weights are
allowed on at most 0.1% of pixels). Greedy generation must give the same tokens.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.build import Progress, build_engines
from runtime.checkpoint import load_checkpoint
from runtime.engines import open_components, open_pipeline
from runtime.manifest import EngineError
from runtime.generate import SamplingParams, TorchLLM, generate
from runtime.pipeline import FacePipeline

REL = 1e-4


def assert_rel_close(actual, expected, rel=REL, what=""):
    actual = torch.as_tensor(actual).float()
    expected = torch.as_tensor(expected).float()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rel * max(scale, 1e-6), f"{what}: max abs error {err:.3g} over {rel} x scale {scale:.3g}"


def _build(checkpoint, out):
    return build_engines(checkpoint, "onnxruntime", out, progress=Progress(0, quiet=True))


@pytest.fixture(scope="session")
def tiny_facellm_engines(tiny_facellm_checkpoint, tmp_path_factory):
    return _build(tiny_facellm_checkpoint, tmp_path_factory.mktemp("engines") / "tiny-facellm")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)[0]


@pytest.fixture(scope="session")
def tiny_facellm_model(tiny_facellm_checkpoint):
    return load_checkpoint(tiny_facellm_checkpoint)[0]


@pytest.fixture(scope="session")
def tiny_ort(tiny_engines):
    return open_components(tiny_engines)


@pytest.fixture(scope="session")
def tiny_facellm_ort(tiny_facellm_engines):
    return open_components(tiny_facellm_engines)


def test_graphs_are_checker_clean_opset17_with_dynamic_batch(tiny_engines):
    import json

    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    graphs = {k: v for k, v in manifest["components"].items() if v["kind"] == "onnx"}
    assert set(graphs) == {"vision", "parser", "seg", "attributes", "llm_prefill", "llm_decode"}
    for name, entry in graphs.items():
        path = tiny_engines / entry["file"]
        onnx.checker.check_model(str(path))  # by path: follows the external data of the LLM graphs
        model = onnx.load(str(path), load_external_data=False)
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        for tensor in entry["inputs"] + entry["outputs"]:
            if tensor["shape"]:  # not a scalar (the in-place decode graph's total_sequence_length)
                assert tensor["shape"][0] == "batch", f"{name}.{tensor['name']} has a static batch axis"
        assert entry["simplify"]["nodes_after"] <= entry["simplify"]["nodes_before"]
    for name in ("llm_prefill", "llm_decode"):
        assert "seq" in graphs[name]["inputs"][0]["shape"]
    assert graphs["llm_prefill"]["data_files"] == graphs["llm_decode"]["data_files"] == ["llm.onnx.data"]


def test_onnxruntime_graphs_fuse_rope_and_residual_rms_norms(tiny_engines, tiny_checkpoint):
    """For onnxruntime each layer's q*cos + (q @ rotate)*sin is one com.microsoft.RotaryEmbedding over
    cos/sin tables of every position, and each residual add with the RMSNorm of its sum one
    SkipSimplifiedLayerNormalization (all but the first layer's input norm: 2 L - 1); the parity tests
    in this file run those graphs against torch. A RoPE not of that form is left as it is."""
    import json

    from export.onnx_export import KVCacheLLM, LLMPrefillGraph, _trace, fuse_rotary_embedding

    manifest = json.loads((tiny_engines / "manifest.json").read_text())
    layout = manifest["model"]["llm"]
    for name in ("llm_prefill", "llm_decode"):
        graph = onnx.load(str(tiny_engines / f"{name}.onnx"), load_external_data=False)
        # the decode graph's RoPE is inside its GroupQueryAttention nodes (test_in_place_decode_graph...)
        rope_op = "RotaryEmbedding" if name == "llm_prefill" else "GroupQueryAttention"
        rotary = [n for n in graph.graph.node if n.op_type == rope_op]
        assert len(rotary) == layout["num_layers"]
        assert manifest["components"][name]["rotary_embedding_nodes"] == (len(rotary) if name == "llm_prefill" else 0)
        assert all(n.domain == "com.microsoft" and "position_ids" in n.input for n in rotary)
        tables = {t.name.split(".")[-1]: list(t.dims) for t in graph.graph.initializer if "rope_" in t.name}
        shape = [layout["max_position_embeddings"], layout["head_dim"] // 2]
        assert tables == {"rope_cos_cache": shape, "rope_sin_cache": shape}
        assert not any(n.op_type in ("Cos", "Sin") for n in graph.graph.node)
        skip = [n for n in graph.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
        assert len(skip) == 2 * layout["num_layers"] - 1 == manifest["components"][name]["skip_rms_norm_nodes"]

    core = KVCacheLLM(load_checkpoint(tiny_checkpoint)[0].llm).eval()  # takes over its weights: a fresh load
    embeds, mask = torch.randn(1, 3, core.lm.config.hidden_size), torch.ones(1, 3, dtype=torch.long)
    graph, weights = _trace(LLMPrefillGraph(core), (embeds, mask, mask.cumsum(1) - 1),
                            ["inputs_embeds", "attention_mask", "position_ids"], ["logits"], None)
    rotate = next(n for n in graph.graph.node if n.op_type == "MatMul" and n.input[1] in weights
                  and torch.equal(weights[n.input[1]], core.rotate))
    altered = onnx.ModelProto()
    altered.CopyFrom(graph)
    times_sin = next(n for n in altered.graph.node if rotate.output[0] in n.input)
    next(n for n in altered.graph.node if times_sin.output[0] in n.input).op_type = "Sub"  # q*cos - (q@R)*sin
    assert fuse_rotary_embedding(altered, dict(weights), core) == 0
    assert not any(n.op_type == "RotaryEmbedding" for n in altered.graph.node)
    assert fuse_rotary_embedding(graph, weights, core) == layout["num_layers"]


def test_in_place_decode_graph_where_onnxruntime_allows_it(tiny_engines, tiny_facellm_engines):
    """onnxruntime's decode graph: one GroupQueryAttention a layer, the cache buffers its K/V inputs and
    outputs both (bound to one address, written in place), for head sizes its CPU kernel takes (a
    multiple of 16: the tiny Llama's 16); the tiny Qwen2's 12 keeps the plain attention graph. The
    parity tests above run both against transformers."""
    import json

    from export.onnx_export import GQA_HEAD_DIM_MULTIPLE
    from runtime.manifest import IN_PLACE_DECODE_INPUTS

    for engines, in_place in ((tiny_engines, True), (tiny_facellm_engines, False)):
        manifest = json.loads((engines / "manifest.json").read_text())
        layout, decode = manifest["model"]["llm"], manifest["components"]["llm_decode"]
        assert (layout["head_dim"] % GQA_HEAD_DIM_MULTIPLE == 0) == in_place
        graph = onnx.load(str(engines / "llm_decode.onnx"), load_external_data=False)
        attention = [n for n in graph.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(attention) == decode["group_query_attention_nodes"] == (layout["num_layers"] if in_place else 0)
        inputs = {t["name"]: t["shape"] for t in decode["inputs"]}
        outputs = {t["name"]: t["shape"] for t in decode["outputs"]}
        assert all(name in inputs for name in IN_PLACE_DECODE_INPUTS) == in_place
        assert ("attention_mask" in inputs) != in_place
        if in_place:
            assert inputs["past_key_0"] == outputs["present_key_0"] == ["batch", layout["num_kv_heads"], "capacity",
                                                                       layout["head_dim"]]
            assert [list(n.input[3:5]) for n in attention] == [[f"past_key_{i}", f"past_value_{i}"]
                                                               for i in range(layout["num_layers"])]
            assert [dict((a.name, a.i) for a in n.attribute if a.name in ("do_rotary", "num_heads", "kv_num_heads"))
                    for n in attention][0] == {"do_rotary": 1, "num_heads": layout["num_heads"],
                                               "kv_num_heads": layout["num_kv_heads"]}


def test_an_in_place_decode_graph_keeps_the_llm_on_the_cpu_provider(tiny_engines, tiny_facellm_engines):
    """With GPU providers asked for, the LLM graphs of a folder whose decode graph is the in-place one run
    on the CPU provider (its fp32 GroupQueryAttention has no CUDA kernel), with a warning; a plain decode
    graph keeps the providers asked for, and CPU-only stays as it is, silently."""
    import json
    import warnings

    from runtime.backends.onnxruntime_backend import providers_for_llm

    gpu = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    in_place = json.loads((tiny_engines / "manifest.json").read_text())["components"]["llm_decode"]
    plain = json.loads((tiny_facellm_engines / "manifest.json").read_text())["components"]["llm_decode"]
    with pytest.warns(UserWarning, match="LLM runs on the CPU"):
        assert providers_for_llm(in_place, gpu) == ["CPUExecutionProvider"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert providers_for_llm(plain, gpu) == gpu
        assert providers_for_llm(in_place, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def test_llm_weights_are_stored_once(tiny_engines, tiny_model):
    params = sum(p.numel() * 4 for p in tiny_model.llm.parameters())
    data = (tiny_engines / "llm.onnx.data").stat().st_size
    # both graphs point into one file: about one copy of the weights (alignment padding, small
    # tensors kept inline and folded constants aside), not two
    assert 0.5 * params < data < 1.3 * params


@pytest.mark.parametrize("which", ["tiny", "tiny-facellm"])
def test_vision_parity(which, tiny_ort, tiny_model, tiny_facellm_ort, tiny_facellm_model):
    """CLIP + LLaVA projector, and InternViT + pixel-unshuffle + InternVL projector."""
    ort_c, model = (tiny_ort, tiny_model) if which == "tiny" else (tiny_facellm_ort, tiny_facellm_model)
    g = torch.Generator().manual_seed(11)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens, pooled = ort_c.encode_image(pixels.numpy())
    with torch.no_grad():
        ref_tokens, ref_pooled = model.encode_image(pixels)
    assert_rel_close(tokens, ref_tokens, what="image_tokens")
    assert_rel_close(pooled, ref_pooled, what="pooled")


def test_parser_parity(tiny_ort, tiny_model):
    g = torch.Generator().manual_seed(12)
    pixels = torch.randn(3, 3, 64, 64, generator=g)
    labels = tiny_ort.parse_face(pixels.numpy())
    with torch.no_grad():
        ref = tiny_model.parse_face(pixels)
    assert labels.dtype == torch.uint8 and labels.shape == ref.shape
    assert (labels == ref).float().mean().item() >= 0.999
    assert len(torch.unique(ref)) > 1  # a label map with several classes, so the comparison means something


def test_seg_parity_and_label_validation(tiny_ort, tiny_model):
    g = torch.Generator().manual_seed(13)
    labels = torch.randint(0, 19, (3, 32, 32), generator=g, dtype=torch.uint8)
    tokens = tiny_ort.seg_tokens(labels)
    with torch.no_grad():
        ref = tiny_model.seg.reference(labels)
    assert_rel_close(tokens, ref, what="seg_tokens")
    with pytest.raises(ValueError, match="outside"):
        tiny_ort.seg_tokens(torch.full((1, 32, 32), 19, dtype=torch.uint8))


def test_attribute_parity(tiny_ort, tiny_model):
    g = torch.Generator().manual_seed(14)
    pooled = torch.randn(5, 32, generator=g)
    probs = tiny_ort.attributes(pooled)
    with torch.no_grad():
        ref = tiny_model.attributes(pooled)
    assert probs.shape == (5, 40)
    assert_rel_close(probs, ref, what="probs")


def _random_prompt(hidden, batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, hidden, generator=g) * 0.5
    mask = torch.ones(batch, length, dtype=torch.long)
    for i in range(1, batch):
        mask[i, : 2 * i] = 0  # left padding of different lengths
    return embeds, mask, (mask.cumsum(1) - 1).clamp(min=0)


@pytest.mark.parametrize("which", ["tiny", "tiny-facellm"])
def test_llm_prefill_and_decode_parity(which, tiny_ort, tiny_model, tiny_facellm_ort, tiny_facellm_model):
    """Prefill logits and K/V, then decode steps of 1 and 3 tokens, against transformers with its cache."""
    ort_c, model = (tiny_ort, tiny_model) if which == "tiny" else (tiny_facellm_ort, tiny_facellm_model)
    llm, hf = ort_c.llm, model.llm
    embeds, mask, pos = _random_prompt(hf.config.hidden_size, batch=3, length=9, seed=21)
    max_len = 9 + 4
    cache = llm.new_cache(3, max_len)
    full_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    logits = llm.forward(embeds, full_mask, pos, cache, torch.arange(9))
    with torch.no_grad():
        ref = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos, use_cache=True)
    valid = mask.bool()
    assert_rel_close(logits, ref.logits[:, -1], what="prefill logits")
    for i in (0, hf.config.num_hidden_layers - 1):
        ref_k = ref.past_key_values.layers[i].keys
        assert_rel_close(cache.keys[i][:, :, :9][..., valid[0], :][0], ref_k[0], what=f"layer {i} keys")
        assert_rel_close(cache.values[i][0, :, :9], ref.past_key_values.layers[i].values[0], what=f"layer {i} values")

    hf_cache, hf_mask, next_pos = ref.past_key_values, mask, pos[:, -1:] + 1
    start = 9
    for s in (1, 3):
        g = torch.Generator().manual_seed(30 + s)
        step = torch.randn(3, s, hf.config.hidden_size, generator=g) * 0.5
        step_pos = next_pos + torch.arange(s)
        full_mask[:, start:start + s] = 1
        logits = llm.forward(step, full_mask, step_pos, cache, torch.arange(start, start + s))
        hf_mask = torch.cat([hf_mask, torch.ones(3, s, dtype=torch.long)], dim=1)
        with torch.no_grad():
            ref = hf(inputs_embeds=step, attention_mask=hf_mask, position_ids=step_pos, past_key_values=hf_cache,
                     use_cache=True)
        assert_rel_close(logits, ref.logits[:, -1], what=f"decode logits ({s} tokens)")
        start += s
        next_pos = step_pos[:, -1:] + 1
    last = hf.config.num_hidden_layers - 1
    assert_rel_close(cache.keys[last][0], hf_cache.layers[last].keys[0], what="cache after decode")


def test_decode_step_reads_the_cache_in_place(tiny_ort):
    """The one-token decode step is bound once to the cache buffers: no cache is copied or reallocated."""
    llm = tiny_ort.llm
    embeds, mask, pos = _random_prompt(64, batch=2, length=6, seed=3)
    cache = llm.new_cache(2, 10)
    addresses = [t.data_ptr() for t in cache.keys + cache.values]
    full = torch.cat([mask, torch.zeros(2, 4, dtype=torch.long)], dim=1)
    llm.forward(embeds, full, pos, cache, torch.arange(6))
    bindings = []
    for step in range(3):
        full[:, 6 + step] = 1
        llm.forward(torch.randn(2, 1, 64), full, pos[:, -1:] + 1 + step, cache, torch.tensor([6 + step]))
        bindings.append(cache.row_bindings[0, 2])
    assert llm.in_place and len(cache.row_bindings) == 1 and all(b is bindings[0] for b in bindings)
    assert [t.data_ptr() for t in cache.keys + cache.values] == addresses
    assert cache.keys[0][:, :, 6:9].abs().sum() > 0 and cache.keys[0][:, :, 9:].abs().sum() == 0


def test_llm_refuses_a_cache_overflow(tiny_ort):
    llm = tiny_ort.llm
    cache = llm.new_cache(1, 4)
    with pytest.raises(ValueError, match="past the cache"):
        llm.forward(torch.zeros(1, 5, 64), torch.ones(1, 5, dtype=torch.long), torch.arange(5)[None], cache,
                    torch.arange(5))
    with pytest.raises(ValueError, match="context"):
        llm.new_cache(1, 10_000)


@pytest.mark.parametrize("which", ["tiny", "tiny-facellm"])
def test_greedy_generation_matches_torch(which, tiny_ort, tiny_model, tiny_facellm_ort, tiny_facellm_model):
    """The generation loop on random prompts (batched, left padded): same tokens, cache or not."""
    ort_c, model = (tiny_ort, tiny_model) if which == "tiny" else (tiny_facellm_ort, tiny_facellm_model)
    torch_llm = TorchLLM(model.llm)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randn(n, model.llm.config.hidden_size, generator=g) * 0.5 for n in (7, 12, 4)]
    params = SamplingParams(max_new_tokens=10)
    ours = generate(ort_c.llm, prompts, params)
    ref = generate(torch_llm, prompts, params)
    assert ours.tokens == ref.tokens
    assert len(set(map(tuple, ref.tokens))) > 1  # the prompts lead to different answers
    no_cache = generate(ort_c.llm, prompts, params, use_cache=False)
    assert no_cache.tokens == ref.tokens
    assert_rel_close(ours.first_logits, ref.first_logits, what="first logits")


def test_pipeline_answers_match_torch(tiny_engines, tiny_checkpoint, face_images):
    """FacePipeline over the engines folder == FacePipeline over the checkpoint, several image/question pairs."""
    ort_pipe = open_pipeline(tiny_engines)
    torch_pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    questions = ["Is this person smiling?", "What colour is the hair?", "Describe the face."]
    params = SamplingParams(max_new_tokens=12)
    ours = ort_pipe.ask_batch(face_images, questions, params)
    ref = torch_pipe.ask_batch(face_images, questions, params)
    for a, b in zip(ours, ref):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        assert a.constraints_fired == b.constraints_fired
        assert_rel_close(list(a.attributes_raw.values()), list(b.attributes_raw.values()), what="attributes")
    one = ort_pipe.ask(face_images[1], questions[1], params)
    assert one.token_ids == ref[1].token_ids  # alone or batched: the same answer


def test_facellm_pipeline_matches_torch(tiny_facellm_engines, tiny_facellm_checkpoint, face_images):
    ort_pipe = open_pipeline(tiny_facellm_engines)
    torch_pipe = FacePipeline.from_checkpoint(tiny_facellm_checkpoint)
    params = SamplingParams(max_new_tokens=8)
    for image, q in zip(face_images[:2], ["Who is this?", "How old is this person?"]):
        assert ort_pipe.ask(image, q, params).token_ids == torch_pipe.ask(image, q, params).token_ids


def _spin_entries(options) -> tuple[str, str]:
    """(allow_spinning, force_spinning_stop or "" where unset) of a SessionOptions."""
    def entry(key: str) -> str:
        try:
            return options.get_session_config_entry(key)
        except Exception:  # onnxruntime raises its own Fail where a key is unset
            return ""
    return entry("session.intra_op.allow_spinning"), entry("session.force_spinning_stop")


def test_only_the_decode_graph_spins_and_only_while_it_runs(tiny_engines, monkeypatch):
    from runtime.backends.onnxruntime_backend import session_options

    monkeypatch.delenv("FACERT_ORT_SPIN", raising=False)
    comps = open_components(tiny_engines, intra_op_threads=1)
    spins = {name: _spin_entries(g.session.get_session_options()) for name, g in comps.graphs.items()}
    assert spins.pop("llm_decode") == ("1", "1")  # spinning, stopped when a step returns
    assert spins and all(entries == ("0", "") for entries in spins.values()), spins
    served = open_components(tiny_engines, intra_op_threads=1, spin_decode=False)  # what the served steps open
    assert {_spin_entries(g.session.get_session_options()) for g in served.graphs.values()} == {("0", "")}
    monkeypatch.setenv("FACERT_ORT_SPIN", "0")  # a shared machine: every worker sleeps
    assert _spin_entries(session_options(1, hot_loop=True)) == ("0", "")
    monkeypatch.setenv("FACERT_ORT_SPIN", "1")
    assert _spin_entries(session_options(1)) == ("1", "1")
    monkeypatch.setenv("FACERT_ORT_SPIN", "yes")
    with pytest.raises(EngineError, match="FACERT_ORT_SPIN='yes'"):
        session_options(1)


def test_onnxruntime_threads_and_providers(tiny_engines):
    from runtime.backends.onnxruntime_backend import choose_providers, session_options

    assert choose_providers("cpu") == ["CPUExecutionProvider"]
    options = session_options(1)
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    comps = open_components(tiny_engines, intra_op_threads=1)
    assert comps.providers == ["CPUExecutionProvider"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ValueError, match="onnxruntime-gpu"):
            choose_providers("cuda")
        assert choose_providers("auto") == ["CPUExecutionProvider"]


@pytest.mark.slow
def test_demo_greedy_tokens_match_torch(demo_checkpoint, demo_engines, face_images):
    """The real SmolLM2-135M: onnxruntime and torch give the same greedy answers on several pairs."""
    ort_pipe = open_pipeline(demo_engines)
    torch_pipe = FacePipeline.from_checkpoint(demo_checkpoint)
    questions = ["Is this person smiling?", "What is this person wearing?", "Describe the hair."]
    params = SamplingParams(max_new_tokens=16)
    for image, question in zip(face_images, questions):
        ours = ort_pipe.ask(image, question, params)
        ref = torch_pipe.ask(image, question, params)
        assert ours.token_ids == ref.token_ids, (question, ours.text, ref.text)
        assert_rel_close(ours.first_logits, ref.first_logits, rel=1e-4, what="first logits")
    assert np.isfinite(ours.timings["decode_tokens_per_s"])


@pytest.mark.parametrize("s", [1, 3])
def test_group_query_attention_node_matches_its_torch_reference(tmp_path, s):
    """The GroupQueryAttention node facert exports, run by onnxruntime on a cache bound as its past and
    present both, against GroupQueryAttention.forward (the torch reference the export traces): rows at
    different fill levels, a padded position masked by the bias, fresh random inputs; fp32, 1e-4."""
    import onnxruntime as ort

    from export.onnx_export import GroupQueryAttention
    from runtime.backends.onnxruntime_backend import NUMPY_TYPES

    heads, kv_heads, hd, capacity, positions = 4, 2, 16, 12, 32

    class Attention(torch.nn.Module):
        def forward(self, qkv, past_key, past_value, seqlens_k, total, cos, sin, position_ids, bias, query_seqlens):
            return GroupQueryAttention.apply(qkv, past_key, past_value, seqlens_k, total, cos, sin, position_ids,
                                             bias, query_seqlens, heads, kv_heads)

    g = torch.Generator().manual_seed(40 + s)
    starts = torch.tensor([2, 7])
    freqs = torch.arange(positions)[:, None] * torch.rand(hd // 2, generator=g)[None]
    feeds = {"qkv": torch.randn(2, s, (heads + 2 * kv_heads) * hd, generator=g),
             "past_key": torch.randn(2, kv_heads, capacity, hd, generator=g),
             "past_value": torch.randn(2, kv_heads, capacity, hd, generator=g),
             "seqlens_k": (starts + s - 1).int(), "total": torch.tensor(capacity, dtype=torch.int32),
             "cos": freqs.cos(), "sin": freqs.sin(), "position_ids": starts[:, None] + torch.arange(s) + 3,
             "bias": torch.zeros(2, 1, s, capacity), "query_seqlens": torch.full((2,), s, dtype=torch.int32)}
    feeds["bias"][1, :, :, 4] = torch.finfo(torch.float32).min  # row 1's position 4 is padding
    names = list(feeds)
    out, key, value = Attention()(*feeds.values())
    past_key = feeds["past_key"].clone()
    path = tmp_path / "gqa.onnx"
    torch.onnx.export(Attention(), tuple(feeds.values()), str(path), dynamo=False, opset_version=17,
                      input_names=names, output_names=["out", "present_key", "present_value"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(path)).graph.node] == ["GroupQueryAttention"]
    binding = session.io_binding()
    got = torch.empty_like(out)
    for name, t in feeds.items():
        binding.bind_input(name, "cpu", 0, NUMPY_TYPES[t.dtype], list(t.shape), t.contiguous().data_ptr())
    for name, t in (("out", got), ("present_key", feeds["past_key"]), ("present_value", feeds["past_value"])):
        binding.bind_output(name, "cpu", 0, np.float32, list(t.shape), t.data_ptr())  # the cache, in place
    session.run_with_iobinding(binding)
    assert_rel_close(got, out, rel=1e-4, what="attention")
    assert_rel_close(feeds["past_key"], key, rel=1e-4, what="keys written in place")
    assert_rel_close(feeds["past_value"], value, rel=1e-4, what="values written in place")
    for row, start in enumerate(starts.tolist()):  # each row's new rows at its own place, nothing else moved
        kept = torch.ones(capacity, dtype=torch.bool)
        kept[start:start + s] = False
        assert torch.equal(feeds["past_key"][row, :, kept], past_key[row, :, kept])
        assert not torch.equal(feeds["past_key"][row, :, ~kept], past_key[row, :, ~kept])
