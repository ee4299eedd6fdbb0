"""TensorRT plans: what can be checked without TensorRT (profiles derived from the real ONNX export,
refusals, the not-installed message), and parity of the built plans against torch (needs TensorRT
and a CUDA GPU; skipped otherwise, with the reason).

Tolerances of the GPU tests: fp32 plans (TF32 off) within atol 1e-4 + rtol 1e-4 of torch fp32;
fp16 plans within 3e-2 * max|x|; greedy tokens through the whole pipeline equal torch's (fp32).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import tensorrt_build as tb
from export.onnx_export import export_onnx
from runtime.checkpoint import load_checkpoint
from runtime.file_hashes import sha256_file


def _trt_missing_reason() -> str:
    try:
        tb.require_tensorrt()
    except tb.TensorRTError:
        return "needs TensorRT (pip install 'tensorrt>=10.8,<11' on a machine with an NVIDIA GPU, or NVIDIA's TensorRT container)"
    return ""


TRT_MISSING = _trt_missing_reason()
GPU_REASON = ", ".join(r for r in (TRT_MISSING, "" if torch.cuda.is_available() else "needs a CUDA GPU") if r)
needs_trt_gpu = pytest.mark.skipif(bool(GPU_REASON), reason=GPU_REASON or "-")


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tok, _ = load_checkpoint(tiny_checkpoint)
    return model, tok


@pytest.fixture(scope="module")
def onnx_export(tiny, tiny_checkpoint, tmp_path_factory):
    """The tiny model's real ONNX export (unsimplified: same graphs' I/O, faster to make)."""
    model, _ = tiny
    out = tmp_path_factory.mktemp("onnx")
    comps = export_onnx(lambda parts: load_checkpoint(tiny_checkpoint, parts=parts)[0], out, simplify=False)
    return {"spec": model.spec, "components": comps}, out


def _close(got, want, atol=1e-4, rtol=1e-4):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- profiles (here)

def test_profiles_cover_every_graph_input(onnx_export):
    manifest, onnx_dir = onnx_export
    max_batch, max_seq = 8, 300
    graphs = {n: e for n, e in manifest["components"].items() if tb.is_graph(e)}
    assert set(graphs) == {"vision", "parser", "seg", "attributes", "llm_prefill", "llm_decode"}
    for name, entry in graphs.items():
        profile = tb.profile_shapes(entry, max_batch, max_seq)
        graph_inputs = {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param
                                 for d in i.type.tensor_type.shape.dim]
                        for i in onnx.load(str(onnx_dir / entry["file"]), load_external_data=False).graph.input}
        assert set(profile) == set(graph_inputs), name  # TensorRT needs a shape for every input
        for inp, dims in graph_inputs.items():
            p = profile[inp]
            for axis, dim in enumerate(dims):
                lo, opt, hi = p["min"][axis], p["opt"][axis], p["max"][axis]
                assert lo <= opt <= hi, (name, inp, axis)
                if isinstance(dim, int):
                    assert lo == opt == hi == dim
                elif dim == "batch":
                    assert (lo, hi) == (1, max_batch)
                elif dim == "past_plus_seq":
                    assert hi >= max_seq + 1  # a full cache buffer plus the new token
                else:
                    assert (lo, hi) == (1, max_seq), (name, inp, dim)
    decode = tb.profile_shapes(graphs["llm_decode"], max_batch, max_seq)
    prefill = tb.profile_shapes(graphs["llm_prefill"], max_batch, max_seq)
    assert decode["inputs_embeds"]["opt"][1] == 1  # a decode step feeds one token
    assert prefill["inputs_embeds"]["opt"][1] > 1


def test_default_max_seq_follows_the_model_and_is_capped():
    assert tb.default_max_seq({"spec": {"llm": {"max_position_embeddings": 512}}}) == 512
    assert tb.default_max_seq({"model": {"llm": {"max_position_embeddings": 32768}}}) == tb.DEFAULT_MAX_SEQ
    assert tb.default_max_seq({"model": {"llm": {"max_position_embeddings": 300}},
                               "spec": {"llm": "smollm2-135m-instruct"}}) == 300
    assert tb.default_max_seq({"spec": {"llm": "smollm2-135m-instruct"}}) == tb.DEFAULT_MAX_SEQ


# ---------------------------------------------------------------------------- refusals (here)

def test_build_plans_refuses_bad_requests(onnx_export, tmp_path):
    manifest, onnx_dir = onnx_export
    with pytest.raises(tb.TensorRTError, match="precision must be one of"):
        tb.build_plans(manifest, onnx_dir, tmp_path, "int4", 2)
    with pytest.raises(tb.TensorRTError, match="max_batch must be >= 1"):
        tb.build_plans(manifest, onnx_dir, tmp_path, "fp16", 0)
    with pytest.raises(tb.TensorRTError, match="no ONNX components"):
        tb.build_plans({"components": {}}, onnx_dir, tmp_path, "fp16", 2)
    with pytest.raises(tb.TensorRTError, match="vision.onnx is missing"):
        tb.build_plans(manifest, tmp_path, tmp_path / "out", "fp16", 2)
    broken = json.loads(json.dumps(manifest))
    broken["components"]["vision"]["inputs"] = "pixel_values"
    with pytest.raises(tb.TensorRTError, match="inputs must be a list"):
        tb.build_plans(broken, onnx_dir, tmp_path / "out", "fp16", 2)
    # fp8 without Q/DQ nodes is refused before TensorRT is even needed
    with pytest.raises(tb.TensorRTError, match="fp8 needs graphs with Q/DQ nodes.*vision"):
        tb.build_plans(manifest, onnx_dir, tmp_path / "out", "fp8", 2)


def test_qdq_graphs_are_recognised(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    zero = helper.make_tensor("z", TensorProto.INT8, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "qdq", [x], [y], initializer=[scale, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "qdq.onnx")
    relu = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y])
    onnx.save(helper.make_model(relu, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "plain.onnx")
    assert tb.has_qdq(tmp_path / "qdq.onnx") and not tb.has_qdq(tmp_path / "plain.onnx")


@pytest.mark.skipif(not TRT_MISSING, reason="TensorRT is installed: the not-installed message cannot be shown")
def test_missing_tensorrt_says_what_to_install(onnx_export, tmp_path):
    from runtime.backends.tensorrt_backend import TensorRTComponents

    manifest, onnx_dir = onnx_export
    pattern = r"TensorRT is not available.*pip install 'tensorrt>=10.8,<11'.*TensorRT container"
    with pytest.raises(tb.TensorRTError, match=pattern):
        tb.build_plans(manifest, onnx_dir, tmp_path, "fp16", 2)
    with pytest.raises(tb.TensorRTError, match=pattern):
        TensorRTComponents(tmp_path, manifest)


class _OrtInPlaceOfPlan:
    """The same ONNX graph run by onnxruntime, behind the slice of TrtEngine that TrtLLM uses
    (call with named torch tensors -> dict of torch tensors, dtypes, declared shapes). It lets the
    KV-cache and mask handling of TrtLLM run here, on CPU, on the real exported graphs."""

    TORCH = {"float32": torch.float32, "int64": torch.int64}

    def __init__(self, path, entry):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.engine = self
        self.profiles = {}
        self.io = {s["name"]: s for s in entry["inputs"] + entry["outputs"]}
        self.outputs = [s["name"] for s in entry["outputs"]]
        self.dtypes = {n: self.TORCH[s["dtype"]] for n, s in self.io.items()}

    def get_tensor_shape(self, name):
        return [d if isinstance(d, int) else -1 for d in self.io[name]["shape"]]

    def __call__(self, **feeds):
        res = self.session.run(self.outputs, {k: v.numpy() for k, v in feeds.items()})
        return {n: torch.from_numpy(r) for n, r in zip(self.outputs, res)}


def test_trt_llm_cache_logic_on_the_exported_graphs(tiny, onnx_export):
    """TrtLLM's prefill/decode/KV-cache handling through runtime.generate equals TorchLLM (fp32,
    first logits atol/rtol 1e-4, greedy tokens equal), with onnxruntime executing the graphs."""
    from runtime.backends.tensorrt_backend import TrtLLM
    from runtime.generate import SamplingParams, TorchLLM, generate

    model, _ = tiny
    manifest, onnx_dir = onnx_export
    comps = manifest["components"]
    llm = TrtLLM(_OrtInPlaceOfPlan(onnx_dir / "llm_prefill.onnx", comps["llm_prefill"]),
                 _OrtInPlaceOfPlan(onnx_dir / "llm_decode.onnx", comps["llm_decode"]),
                 torch.from_numpy(np.load(onnx_dir / comps["embed_tokens"]["file"])))
    ref = TorchLLM(model.llm)
    torch.manual_seed(11)
    d = model.llm.config.hidden_size
    prompts = [0.02 * torch.randn(9, d), 0.02 * torch.randn(5, d)]  # different lengths: left padding
    params = SamplingParams(max_new_tokens=10)
    want, got = generate(ref, prompts, params), generate(llm, prompts, params)
    _close(got.first_logits, want.first_logits)
    assert got.tokens == want.tokens
    assert generate(llm, prompts, params, use_cache=False).tokens == got.tokens


# ------------------------------------------------------------------- plans vs torch (TensorRT + GPU)

@pytest.fixture(scope="module")
def fp32_plans(onnx_export, tmp_path_factory):
    manifest, onnx_dir = onnx_export
    out = tmp_path_factory.mktemp("plans32")
    comps = tb.build_plans(manifest, onnx_dir, out, "fp32", max_batch=4, progress=lambda *_: None, max_seq=256)
    return {"spec": manifest["spec"], "components": comps}, out


@pytest.mark.gpu
@needs_trt_gpu
def test_plan_entries_and_timing_cache(fp32_plans):
    manifest, out = fp32_plans
    target = tb.device_target()
    for name, e in manifest["components"].items():
        assert sha256_file(out / e["file"]) == e["sha256"], name
        if e["kind"] == "plan":
            assert e["target"] == target and e["precision"] == "fp32" and e["tensorrt"]
            assert e["profiles"] and e["max_batch"] == 4
    assert (out / tb.TIMING_CACHE).stat().st_size > 0


@pytest.mark.gpu
@needs_trt_gpu
def test_fp32_plans_match_torch(tiny, fp32_plans):
    from runtime.backends.tensorrt_backend import TensorRTComponents
    from runtime.backends.torch_backend import TorchComponents

    model, _ = tiny
    manifest, out = fp32_plans
    trt_c = TensorRTComponents(out, manifest)
    ref = TorchComponents(model, "cuda")
    torch.manual_seed(7)
    s, p = model.spec["image_size"], model.spec["parser"]["input_size"]
    pixels, parser_pixels = torch.randn(3, 3, s, s), torch.randn(3, 3, p, p)  # fresh random inputs, batch 3
    for got, want in zip(trt_c.encode_image(pixels), ref.encode_image(pixels)):
        _close(got, want)
    labels_trt, labels_ref = trt_c.parse_face(parser_pixels), ref.parse_face(parser_pixels)
    assert labels_trt.dtype == torch.uint8
    assert (labels_trt.cpu() == labels_ref.cpu()).float().mean() > 0.999  # argmax: near-ties may flip
    _close(trt_c.seg_tokens(labels_ref), ref.seg_tokens(labels_ref))
    pooled = torch.randn(3, model.attributes.proj.in_features)
    _close(trt_c.attributes(pooled), ref.attributes(pooled))
    assert (trt_c.num_image_tokens, trt_c.num_seg_tokens, trt_c.vocab_size) == \
        (model.num_image_tokens, model.num_seg_tokens, model.vocab_size)

    # LLM through runtime.generate: two prompts of different lengths (left padding), greedy
    from runtime.generate import SamplingParams, generate

    d = model.llm.config.hidden_size
    prompts = [0.02 * torch.randn(7, d, device="cuda"), 0.02 * torch.randn(4, d, device="cuda")]
    params = SamplingParams(max_new_tokens=8)
    want = generate(ref.llm, prompts, params)
    got = generate(trt_c.llm, prompts, params)
    _close(got.first_logits, want.first_logits)
    assert got.tokens == want.tokens
    # the KV-cache decode path against the plans' own recompute-everything path
    assert generate(trt_c.llm, prompts, params, use_cache=False).tokens == got.tokens


@pytest.mark.gpu
@needs_trt_gpu
def test_pipeline_greedy_tokens_match_torch(tiny, fp32_plans, face_images):
    from runtime.backends.tensorrt_backend import TensorRTComponents
    from runtime.generate import SamplingParams
    from runtime.backends.torch_backend import TorchComponents
    from runtime.pipeline import FacePipeline

    model, tok = tiny
    manifest, out = fp32_plans
    questions = ["Is this person smiling?", "Describe the hair.", "Glasses?"]
    params = SamplingParams(max_new_tokens=12)
    got = FacePipeline(TensorRTComponents(out, manifest), tok).ask_batch(face_images, questions, params)
    want = FacePipeline(TorchComponents(model, "cuda"), tok).ask_batch(face_images, questions, params)
    assert [a.token_ids for a in got] == [a.token_ids for a in want]


@pytest.mark.gpu
@needs_trt_gpu
def test_fp16_plans_close_to_torch(tiny, onnx_export, tmp_path):
    from runtime.backends.tensorrt_backend import TensorRTComponents
    from runtime.backends.torch_backend import TorchComponents

    model, _ = tiny
    manifest, onnx_dir = onnx_export
    comps = tb.build_plans(manifest, onnx_dir, tmp_path, "fp16", max_batch=2, progress=lambda *_: None, max_seq=128)
    trt_c = TensorRTComponents(tmp_path, {"spec": manifest["spec"], "components": comps})
    s = model.spec["image_size"]
    pixels = torch.randn(2, 3, s, s)
    for got, want in zip(trt_c.encode_image(pixels), TorchComponents(model, "cuda").encode_image(pixels)):
        scale = want.abs().max().item()
        assert (got.float().cpu() - want.float().cpu()).abs().max().item() <= 3e-2 * scale


@pytest.mark.gpu
@needs_trt_gpu
def test_plans_refuse_other_targets_and_oversized_inputs(fp32_plans):
    from runtime.backends.tensorrt_backend import TensorRTComponents

    manifest, out = fp32_plans
    moved = json.loads(json.dumps(manifest))
    moved["components"]["vision"]["target"] = "sm_00"
    with pytest.raises(tb.TensorRTError, match="built for sm_00"):
        TensorRTComponents(out, moved)
    trt_c = TensorRTComponents(out, manifest)
    s = manifest["spec"]["image_size"]
    with pytest.raises(tb.TensorRTError, match="outside the plan's profile"):
        trt_c.encode_image(np.zeros((5, 3, s, s), np.float32))  # max_batch is 4
    with pytest.raises(tb.TensorRTError, match="over the plans' 256-token context"):
        trt_c.llm.new_cache(1, 300)


@pytest.mark.gpu
@needs_trt_gpu
def test_a_corrupt_timing_cache_is_replaced(onnx_export, tmp_path):
    """TensorRT's create_timing_cache returns None for bytes it cannot parse: the build starts from an
    empty cache instead of failing, and writes a valid one back."""
    manifest, onnx_dir = onnx_export
    (tmp_path / tb.TIMING_CACHE).write_bytes(b"not a timing cache" * 10)
    comps = {"attributes": manifest["components"]["attributes"]}
    built = tb.build_plans({**manifest, "components": comps}, onnx_dir, tmp_path, "fp32", 2,
                           progress=lambda *_: None, max_seq=64)
    assert built["attributes"]["kind"] == "plan"
    assert (tmp_path / tb.TIMING_CACHE).read_bytes()[:18] != b"not a timing cache"


@pytest.mark.gpu
@needs_trt_gpu
def test_plans_run_on_the_backends_own_device(fp32_plans):
    """Engines are deserialized and run on the device the backend was given (the last GPU here),
    with inputs that arrive as unaligned views (a row of a larger batch)."""
    from runtime.backends.tensorrt_backend import TensorRTComponents

    manifest, out = fp32_plans
    device = f"cuda:{torch.cuda.device_count() - 1}"
    trt_c = TensorRTComponents(out, manifest, device=device)
    s = manifest["spec"]["image_size"]
    batch = torch.randn(3, 3, s, s, device=device)
    tokens, pooled = trt_c.encode_image(batch[1:2])
    assert tokens.device == torch.device(device)
    ref_tokens, _ = trt_c.encode_image(batch[1:2].clone())
    torch.testing.assert_close(tokens, ref_tokens)
