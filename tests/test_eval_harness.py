"""`facert eval` end to end: the safe .bin loader, the resumable log, and every evaluation on the
tiny checkpoints in-process and served (real tritonserver), with equal results between the two;
the two images of a pair reach the model as two images."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from eval_data import face, pair_plan, read_jsonl, write_bin, write_celeba, write_embedding_onnx, write_facexbench, write_lfw
from runtime.cli import main
from runtime.eval.datasets import load_celeba_attributes, load_facexbench
from runtime.eval.pairs import DataError, load_bin
from runtime.eval.protocols import ATTRIBUTES_QUESTION, VERIFY_QUESTION
from runtime.eval.runner import EvalError, ResultsLog
from runtime.eval.scoring import facexbench_option
from runtime.generate import SamplingParams
from runtime.models.attributes import CELEBA_ATTRIBUTES
from runtime.pipeline import FacePipeline
from serving_fixtures import served_tiny  # noqa: F401 (fixture)


@pytest.fixture
def asked(monkeypatch):
    """Every FacePipeline.ask_batch call's (images, questions); the real method still runs."""
    calls: list[tuple[list, list]] = []
    real = FacePipeline.ask_batch

    def recording(self, images, questions, params, *a, **k):
        calls.append((list(images), list(questions)))
        return real(self, images, questions, params, *a, **k)

    monkeypatch.setattr(FacePipeline, "ask_batch", recording)
    return calls


# ------------------------------------------------------------------------------- .bin safety

def test_bin_loads_as_insightface_writes_it(tmp_path):
    for protocol in (2, 4, pickle.HIGHEST_PROTOCOL):
        path = write_bin(tmp_path / f"p{protocol}.bin", n=6, protocol=protocol)
        pairs = load_bin(path)
        assert [p.issame for p in pairs] == [s for _, _, s in pair_plan(6)]
        assert pairs[1].left == face(1, 0) and pairs[1].right == face(1, 1)
        assert pairs[3].right == face(503, 1)
    # issame as a numpy bool array (older files), pickled through numpy's _reconstruct.
    for protocol in (2, 4):
        pairs = load_bin(write_bin(tmp_path / f"np{protocol}.bin", n=6, protocol=protocol, issame_array=True))
        assert [p.issame for p in pairs] == [s for _, _, s in pair_plan(6)]
        assert all(type(p.issame) is bool for p in pairs)


class RunsCommand:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class PlainObject:
    pass


MARKER = "/nonexistent"  # set per test


def _evil_pickles(marker: Path) -> dict[str, bytes]:
    global MARKER
    MARKER = str(marker)
    images = [face(0, 0), face(0, 1)]
    return {
        "os.system": pickle.dumps((images, [RunsCommand()])),
        "os.system in place of the images": pickle.dumps((RunsCommand(), [True])),
        "custom class": pickle.dumps((images, [PlainObject()])),
        "builtins.eval": b"cbuiltins\neval\n(S'__import__(\"os\").system(\"touch " + str(marker).encode() + b"\")'\ntR.",
        "numpy object array": pickle.dumps((images, np.array([True, None], dtype=object)), protocol=2),
        "numpy int array": pickle.dumps((images, np.array([1], dtype=np.int64)), protocol=2),
        "numpy array via _frombuffer": pickle.dumps((images, np.array([True])), protocol=5),
    }


@pytest.mark.parametrize("case", ["os.system", "os.system in place of the images", "custom class", "builtins.eval",
                                  "numpy object array", "numpy int array", "numpy array via _frombuffer"])
def test_bin_with_other_pickled_objects_is_refused_without_running_it(tmp_path, case):
    marker = tmp_path / "side_effect"
    path = tmp_path / "evil.bin"
    path.write_bytes(_evil_pickles(marker)[case])
    with pytest.raises(DataError, match="refused") as e:
        load_bin(path)
    assert str(path) in str(e.value)
    assert not marker.exists(), "the pickled call ran"


def test_bin_refusal_through_the_cli(tmp_path, capsys):
    marker = tmp_path / "side_effect"
    path = tmp_path / "lfw.bin"
    path.write_bytes(_evil_pickles(marker)["os.system"])
    onnx_path = tmp_path / "r50.onnx"
    write_embedding_onnx(onnx_path)
    rc = main(["eval", "verify", str(path), "--embedding-model", str(onnx_path), "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "refused to load pickled global posix.system" in err or "refused to load pickled global nt.system" in err
    assert not marker.exists()


def test_bin_structure_is_checked(tmp_path):
    cases = {
        "3 images for 2 pairs": ([face(0, 0)] * 3, [True, False]),
        "not encoded bytes": ([face(0, 0), "text"], [True]),
        "not a bool": ([face(0, 0), face(0, 1)], [2]),
        "expected a pickled": [1, 2, 3],
    }
    for message, obj in cases.items():
        path = tmp_path / "bad.bin"
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(DataError, match=message):
            load_bin(path)
    path.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable pickle"):
        load_bin(path)



# ------------------------------------------------------------------------------ results log

def test_results_log_drops_a_cut_line_and_refuses_a_different_run(tmp_path, capsys):
    cfg = {"command": "verify", "question": "q1"}
    log = ResultsLog(tmp_path, cfg)
    log.append({"id": "0", "score": 0.5})
    log.append({"id": "1", "error": "bad image"})
    with open(log.path, "a") as f:
        f.write('{"id": "2", "sco')  # killed mid-write
    log = ResultsLog(tmp_path, cfg)
    assert log.is_done("0") and not log.is_done("1") and not log.is_done("2")  # errors are retried
    assert log.path.read_text().endswith("\n")
    log.append({"id": "2", "score": 0.1})
    assert [r["id"] for r in read_jsonl(log.path)] == ["0", "1", "2"]
    with pytest.raises(EvalError, match="differs in: question"):
        ResultsLog(tmp_path, {"command": "verify", "question": "q2"})




# ------------------------------------------------------------------------ verify, end to end

def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_the_two_images_of_a_pair_reach_the_model_as_two_images(tmp_path, tiny_checkpoint, asked, monkeypatch):
    from runtime.pipeline import TorchComponents

    encoded: list[int] = []
    real_encode = TorchComponents.encode_image

    def counting(self, pixel_values):
        encoded.append(int(pixel_values.shape[0]))
        return real_encode(self, pixel_values)

    monkeypatch.setattr(TorchComponents, "encode_image", counting)
    data, expected = write_lfw(tmp_path / "lfw", sets=10, per_class=1, header=False)
    out = tmp_path / "out"
    assert main(["eval", "verify", str(data), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--concurrency", "5", "--max-tokens", "2", "--limit", "5"]) == 0
    (images, questions), = asked  # one batched call of five requests
    assert questions == [VERIFY_QUESTION] * 5
    # Each request: the pair's two images, as two separate images, in order.
    assert images == [[a.read_bytes(), b.read_bytes()] for a, b, _, _ in expected[:5]]
    # The vision tower encodes two images per pair (the tiny LLaVA: one tile each), not a composite.
    assert encoded == [10]
    # The prompt holds two images' rows: image and segmentation placeholders (ids >= vocab_size).
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    a, b = (p.read_bytes() for p in expected[0][:2])
    inputs, ids = pipe.requests.build([a, b], VERIFY_QUESTION, None, 2)
    per_image = pipe.c.num_image_tokens + pipe.c.num_seg_tokens
    assert inputs.num_images == 2 and inputs.tiles == [1, 1]
    assert sum(i >= pipe.c.vocab_size for i in ids) == 2 * per_image and per_image > 0
    # The same, measured on the answer: one more image adds its rows (plus the template's separator).
    two = pipe.ask([a, b], VERIFY_QUESTION, SamplingParams(max_new_tokens=1))
    one = pipe.ask([a], VERIFY_QUESTION, SamplingParams(max_new_tokens=1))
    assert two.prompt_tokens == len(ids) and per_image <= two.prompt_tokens - one.prompt_tokens <= per_image + 4


@pytest.mark.slow
def test_verify_in_process_and_served_give_the_same_results(tmp_path, tiny_checkpoint, served_tiny, capsys):
    data, _ = write_lfw(tmp_path / "lfw", sets=10, per_class=1, header=False)
    runs = {}
    for where, model in (("--checkpoint", str(tiny_checkpoint)), ("--url", served_tiny.grpc_url)):
        out = tmp_path / where.strip("-")
        assert main(["eval", "verify", str(data), where, model, "--out", str(out), "--concurrency", "4",
                     "--max-tokens", "3"]) == 0
        runs[where] = ({r["id"]: r for r in read_jsonl(out / "results.jsonl")}, _summary(out))
    (local, local_s), (served, served_s) = runs["--checkpoint"], runs["--url"]
    assert set(local) == set(served) and len(local) == 20
    for pid, r in local.items():
        assert served[pid]["text"] == r["text"] and served[pid]["decision"] == r["decision"]
    lm, sm = local_s["metrics"], served_s["metrics"]
    for key in ("pairs", "same", "different", "decision_accuracy", "answers_neither", "decision_folds"):
        assert sm[key] == lm[key], key
    # In-process the first-token probabilities give the threshold-tuned figures; the server
    # returns no first-token probabilities, and its summary says so instead of inventing them.
    assert lm["threshold_ten_fold"] is not None and lm["eer"] is not None
    if not all("p_yes" in r for r in served.values()):
        assert sm["threshold_ten_fold"] is None and any("first-token" in n for n in sm["notes"])
    printed = capsys.readouterr().out
    assert "decision accuracy: parsed yes/no answer (headline, as the papers report)" in printed


def test_p_yes_is_the_first_tokens_probability(tmp_path, tiny_checkpoint):
    data = write_bin(tmp_path / "lfw.bin", n=12)
    out = tmp_path / "out"
    assert main(["eval", "verify", str(data), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--concurrency", "6", "--max-tokens", "3"]) == 0
    recs = {r["id"]: r for r in read_jsonl(out / "results.jsonl")}
    # Recomputed for one pair: the byte-level tokenizer spells "yes" from the single-byte tokens
    # "y"/"Y", so P(yes) = softmax(first logits) at those two ids.
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    answer = pipe.ask(load_bin(data)[7].images(), VERIFY_QUESTION, SamplingParams(max_new_tokens=3))
    probs = np.exp(answer.first_logits.double().numpy() - answer.first_logits.double().logsumexp(0).item())
    tok = pipe.tokenizer
    assert recs["7"]["p_yes"] == pytest.approx(probs[[tok.convert_tokens_to_ids(t) for t in ("y", "Y")]].sum(), rel=1e-4)
    assert recs["7"]["p_no"] == pytest.approx(probs[[tok.convert_tokens_to_ids(t) for t in ("n", "N")]].sum(), rel=1e-4)
    assert recs["7"]["text"] == answer.text
    m = _summary(out)["metrics"]
    labels = [recs[str(i)]["issame"] for i in range(12)]
    decisions = [recs[str(i)]["decision"] for i in range(12)]
    assert m["decision_accuracy"] == pytest.approx(np.mean([d is not None and d == y for d, y in zip(decisions, labels)]))


def test_interrupted_run_resumes_without_recomputing(tmp_path, tiny_checkpoint, asked, monkeypatch):
    data = write_bin(tmp_path / "cfp_fp.bin", n=12)
    out = tmp_path / "out"
    args = ["eval", "verify", str(data), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--concurrency", "2", "--max-tokens", "2"]
    # 1) --limit: only the first 4 pairs.
    assert main(args + ["--limit", "4"]) == 0
    assert sum(len(q) for _, q in asked) == 4
    # 2) killed during its third batch (Ctrl-C reaches the model call).
    real = FacePipeline.ask_batch
    calls: list[int] = []

    def dies_on_third(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(FacePipeline, "ask_batch", dies_on_third)
    assert main(args) == 130
    assert {r["id"] for r in read_jsonl(out / "results.jsonl")} == {str(i) for i in range(8)}
    # 3) resumed: only the last 4 pairs are computed.
    seen: list[int] = []

    def tracking(self, images, *a, **k):
        seen.append(len(images))
        return real(self, images, *a, **k)

    monkeypatch.setattr(FacePipeline, "ask_batch", tracking)
    assert main(args) == 0
    assert sum(seen) == 4
    recs = read_jsonl(out / "results.jsonl")
    assert sorted(int(r["id"]) for r in recs) == list(range(12))  # each pair once
    # The resumed results equal an uninterrupted run's (greedy decoding is deterministic).
    assert main(args[:6] + [str(tmp_path / "fresh")] + args[7:]) == 0
    fresh = {r["id"]: r for r in read_jsonl(tmp_path / "fresh" / "results.jsonl")}
    for r in recs:
        assert r["text"] == fresh[r["id"]]["text"]
        assert r["p_yes"] == pytest.approx(fresh[r["id"]]["p_yes"], rel=1e-5)
    # 4) nothing left: a rerun computes nothing and reprints the summary.
    seen.clear()
    assert main(args) == 0 and seen == []


def test_bad_item_becomes_an_error_record_not_a_crash(tmp_path, tiny_checkpoint):
    bins = [face(0, 0), face(0, 1), b"not an image", face(1, 1), face(2, 0), face(3, 1)]
    (tmp_path / "x.bin").write_bytes(pickle.dumps((bins, [True, True, False])))
    assert main(["eval", "verify", str(tmp_path / "x.bin"), "--checkpoint", str(tiny_checkpoint),
                 "--out", str(tmp_path / "out"), "--max-tokens", "1"]) == 0
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    assert "image 1 of 2" in recs["1"]["error"] and "error" not in recs["0"] and "error" not in recs["2"]
    summary = _summary(tmp_path / "out")
    assert summary["errors"] == 1 and summary["scored"] == 2 and summary["metrics"]["errors"] == 1


# ---------------------------------------------------------------------------- mcq, end to end

def test_mcq_in_process_and_served_give_the_same_results(tmp_path, tiny_checkpoint, served_tiny, asked, capsys):
    bench = write_facexbench(tmp_path)
    qs = load_facexbench(bench)
    runs = {}
    for where, model in (("--checkpoint", str(tiny_checkpoint)), ("--url", served_tiny.grpc_url)):
        out = tmp_path / where.strip("-")
        assert main(["eval", "mcq", str(bench), where, model, "--out", str(out), "--max-tokens", "6",
                     "--concurrency", "8"]) == 0
        runs[where] = ({r["id"]: r for r in read_jsonl(out / "results.jsonl")}, _summary(out))
    # In-process: each question's images as separate images, then FaceXBench's text, no grid, no note.
    requests = [(imgs, q) for images, questions in asked for imgs, q in zip(images, questions)]
    assert [q for _, q in requests] == [q.prompt for q in qs]
    assert [len(imgs) for imgs, _ in requests] == [1, 1, 1, 4, 4]
    assert requests[3][0] == [p.read_bytes() for p in qs[3].images]
    (local, local_s), (served, served_s) = runs["--checkpoint"], runs["--url"]
    for q in qs:
        assert served[q.id]["text"] == local[q.id]["text"]
    for key in ("total", "category", "sub-category", "num_images", "total_with_other_parser"):
        assert served_s[key] == local_s[key], key
    # The totals are aggregate_results.py's reading of the answers.
    correct = sum(facexbench_option(local[q.id]["text"], q.options) == q.answer for q in qs)
    assert local_s["total"] == {"correct": correct, "total": 5, "accuracy": 100.0 * correct / 5}
    assert set(local_s["sub-category"]) == {"attributes", "hr_fr"} and local_s["num_images"]["multiple"]["total"] == 2
    assert "Total Accuracy:" in capsys.readouterr().out
    # Rescored with the strict parser: nothing is generated again.
    asked.clear()
    out = tmp_path / "checkpoint"
    assert main(["eval", "mcq", str(bench), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
                 "--max-tokens", "6", "--concurrency", "8", "--answer-parser", "strict"]) == 0
    assert asked == [] and _summary(out)["answer_parser"] == "strict"
    assert _summary(out)["total"]["correct"] == local_s["total_with_other_parser"]["correct"]
    assert json.loads((out / "facexbench" / "lfw_multiple_mcq.json").read_text())["questions"]["2"]["prediction"] \
        == local["lfw_multiple_mcq/2"]["text"].strip()


def test_mcq_on_internvl_passes_max_tiles(tmp_path, tiny_facellm_checkpoint, monkeypatch):
    """FaceLLM (InternVL): each image tiled as its processor does, at most --max-tiles tiles per image."""
    seen: list = []
    real = FacePipeline.ask_batch

    def recording(self, images, questions, params, *a, **k):
        seen.append(([len(x) for x in images], k.get("max_tiles"), params.max_new_tokens))
        return real(self, images, questions, params, *a, **k)

    monkeypatch.setattr(FacePipeline, "ask_batch", recording)
    bench = write_facexbench(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "mcq", str(bench / "lfw_multiple_mcq.json"), "--checkpoint", str(tiny_facellm_checkpoint),
                 "--out", str(out), "--max-tokens", "4", "--max-tiles", "2", "--concurrency", "2"]) == 0
    assert seen == [([4, 4], 2, 4)]
    summary = _summary(out)
    assert summary["total"]["total"] == 2 and summary["num_images"]["multiple"]["total"] == 2
    assert json.loads((out / "run.json").read_text())["max_tiles"] == 2


# --------------------------------------------------------------------- attributes, end to end

def test_attributes_in_process_and_served_give_the_same_results(tmp_path, tiny_checkpoint, served_tiny):
    path = write_celeba(tmp_path / "celeba", n=6, partition=[0, 2, 1, 2, 2, 0])
    runs = {}
    for where, model in (("--checkpoint", str(tiny_checkpoint)), ("--url", served_tiny.grpc_url)):
        out = tmp_path / where.strip("-")
        assert main(["eval", "attributes", str(path), where, model, "--out", str(out)]) == 0
        runs[where] = _summary(out)
    local, served = runs["--checkpoint"], runs["--url"]
    assert local["split"] == "test" and local["scored"] == 3
    for key in ("before_constraints", "after_constraints"):
        assert served[key]["per_attribute"] == pytest.approx(local[key]["per_attribute"])
    # Independently: ask the pipeline about each test image, threshold, count matches per attribute.
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    items, _ = load_celeba_attributes(path)
    right = {"raw": np.zeros(40), "after": np.zeros(40)}
    for item in items:
        a = pipe.ask([item.path.read_bytes()], ATTRIBUTES_QUESTION, SamplingParams(max_new_tokens=1))
        for j, name in enumerate(CELEBA_ATTRIBUTES):
            right["raw"][j] += (a.attributes_raw[name] >= 0.5) == bool(item.labels[name])
            right["after"][j] += (a.attributes[name] >= 0.5) == bool(item.labels[name])
    assert local["before_constraints"]["mean"] == pytest.approx(right["raw"].mean() / 3)
    assert local["after_constraints"]["mean"] == pytest.approx(right["after"].mean() / 3)


def test_attributes_refuses_facellm(tmp_path, tiny_facellm_checkpoint, capsys):
    path = write_celeba(tmp_path / "celeba", n=2)
    assert main(["eval", "attributes", str(path), "--checkpoint", str(tiny_facellm_checkpoint),
                 "--out", str(tmp_path / "out")]) == 2
    assert "needs FaceInsight's attribute head" in capsys.readouterr().err


# ------------------------------------------------------------------------- --engines backend

def test_engines_backend_matches_the_checkpoint(tmp_path, tiny_checkpoint):
    """The same evaluations through an ONNX Runtime engines folder (built here from the tiny
    checkpoint): the torch run's P(yes) to fp32 tolerance, the same answers and attribute accuracies."""
    build = pytest.importorskip("export.build")
    engines = build.build_engines(tiny_checkpoint, "onnxruntime", tmp_path / "engines",
                                  progress=build.Progress(4, quiet=True))
    data = write_bin(tmp_path / "calfw.bin", n=10)
    celeba = write_celeba(tmp_path / "celeba", n=3)
    runs = {}
    for where in ("--checkpoint", "--engines"):
        model = str(tiny_checkpoint if where == "--checkpoint" else engines)
        out = tmp_path / where.strip("-")
        assert main(["eval", "verify", str(data), where, model, "--out", str(out / "v"), "--max-tokens", "2"]) == 0
        assert main(["eval", "attributes", str(celeba), where, model, "--out", str(out / "a")]) == 0
        runs[where] = ({r["id"]: r for r in read_jsonl(out / "v" / "results.jsonl")}, _summary(out / "a"))
    (torch_v, torch_a), (ort_v, ort_a) = runs["--checkpoint"], runs["--engines"]
    for pid, r in torch_v.items():
        assert ort_v[pid]["p_yes"] == pytest.approx(r["p_yes"], rel=1e-4)
        assert ort_v[pid]["text"] == r["text"]
    assert ort_a["before_constraints"] == torch_a["before_constraints"]
    assert ort_a["after_constraints"] == torch_a["after_constraints"]
