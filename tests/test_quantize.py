"""int8 / int4 onnxruntime engines (export/quantize.py): the quantized operators are in the graphs,
the folders load and answer (in-process and served), edits are refused, and the answers stay within
a stated distance of fp32 on the tiny and the demo model (export/quant_accuracy.py)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from export.build import Progress, build_engines
from export.quant_accuracy import compare, eos_ids, text_prompts
from export.quantize import check_block_size, quantized_copy
from runtime.cli import DEMO_IMAGE, main
from runtime.engines import open_pipeline, verify_engines
from runtime.manifest import EngineError
from runtime.generate import SamplingParams
from runtime.pipeline import FacePipeline

QUIET = Progress(0, quiet=True)
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Why do people frown?"]


@pytest.fixture(scope="module")
def tiny_quantized(tiny_checkpoint, tmp_path_factory):
    """int8 and int4 tiny engines through `build_engines`; int4's build measures its accuracy."""
    root = tmp_path_factory.mktemp("quantized")
    return {p: build_engines(tiny_checkpoint, "onnxruntime", root / p, precision=p, progress=QUIET,
                             check_accuracy=p == "int4") for p in ("int8", "int4")}


def _graph(path):
    return onnx.load(str(path), load_external_data=False)


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


@pytest.mark.parametrize("precision, bits", [("int8", 8), ("int4", 4)])
def test_llm_matmuls_become_matmulnbits(tiny_quantized, tiny_checkpoint, precision, bits):
    """int4: 4-bit matmuls at accuracy level 4, each with its blocks' offsets, and an 8-bit lm_head.
    int8: every matmul 8-bit at level 1, held as two nibble planes (a 4-bit node of twice its K over
    [x, x]), each with its blocks' offsets."""
    engines = tiny_quantized[precision]
    m = _manifest(engines)
    layers = m["model"]["llm"]["num_layers"]
    level = 1 if precision == "int8" else 4
    for name in ("llm_prefill", "llm_decode"):
        g = _graph(engines / f"{name}.onnx")
        inits = {t.name: t for t in g.graph.initializer}
        producers = {o: n for n in g.graph.node for o in n.output}
        consumers = {i: n for n in g.graph.node for i in n.input}
        nbits = [n for n in g.graph.node if n.op_type == "MatMulNBits"]
        # per layer: fused q/k/v, o_proj, fused gate/up, down_proj; plus the lm_head, in 8 bits
        assert len(nbits) == 4 * layers + 1
        assert sum(n.output[0] == "logits" for n in nbits) == 1
        with_offsets = 0
        for node in nbits:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert node.domain == "com.microsoft"
            lm_head = node.output[0] == "logits"
            planes = node.input[0].removesuffix("_with_block_means").endswith("_twice")
            assert planes == (precision == "int8")
            assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (
                4 if planes or not lm_head else 8, 32, level)
            k = attrs["K"] * 32 // (65 if planes else 33) if attrs["bits"] == 4 else attrs["K"]
            if planes:
                concat = producers[node.input[0]]
                assert concat.op_type == "Concat" and concat.input[0] == concat.input[1]
                # 16 s, then s per block, then the offsets' own blocks
                assert list(inits[node.input[2]].dims) == [attrs["N"], 2 * k // 32 + -(-k // 32 // 32)]
            # an offset-carrying node multiplies [x(, x), the means of x's 32-blocks]: K + K / 32 rows
            if attrs["bits"] == 4:
                concat = producers[node.input[0]]
                assert node.input[0].endswith("_with_block_means") and concat.op_type == "Concat"
                means = producers[concat.input[-1]]
                if lm_head:  # its input [B, D] is pooled as [B, 1, D]
                    means = producers[means.input[0]]
                assert means.op_type == "AveragePool" and means.input[0].removesuffix("_rank_3") == concat.input[0]
                assert [list(a.ints) for a in means.attribute if a.name in ("kernel_shape", "strides")] == [[32], [32]]
                assert attrs["K"] == (2 if planes else 1) * k + k // 32
                with_offsets += 1
        assert with_offsets == m["components"][name]["quantization"]["matmuls_with_offsets"]
        assert with_offsets == (len(nbits) if bits == 8 else len(nbits) - 1)
        assert m["components"][name]["quantization"]["matmuls_as_nibble_planes"] == (len(nbits) if bits == 8 else 0)
        # no weight MatMul is left: RoPE is one RotaryEmbedding per layer (export.onnx_export.fuse_rotary_embedding)
        # in prefill, inside each layer's GroupQueryAttention in decode
        assert not [n for n in g.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
        rope_op = "RotaryEmbedding" if name == "llm_prefill" else "GroupQueryAttention"
        assert sum(n.op_type == rope_op for n in g.graph.node) == layers
        assert m["components"][name]["precision"] == precision
    assert not any(n.op_type == "MatMulNBits" for n in _graph(engines / "vision.onnx").graph.node)
    assert m["components"]["vision"]["precision"] == "fp32"

    import onnxruntime

    q = m["quantization"]
    assert m["precision"] == precision
    assert (q["bits"], q["output_bits"], q["block_size"], q["accuracy_level"]) == (bits, 8, 32, level)
    assert (q["block_offsets_bits"], q["nibble_planes_bits"]) == (([8], [8]) if bits == 8 else ([4], []))
    assert m["components"]["llm_decode"]["quantization"]["output_bits"] == 8
    assert q["quantizer_version"] == onnxruntime.__version__ and "MatMulNBits" in q["operator"]
    assert "asymmetric" in q["scheme"]
    # int8: a byte of codes and two fp32 scales (16 s and s) per block of 32; int4 half a byte and one;
    # both a padded block of offset rows per column (the demo model: 0.33 and 0.19 of fp32's bytes; the
    # tiny one's, 0.40 and 0.25: its K / 32 = 2 offsets fill a block of 32 rows). The fp32 RoPE tables
    # are in both.
    data = (engines / "llm.onnx.data").stat().st_size
    layout = m["model"]["llm"]
    tables = 2 * layout["max_position_embeddings"] * layout["head_dim"] // 2 * 4
    assert data == q["llm_data_bytes"][precision]
    assert data - tables < (q["llm_data_bytes"]["fp32"] - tables) * (0.45 if bits == 8 else 0.3)


@pytest.mark.parametrize("k, n", [(64, 10), (96, 300), (128, 33)])
def test_nibble_planes_hold_the_8bit_weight_exactly(k, n):
    """An 8-bit MatMulNBits rewritten as two 4-bit planes over [x, x] (16 s (h - zh) + s (l - zl))
    gives the plain 8-bit node's product at level 1 (fp32 compute), 1e-5 relative: the same weight,
    on onnxruntime's fast 4-bit kernel instead of its slow 8-bit fp32 path."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import _quantize_columns, nibble_planes

    rng = np.random.default_rng(k * n)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    plain, arrays = _quantize_columns(node, weight, "w", 8, 32, 4, offsets=False)  # level 4: no planes
    for attribute in plain.attribute:
        if attribute.name == "accuracy_level":
            attribute.i = 1
    planes, plane_arrays = nibble_planes(plain, arrays, 32)
    assert {a.name: a.i for a in planes.attribute if a.name in ("K", "bits")} == {"K": 2 * k, "bits": 4}
    assert plane_arrays["w_Q4"].nbytes == arrays["w_Q8"].nbytes  # the same bytes for the codes

    def run(nodes, tensors):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])],
                                  [numpy_helper.from_array(a, name) for name, a in tensors.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    planes.input[0] = "x_twice"
    expected = run([plain], arrays)
    got = run([helper.make_node("Concat", ["x", "x"], ["x_twice"], axis=-1), planes], plane_arrays)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert np.abs(expected - x @ weight).max() > 1e-3 * np.abs(expected).max()  # it is the quantized weight


@pytest.mark.parametrize("bits", [4, 8])
def test_block_offsets_reproduce_a_grid_with_float_minimums(bits):
    """Weights on Q4_1's grid (a scale and a float minimum per block of 32, as the demo model's,
    decoded from its GGUF file): MatMulNBits' integer zero points shift every block by up to half a
    step; with the blocks' offsets as rows of the weight, fed [x, block sums of x], the quantized
    matmul comes within the offsets' own 4-bit rounding of the fp32 one (fp32 compute, relative to the
    largest output: measured 2.3e-3 at 4 bits and 1.2e-4 at 8 on nibble planes, against 3.7e-2 and
    2.8e-3 without)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    from export.quantize import _quantize_columns, matmul_input_nodes

    k, n, block = 128, 40, 32
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 16, size=(k // block, block, n))
    codes[:, 0], codes[:, 1] = 0, 15  # each block spans its grid, as a min/max quantizer's blocks do
    step = rng.uniform(0.03, 0.06, size=(k // block, 1, n))
    minimum = rng.uniform(-0.4, -0.1, size=(k // block, 1, n))  # blocks straddle 0: 15 steps > 0.45
    weight = (codes * step + minimum).reshape(k, n).astype(np.float32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    reference = x @ weight
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    errors = {}
    for offsets in (True, False):
        qnode, arrays = _quantize_columns(node, weight, "w", bits, block, 1, offsets)  # 8 bits: on nibble planes
        fed, nodes, constants = matmul_input_nodes("x", 3, k, qnode, block)
        assert fed == "x" + ("_twice" if bits == 8 else "") + ("_with_block_means" if offsets else "")
        qnode.input[0] = fed
        graph = helper.make_graph(nodes + [qnode], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, n])],
                                  [numpy_helper.from_array(a, name) for name, a in arrays.items()] + constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        errors[offsets] = np.abs(session.run(None, {"x": x})[0] - reference).max() / np.abs(reference).max()
    assert errors[True] < (5e-3 if bits == 4 else 5e-4), errors
    assert errors[False] > 10 * errors[True], errors


@pytest.mark.parametrize("bits, k, n", [(4, 64, 300), (8, 96, 257), (4, 100, 130)])
def test_a_large_weight_quantized_in_column_slices_equals_it_whole(monkeypatch, bits, k, n):
    """A weight over MAX_SLICE_BYTES (a 152k-vocabulary lm_head: 2.2 GB, over protobuf's 2 GiB) goes
    through the quantizer in slices of columns: the node and every initializer equal the whole one's,
    byte for byte. K=100 is not a multiple of the block (padded)."""
    from onnx import helper, numpy_helper

    from export import quantize

    rng = np.random.default_rng(k + n)
    weight = rng.standard_normal((k, n)).astype(np.float32)
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    whole_node, whole = quantize.quantize_matmul(node, weight, "w", bits, 32)
    monkeypatch.setattr(quantize, "MAX_SLICE_BYTES", 4 * k * 64)  # 64 columns a slice
    sliced_node, sliced = quantize.quantize_matmul(node, weight, "w", bits, 32)
    assert sliced_node == whole_node
    assert [t.name for t in sliced] == [t.name for t in whole]
    for a, b in zip(sliced, whole):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
        assert list(a.dims) == list(b.dims)


def test_build_measures_and_records_accuracy(tiny_quantized):
    check = _manifest(tiny_quantized["int4"])["quantization"]["accuracy_check"]
    assert check["prompts"] == 8 and check["positions"] > 8 and check["goal_top1"] == 0.90
    assert 0 <= check["top1_agreement"] <= 1 and check["mean_kl"] >= 0
    assert check["passes"] == (check["top1_agreement"] >= 0.90)
    assert "accuracy_check" not in _manifest(tiny_quantized["int8"])["quantization"]  # check_accuracy=False


def test_tiny_quantized_engines_answer_close_to_fp32(tiny_quantized, tiny_checkpoint, face_images):
    """Tiny random weights give near-uniform next-token distributions (ties everywhere), so the bound
    is on the KL divergence from the fp32 torch model; measured here: int8 ~1e-6, int4 ~2e-4."""
    reference = FacePipeline.from_checkpoint(tiny_checkpoint)
    for precision, max_kl in (("int8", 1e-4), ("int4", 5e-3)):
        pipe = open_pipeline(tiny_quantized[precision])
        answer = pipe.ask(face_images[0], "Is this person smiling?", SamplingParams(max_new_tokens=6))
        assert len(answer.token_ids) == 6 and answer.attributes
        prompts = text_prompts(pipe.c.llm, pipe.tokenizer, "faceinsight", pipe.c.vocab_size, QUESTIONS)
        prompts += [pipe.prepare([image], ["Describe the face."], 8).prompt_embeds[0] for image in face_images[:2]]
        result = compare(reference.c.llm, {precision: pipe.c.llm}, prompts, 8, eos_ids(pipe.tokenizer))[precision]
        assert result["mean_kl"] < max_kl, (precision, result)


def test_cli_builds_and_asks_int4(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "int4"
    assert main(["build", "--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime", "--precision", "int4",
                 "--block-size", "16", "--no-accuracy-check", "--out", str(out)]) == 0
    assert "quantizing the LLM's matmuls to int4" in capsys.readouterr().err
    assert _manifest(out)["quantization"]["block_size"] == 16
    assert _manifest(out)["quantization"]["accuracy_level"] == 4  # int4's default


def test_cli_builds_int4_at_the_accuracy_level_asked(tiny_checkpoint, tmp_path, capsys):
    """--accuracy-level 1 (fp32 activations) instead of int4's default 4: every MatMulNBits node of both
    LLM graphs carries it, the manifest and the recorded build command say it, and the engines answer."""
    out = tmp_path / "int4-level1"
    assert main(["build", "--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime", "--precision", "int4",
                 "--accuracy-level", "1", "--no-accuracy-check", "--out", str(out)]) == 0
    m = _manifest(out)
    assert m["quantization"]["accuracy_level"] == 1 and "--accuracy-level 1" in m["build_command"]
    for name in ("llm_prefill", "llm_decode"):
        levels = {onnx.helper.get_attribute_value(a) for n in _graph(out / f"{name}.onnx").graph.node
                  if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
        assert levels == {1}
    capsys.readouterr()
    assert main(["ask", str(DEMO_IMAGE), "Is this person smiling?", "--engines", str(out), "--max-tokens", "3",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 3
    assert main(["ask", str(DEMO_IMAGE), "Is this person smiling?", "--engines", str(out), "--max-tokens", "4",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


def test_bad_quantization_arguments_are_refused(tiny_checkpoint, tmp_path, capsys):
    for size in (0, 8, 24, 48):
        with pytest.raises(EngineError, match="power of two >= 16"):
            check_block_size(size)
    with pytest.raises(EngineError, match="--block-size and --accuracy-level are for"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "x", precision="fp32", block_size=32)
    with pytest.raises(EngineError, match="--block-size and --accuracy-level are for"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "x", precision="fp32", accuracy_level=1)
    with pytest.raises(EngineError, match="--accuracy-level must be one of 1, 4"):
        build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "x", precision="int4", accuracy_level=2)
    with pytest.raises(SystemExit):  # argparse's own refusal: exit status 2, the choices in the message
        main(["build", "--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime", "--precision", "int4",
              "--accuracy-level", "3", "--out", str(tmp_path / "x")])
    assert "invalid choice: 3 (choose from 1, 4)" in capsys.readouterr().err
    with pytest.raises(EngineError, match="int4 is for --backend onnxruntime or tensorrt-llm"):
        build_engines(tiny_checkpoint, "tensorrt", tmp_path / "x", precision="int4")
    assert main(["build", "--checkpoint", str(tiny_checkpoint), "--backend", "onnxruntime", "--precision", "int8",
                 "--block-size", "24", "--out", str(tmp_path / "y")]) == 2
    assert "power of two" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------ refusals

@pytest.fixture
def int4_copy(tiny_quantized, tmp_path):
    return shutil.copytree(tiny_quantized["int4"], tmp_path / "int4")


def _rehash(engines, names):
    """Make the manifest's hashes match the files again (an edit that also edits the manifest)."""
    from runtime.checkpoint import sha256_file

    m = _manifest(engines)
    for name in names:
        entry = m["components"][name]
        entry["sha256"] = sha256_file(engines / entry["file"])
        entry["data_sha256"] = {rel: sha256_file(engines / rel) for rel in entry.get("data_files", [])}
    (engines / "manifest.json").write_text(json.dumps(m, indent=2))
    return m


def test_edited_quantized_weights_are_refused(int4_copy):
    data = bytearray((int4_copy / "llm.onnx.data").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (int4_copy / "llm.onnx.data").write_bytes(bytes(data))
    with pytest.raises(EngineError, match=r"llm\.onnx\.data.*sha256.*corrupt or was edited"):
        open_pipeline(int4_copy)


def test_graphs_of_another_precision_are_refused_even_with_matching_hashes(int4_copy, tiny_quantized):
    for name in ("llm_prefill.onnx", "llm_decode.onnx", "llm.onnx.data"):
        shutil.copy(tiny_quantized["int8"] / name, int4_copy / name)
    _rehash(int4_copy, ["llm_prefill", "llm_decode"])
    with pytest.raises(EngineError, match=r"component 'llm_prefill'.*MatMulNBits nodes on nibble planes, the manifest "
                                          r"says 0"):
        verify_engines(int4_copy)


def test_a_manifest_that_calls_quantized_graphs_fp32_is_refused(int4_copy):
    m = _manifest(int4_copy)
    m["components"]["llm_decode"]["precision"] = "fp32"
    (int4_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match=r"component 'llm_decode'.*MatMulNBits nodes, but the manifest says fp32"):
        verify_engines(int4_copy)


def test_an_edited_block_size_is_refused(int4_copy):
    path = int4_copy / "llm_decode.onnx"
    g = onnx.load(str(path), load_external_data=False)
    node = next(n for n in g.graph.node if n.op_type == "MatMulNBits")
    next(a for a in node.attribute if a.name == "block_size").i = 64
    path.write_bytes(g.SerializeToString())
    _rehash(int4_copy, ["llm_decode"])
    with pytest.raises(EngineError, match=r"block_size 64, the manifest says 32"):
        verify_engines(int4_copy)


# ------------------------------------------------------------------------------------- serving

def test_demo_engines_fall_back_to_fp32_when_the_quantized_build_misses_its_goal(tiny_quantized, tiny_checkpoint,
                                                                                   tmp_path):
    """`facert demo` serves a quantized build only if its own accuracy check passed (tiny's random
    int4 LLM does not: ties everywhere), else fp32 engines, and says which it serves."""
    from export.cli import demo_engines

    check = _manifest(tiny_quantized["int4"])["quantization"]["accuracy_check"]
    shutil.copytree(tiny_quantized["int4"], tmp_path / "engines" / "demo-onnxruntime-int4")
    engines, note = demo_engines(tmp_path, tiny_checkpoint, "int4")
    if check["passes"]:
        assert engines.name == "demo-onnxruntime-int4" and "int4" in note and "top-1 agreement" in note
    else:
        assert engines.name == "demo-onnxruntime" and note == "onnxruntime engines, fp32"
        assert _manifest(engines)["precision"] == "fp32"


@pytest.mark.slow
def test_served_repository_runs_int4_engines_unchanged(tiny_quantized, tmp_path, face_png, monkeypatch):
    from runtime.client import ask_remote
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import TritonServer, free_ports

    engines = tiny_quantized["int4"]
    params = SamplingParams(max_new_tokens=8)
    expected = open_pipeline(engines).ask(face_png, "Is this person smiling?", params)
    fill_repository(tmp_path / "repo", engines=engines)
    monkeypatch.delenv("FACERT_ORT_SPIN", raising=False)  # the server inherits it
    http, grpc, metrics = free_ports(3)
    lines = []
    with TritonServer(tmp_path / "repo", http_port=http, grpc_port=grpc, metrics_port=metrics,
                      log=lines.append, exit_timeout_s=3) as server:
        served = ask_remote(server.grpc_url, face_png, "Is this person smiling?", params, stream=True)
    assert served["token_ids"] == expected.token_ids and served["text"] == expected.text
    # the served steps share the cores: the llm step's decode workers sleep
    assert any("decode graph's workers sleep between ops" in line for line in lines), lines[-20:]


# ------------------------------------------------------------------------------- the demo model

@pytest.mark.slow
def test_demo_quantized_engines_stay_close_to_fp32(demo_engines, tmp_path, face_images):
    """The real SmolLM2-135M: teacher-forced next-token agreement with the fp32 engines over the
    reference's greedy continuation, 3 text and 2 image prompts, 12 tokens. Measured over 50 prompts
    (benchmarks/results/2026-11-30-quant-planes): int8 (level 1, nibble planes, offsets) ~99 % top-1 /
    KL ~0.0002, int4 (block offsets, 8-bit lm_head) ~97 % / KL ~0.004; the bounds below leave room for
    the smaller prompt set."""
    reference = open_pipeline(demo_engines)
    prompts = text_prompts(reference.c.llm, reference.tokenizer, "faceinsight", reference.c.vocab_size, QUESTIONS)
    prompts += [reference.prepare([image], ["Describe this person's face."], 12).prompt_embeds[0]
                for image in face_images[:2]]
    eos = eos_ids(reference.tokenizer)
    bounds = {"int8": (0.93, 0.002), "int4": (0.85, 0.03)}
    pipes = {p: open_pipeline(quantized_copy(demo_engines, tmp_path / p, p)) for p in bounds}
    for pipe in pipes.values():
        answer = pipe.ask(face_images[0], "Is this person smiling?", SamplingParams(max_new_tokens=8))
        assert answer.text.strip() and all(t < pipe.c.vocab_size for t in answer.token_ids)
    results = compare(reference.c.llm, {p: pipe.c.llm for p, pipe in pipes.items()}, prompts, 12, eos)
    for precision, (min_top1, max_kl) in bounds.items():
        r = results[precision]
        assert r["top1_agreement"] >= min_top1 and r["mean_kl"] <= max_kl, (precision, r)
        assert np.isfinite(r["mean_kl"])


def test_spin_probe_times_the_decode_step_spinning_and_sleeping(tiny_quantized, tmp_path):
    """benchmarks/spin_probe.py on the tiny int4 engines: every setting times two decoders at once."""
    from benchmarks import spin_probe

    out = tmp_path / "spin.json"
    assert spin_probe.main([str(tiny_quantized["int4"]), "--threads", "1", "--past", "20", "--steps", "3",
                            "--rounds", "1", "--concurrent", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["setting"] for r in rows} == set(spin_probe.SETTINGS)
    for r in rows:
        assert r["concurrent"] == 2 and r["samples"] == 2  # one round from each of the two decoders
        assert 0 < r["min"] <= r["ms_per_step_median"] <= r["max"]
