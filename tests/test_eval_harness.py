"""`facert eval`: the data formats (built here in their real layouts), the safe .bin loader,
end-to-end runs on the tiny checkpoint, resuming, and the face-embedding ONNX baseline."""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from runtime.cli import main
from runtime.eval.datasets import (
    DataError,
    composite,
    facexbench_prompt,
    load_bin,
    load_celeba_attributes,
    load_facexbench,
    load_pairs_txt,
)
from runtime.eval.metrics import equal_error_rate, ten_fold_accuracy
from runtime.eval.runner import EvalError, RemoteBackend, ResultsLog
from runtime.eval.tasks import MULTI_IMAGE_NOTE, VERIFY_QUESTION, run_verify, summarize_mcq
from runtime.models.attributes import CELEBA_ATTRIBUTES
from runtime.generate import SamplingParams
from runtime.pipeline import FacePipeline


# ------------------------------------------------------------------------------ data builders

def face(identity: int, shot: int, size: int = 112, fmt: str = "JPEG") -> bytes:
    """A small synthetic face photo: skin tone, eye spacing and mouth fixed per identity,
    background and position varying per shot."""
    ident, rng = random.Random(identity), random.Random(identity * 1000 + shot)
    skin = tuple(ident.randint(110, 235) for _ in range(3))
    img = Image.new("RGB", (size, size), tuple(rng.randint(0, 70) for _ in range(3)))
    d = ImageDraw.Draw(img)
    s = size / 112
    dx = rng.randint(-3, 3)
    d.ellipse((18 * s + dx, 10 * s, 94 * s + dx, 104 * s), fill=skin)
    ex = ident.randint(30, 42)
    for x in (ex, 112 - ex):
        d.ellipse(((x - 6) * s + dx, 42 * s, (x + 6) * s + dx, 52 * s), fill=(30, 30, 30))
    d.arc((36 * s + dx, 66 * s, 76 * s + dx, (86 + ident.randint(0, 10)) * s), 0, 180, fill=(120, 20, 20), width=3)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def pair_plan(n: int) -> list[tuple[int, int, bool]]:
    """(identity a, identity b, same) for n pairs: blocks of same then different, as LFW orders them."""
    plan = []
    for i in range(n):
        same = (i // 3) % 2 == 0
        plan.append((i, i if same else i + 500, same))
    return plan


def write_bin(path: Path, n: int = 20, protocol: int = pickle.HIGHEST_PROTOCOL, issame_array: bool = False) -> Path:
    """An insightface .bin: pickle.dump((bins, issame_list), f) with encoded JPEG bytes."""
    bins, issame = [], []
    for a, b, same in pair_plan(n):
        bins += [face(a, 0), face(b, 1)]
        issame.append(same)
    with open(path, "wb") as f:
        pickle.dump((bins, np.array(issame) if issame_array else issame), f, protocol=protocol)
    return path


def write_lfw(root: Path, sets: int = 2, per_class: int = 5) -> Path:
    """LFW layout: pairs.txt (header `SETS<TAB>N`) and lfw/<name>/<name>_000k.jpg."""
    images = root / "lfw"
    lines = [f"{sets}\t{per_class}"]

    def put(name: str, k: int, identity: int) -> None:
        d = images / name
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}_{k:04d}.jpg").write_bytes(face(identity, k, size=250))

    pid = 0
    for _ in range(sets):
        for _ in range(per_class):
            name = f"Person_{pid}"
            put(name, 1, pid)
            put(name, 2, pid)
            lines.append(f"{name}\t1\t2")
            pid += 1
        for _ in range(per_class):
            a, b = f"Person_{pid}", f"Person_{pid + 1}"
            put(a, 1, pid)
            put(b, 3, pid + 1)
            lines.append(f"{a}\t1\t{b}\t3")
            pid += 2
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root / "pairs.txt"


def write_facexbench(root: Path) -> Path:
    """Two FaceXBench files in its benchmark/ layout: one single-image, one multi-image."""
    bench = root / "benchmark"
    (bench / "images" / "celeba_single_mcq").mkdir(parents=True)
    (bench / "images" / "lfw_multiple_mcq").mkdir(parents=True)
    single = {"category": "attributes_expression", "sub-category": "attributes", "dataset": "celeba",
              "question_type": "MCQ", "num_images": "single",
              "prepend_text": "Facial attribute prediction is the task of ...",
              "postpend_text": "Please answer the question and provide only the correct option letter, e.g., A, B, C, D.",
              "questions": {}}
    for q in range(1, 4):
        rel = f"images/celeba_single_mcq/question_{q}.png"
        (bench / rel).write_bytes(face(q, 0, fmt="PNG"))
        single["questions"][str(q)] = {"image_paths": [rel], "question_text": "Which attribute is present?",
                                       "options": ["Smiling", "Eyeglasses", "Bald", "Wearing_Hat"],
                                       "correct_answer_option": "ABC"[q - 1], "answer": ["Smiling", "Eyeglasses", "Bald"][q - 1]}
    multi = {"category": "face_recognition", "sub-category": "hr_fr", "dataset": "lfw", "question_type": "MCQ",
             "num_images": "multiple", "prepend_text": "High-resolution face recognition ...",
             "postpend_text": "Please answer the question and provide only the correct option letter, e.g., A, B, C, D.",
             "questions": {}}
    for q in range(1, 3):
        rels = []
        for k in range(1, 5):
            rel = f"images/lfw_multiple_mcq/question_{q}_{k}.png"
            (bench / rel).write_bytes(face(10 * q + k % 3, k, fmt="PNG"))
            rels.append(rel)
        multi["questions"][str(q)] = {"image_paths": rels, "question_text": "Which two images show the same person?",
                                      "options": ["Images 1 and 2", "Images 1 and 4", "Images 2 and 3", "Images 3 and 4"],
                                      "correct_answer_option": "B", "answer": "Images 1 and 4"}
    (bench / "celeba_single_mcq.json").write_text(json.dumps(single, indent=4))
    (bench / "lfw_multiple_mcq.json").write_text(json.dumps(multi, indent=4))
    return bench


def write_celeba(root: Path, n: int = 6, seed: int = 0) -> Path:
    """list_attr_celeba.txt (count, the 40 names, `000001.jpg -1  1 ...` rows) + img_align_celeba/."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 1], size=(n, 40))
    (root / "img_align_celeba").mkdir(parents=True)
    rows = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        (root / "img_align_celeba" / name).write_bytes(face(i, 0, size=96))
        rows.append(name + " " + " ".join(f"{v:2d}" for v in labels[i]))
    (root / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + "\n".join(rows) + "\n")
    return root / "list_attr_celeba.txt"


def write_embedding_onnx(path: Path, dim: int = 8, seed: int = 0) -> np.ndarray:
    """A face-embedding model as insightface exports them: [B,3,112,112] float -> [B,dim].
    Here Flatten + MatMul with seeded weights; returns the weights for an independent check."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(seed).standard_normal((3 * 112 * 112, dim)).astype(np.float32) / 100
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["data"], ["flat"], axis=1), helper.make_node("MatMul", ["flat", "w"], ["fc1"])],
        "embed", [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["batch", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["batch", dim])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return w


def independent_embedding(data: bytes, w: np.ndarray) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.size != (112, 112):
        img = img.resize((112, 112), Image.BILINEAR)
    x = (np.asarray(img, dtype=np.float32).transpose(2, 0, 1) - 127.5) / 128.0
    return x.reshape(-1).astype(np.float64) @ w.astype(np.float64)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def count_batches(monkeypatch):
    """Counts FacePipeline.ask_batch calls and the requests in them (the real method still runs)."""
    calls: list[list[str]] = []
    real = FacePipeline.ask_batch

    def counted(self, images, questions, params, *a, **k):
        calls.append(list(questions))
        return real(self, images, questions, params, *a, **k)

    monkeypatch.setattr(FacePipeline, "ask_batch", counted)
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


# ------------------------------------------------------------------------ other data formats

def test_pairs_txt(tmp_path):
    path = write_lfw(tmp_path, sets=2, per_class=3)
    pairs = load_pairs_txt(path, tmp_path / "lfw")
    assert len(pairs) == 12 and [p.issame for p in pairs] == ([True] * 3 + [False] * 3) * 2
    assert pairs[0].left == tmp_path / "lfw" / "Person_0" / "Person_0_0001.jpg"
    assert pairs[3].right == tmp_path / "lfw" / "Person_4" / "Person_4_0003.jpg"
    with pytest.raises(DataError, match="pass --images"):
        load_pairs_txt(path)  # images are under lfw/, not beside pairs.txt
    text = path.read_text().splitlines()
    (tmp_path / "short.txt").write_text("\n".join(text[:-1]))
    with pytest.raises(DataError, match="= 12 lines, found 11"):
        load_pairs_txt(tmp_path / "short.txt", tmp_path / "lfw")
    (tmp_path / "bad.txt").write_text("\n".join(text[:2] + ["a b"] + text[3:]))
    with pytest.raises(DataError, match=r"bad.txt:3: expected"):
        load_pairs_txt(tmp_path / "bad.txt", tmp_path / "lfw")


def test_facexbench_format(tmp_path):
    bench = write_facexbench(tmp_path)
    qs = load_facexbench(bench)
    assert [q.id for q in qs] == ["celeba_single_mcq/1", "celeba_single_mcq/2", "celeba_single_mcq/3",
                                  "lfw_multiple_mcq/1", "lfw_multiple_mcq/2"]
    q = qs[0]
    assert (q.category, q.subtask, q.num_images, q.answer) == ("attributes_expression", "attributes", "single", "A")
    # The prompt FaceXBench's evaluate.py builds (without --prepend_text).
    assert q.prompt == ("Which attribute is present?\n"
                        "Please answer the question and provide only the correct option letter, e.g., A, B, C, D.\n"
                        "(A) Smiling\n(B) Eyeglasses\n(C) Bald\n(D) Wearing_Hat\n")
    assert load_facexbench(bench, prepend=True)[0].prompt.startswith("Facial attribute prediction is the task of ...\n")
    assert len(qs[3].images) == 4 and qs[3].images[0] == bench / "images/lfw_multiple_mcq/question_1_1.png"
    tools = {"category": "tools_use", "context": "API list", "postpend_text": "Letter only.",
             "questions": {"1": {"question_text": "Q?", "options": ["a", "b"], "correct_answer_option": "B"}}}
    assert facexbench_prompt(tools, tools["questions"]["1"], False) == "API list\nQ?\nLetter only.\n(A) a\n(B) b\n"
    data = json.loads((bench / "lfw_multiple_mcq.json").read_text())
    data["questions"]["1"]["correct_answer_option"] = "E"
    (bench / "lfw_multiple_mcq.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="question 1: correct_answer_option 'E'"):
        load_facexbench(bench)
    (bench / "images/celeba_single_mcq/question_2.png").unlink()
    with pytest.raises(DataError, match="question_2.png does not exist"):
        load_facexbench(bench / "celeba_single_mcq.json")


def test_celeba_attribute_list(tmp_path):
    path = write_celeba(tmp_path, n=4)
    items = load_celeba_attributes(path)
    rows = path.read_text().splitlines()
    assert len(items) == 4 and items[0].id == "000001.jpg"
    assert items[0].path == tmp_path / "img_align_celeba" / "000001.jpg"
    first = [int(v) for v in rows[2].split()[1:]]
    assert [items[0].labels[n] for n in CELEBA_ATTRIBUTES] == [int(v == 1) for v in first]
    path.write_text("\n".join(["5"] + rows[1:]))
    with pytest.raises(DataError, match="says 5 images, found 4"):
        load_celeba_attributes(path)
    path.write_text("\n".join(["4", rows[1].replace("Smiling", "Grinning")] + rows[2:]))
    with pytest.raises(DataError, match="unknown attribute names"):
        load_celeba_attributes(path)


def test_composite_layout():
    left = Image.new("RGB", (112, 112), (255, 0, 0))
    right = Image.new("RGB", (50, 100), (0, 0, 255))
    enc = []
    for im in (left, right):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        enc.append(buf.getvalue())
    img = Image.open(io.BytesIO(composite(enc)))
    assert img.size == (448, 224)  # side by side, 224-pixel tiles
    assert img.getpixel((112, 112)) == (255, 0, 0)  # left = first
    assert img.getpixel((224 + 112, 112)) == (0, 0, 255)
    assert img.getpixel((224 + 5, 112)) == (127, 127, 127)  # the narrow image is centred on grey
    grid = Image.open(io.BytesIO(composite(enc * 3, numbered=True)))
    assert grid.size == (3 * 224, 2 * 224)  # six images: three columns, two rows


# ----------------------------------------------------------------------------- verify runs

def test_verify_embedding_baseline_on_pairs_txt_and_bin(tmp_path, capsys):
    onnx_path = tmp_path / "embed.onnx"
    w = write_embedding_onnx(onnx_path)
    pairs_txt = write_lfw(tmp_path / "lfwdata", sets=2, per_class=5)
    out = tmp_path / "out_txt"
    rc = main(["eval", "verify", str(pairs_txt), "--images", str(tmp_path / "lfwdata/lfw"),
               "--embedding-model", str(onnx_path), "--out", str(out), "--concurrency", "3"])
    assert rc == 0
    pairs = load_pairs_txt(pairs_txt, tmp_path / "lfwdata/lfw")
    recs = {r["id"]: r for r in read_jsonl(out / "results.jsonl")}
    expected = []
    for p in pairs:
        a, b = (independent_embedding(x, w) for x in p.images())
        expected.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    got = [recs[p.id]["score"] for p in pairs]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    labels = [p.issame for p in pairs]
    m = summary["metrics"]
    assert (m["pairs"], m["same"], m["different"]) == (20, 10, 10)
    # Metrics from the independently computed scores.
    assert m["eer"]["eer"] == pytest.approx(equal_error_rate(expected, labels)[0], abs=1e-6)
    assert m["ten_fold"]["folds"] == pytest.approx(ten_fold_accuracy(expected, labels)["folds"])
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "10-fold accuracy" in printed and "TMR @ FMR 0.001" in printed and "EER" in printed

    # The same model on a .bin.
    out = tmp_path / "out_bin"
    rc = main(["eval", "verify", str(write_bin(tmp_path / "agedb_30.bin", n=12)), "--embedding-model", str(onnx_path),
               "--out", str(out), "--flip"])
    assert rc == 0
    pairs = load_bin(tmp_path / "agedb_30.bin")
    rec = read_jsonl(out / "results.jsonl")[4]
    flip = lambda data: independent_embedding(  # noqa: E731
        _png(Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.FLIP_LEFT_RIGHT)), w)
    a, b = (independent_embedding(x, w) + flip(x) for x in pairs[4].images())
    assert rec["score"] == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-5)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_verify_mllm_end_to_end_tiny(tmp_path, tiny_checkpoint, count_batches, capsys):
    data = write_bin(tmp_path / "lfw.bin", n=12)
    out = tmp_path / "out"
    rc = main(["eval", "verify", str(data), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
               "--concurrency", "5", "--max-tokens", "3"])
    assert rc == 0
    assert [len(c) for c in count_batches] == [5, 5, 2]  # --concurrency requests per batched call
    assert all(q == VERIFY_QUESTION for c in count_batches for q in c)
    recs = read_jsonl(out / "results.jsonl")
    assert len(recs) == 12 and all("p_yes" in r for r in recs)

    # P(yes) recomputed independently for one pair: the byte-level tokenizer spells "yes" from the
    # single-byte tokens "y"/"Y", so P(yes) = softmax(first logits) at those two ids.
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    pair = load_bin(data)[7]
    answer = pipe.ask(composite(list(pair.images())), VERIFY_QUESTION, SamplingParams(max_new_tokens=3))
    probs = np.exp(answer.first_logits.double().numpy() - answer.first_logits.double().logsumexp(0).item())
    tok = pipe.tokenizer
    y_ids = [tok.convert_tokens_to_ids(t) for t in ("y", "Y")]
    n_ids = [tok.convert_tokens_to_ids(t) for t in ("n", "N")]
    rec = next(r for r in recs if r["id"] == "7")
    assert rec["p_yes"] == pytest.approx(probs[y_ids].sum(), rel=1e-4)
    assert rec["p_no"] == pytest.approx(probs[n_ids].sum(), rel=1e-4)
    assert rec["text"] == answer.text

    summary = json.loads((out / "summary.json").read_text())
    assert summary["score"] == "first-token P(yes)"
    labels = [r["issame"] for r in sorted(recs, key=lambda r: int(r["id"]))]
    scores = [r["p_yes"] for r in sorted(recs, key=lambda r: int(r["id"]))]
    assert summary["metrics"]["ten_fold"]["folds"] == pytest.approx(ten_fold_accuracy(scores, labels)["folds"])
    decisions = [r["decision"] is True for r in recs]
    assert summary["metrics"]["decision_accuracy"] == pytest.approx(
        np.mean([d == r["issame"] for d, r in zip(decisions, recs)]))
    assert "verify lfw" in capsys.readouterr().out


def test_interrupted_run_resumes_without_recomputing(tmp_path, tiny_checkpoint, count_batches, monkeypatch):
    data = write_bin(tmp_path / "cfp_fp.bin", n=12)
    out = tmp_path / "out"
    args = ["eval", "verify", str(data), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
            "--concurrency", "2", "--max-tokens", "2"]
    # 1) --limit: only the first 4 pairs.
    assert main(args + ["--limit", "4"]) == 0
    assert sum(len(c) for c in count_batches) == 4
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
    done = {r["id"] for r in read_jsonl(out / "results.jsonl")}
    assert done == {str(i) for i in range(8)}  # 4 from the limited run, 4 from two batches
    # 3) resumed: only the last 4 pairs are computed.
    monkeypatch.setattr(FacePipeline, "ask_batch", real)
    seen: list[int] = []

    def tracking(self, images, questions, params, *a, **k):
        seen.append(len(images))
        return real(self, images, questions, params, *a, **k)

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


def test_bad_item_becomes_an_error_record_not_a_crash(tmp_path, tiny_checkpoint):
    bins = [face(0, 0), face(0, 1), b"not an image", face(1, 1), face(2, 0), face(3, 1)]
    (tmp_path / "x.bin").write_bytes(pickle.dumps((bins, [True, True, False])))
    rc = main(["eval", "verify", str(tmp_path / "x.bin"), "--checkpoint", str(tiny_checkpoint),
               "--out", str(tmp_path / "out"), "--max-tokens", "1"])
    assert rc == 0
    recs = {r["id"]: r for r in read_jsonl(tmp_path / "out" / "results.jsonl")}
    assert "cannot decode image" in recs["1"]["error"]
    assert "error" not in recs["0"] and "error" not in recs["2"]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["errors"] == 1 and summary["scored"] == 2


def test_remote_backend_runs_requests_concurrently(tmp_path, tiny_checkpoint):
    """The --url path's thread pool, with the server call standing in as a function that runs the
    real tiny pipeline (one at a time, as one model instance would) after a network-like delay."""
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    lock = threading.Lock()
    in_flight, peak = [0], [0]

    def ask_remote(url, image, question, params, protocol, logprobs=True):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            a = pipe.ask(image, question, params)
            in_flight[0] -= 1
        resp = {"text": a.text}
        if logprobs:
            lp = a.first_logits.double().log_softmax(0)
            top = lp.topk(20)
            resp["first_token_logprobs"] = {pipe.tokenizer.decode([int(i)]): float(v)
                                            for v, i in zip(top.values, top.indices)}
        return resp

    pairs = load_bin(write_bin(tmp_path / "rfw.bin", n=10))
    backend = RemoteBackend("localhost:8001", "grpc", concurrency=4, ask_remote=ask_remote)
    summary, _ = run_verify(pairs, ResultsLog(tmp_path / "a", {}), backend=backend, max_tokens=2)
    assert peak[0] > 1
    assert summary["scored"] == 10 and summary["score"] == "first-token P(yes)"
    # A server that returns no first-token log-probabilities: the parsed answer is the score.
    backend = RemoteBackend("localhost:8001", "grpc", concurrency=4,
                            ask_remote=lambda *a: ask_remote(*a, logprobs=False))
    summary, _ = run_verify(pairs, ResultsLog(tmp_path / "b", {}), backend=backend, max_tokens=2)
    assert summary["score"].startswith("parsed yes/no answer")


# ------------------------------------------------------------------------------- mcq runs

def test_mcq_end_to_end_tiny(tmp_path, tiny_checkpoint, count_batches, capsys):
    bench = write_facexbench(tmp_path)
    out = tmp_path / "out"
    rc = main(["eval", "mcq", str(bench), "--checkpoint", str(tiny_checkpoint), "--out", str(out),
               "--max-tokens", "4", "--concurrency", "8"])
    assert rc == 0
    asked = [q for c in count_batches for q in c]
    qs = load_facexbench(bench)
    # Single-image questions go as they are; the multi-image ones get the grid note.
    assert asked[0] == qs[0].prompt
    assert asked[3] == MULTI_IMAGE_NOTE.format(n=4) + qs[3].prompt
    recs = {r["id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert set(recs) == {q.id for q in qs}
    from runtime.eval.scoring import extract_option_letter

    for q in qs:
        r = recs[q.id]
        assert r["predicted"] == extract_option_letter(r["text"], q.options)
        assert r["correct"] == (r["predicted"] == "ABC"[int(q.id[-1]) - 1] if q.subtask == "attributes"
                                else r["predicted"] == "B")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["overall"]["total"] == 5
    assert summary["overall"]["correct"] == sum(r["correct"] for r in recs.values())
    assert set(summary["by_subtask"]) == {"attributes", "hr_fr"}
    assert summary["by_category"]["face_recognition"]["total"] == 2
    assert "overall" in capsys.readouterr().out


def test_mcq_summary_by_hand():
    from runtime.eval.datasets import MCQuestion

    def q(i, cat, sub):
        return MCQuestion(str(i), "", ["a", "b"], "A", [], cat, sub, "single")

    qs = [q(0, "c1", "s1"), q(1, "c1", "s1"), q(2, "c1", "s2"), q(3, "c2", "s3"), q(4, "c2", "s3")]
    recs = {"0": {"id": "0", "correct": True, "predicted": "A"}, "1": {"id": "1", "correct": False, "predicted": None},
            "2": {"id": "2", "correct": True, "predicted": "A"}, "3": {"id": "3", "error": "prompt too long"},
            "4": {"id": "4", "correct": True, "predicted": "A"}}
    s, text = summarize_mcq(qs, recs, "t")
    assert s["overall"] == {"correct": 3, "total": 5, "accuracy": 0.6}
    assert s["by_category"]["c1"] == {"correct": 2, "total": 3, "accuracy": 2 / 3}
    assert s["by_subtask"]["s3"] == {"correct": 1, "total": 2, "accuracy": 0.5}  # the error counts as wrong
    assert s["unparsed_answers"] == 1 and s["errors"] == 1
    assert "60.00%" in text


# ------------------------------------------------------------------------- attribute runs

def test_attributes_end_to_end_tiny(tmp_path, tiny_checkpoint, capsys):
    path = write_celeba(tmp_path / "celeba", n=5)
    out = tmp_path / "out"
    assert main(["eval", "attributes", str(path), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    # Independently: ask the pipeline about each image, threshold, count matches per attribute.
    pipe = FacePipeline.from_checkpoint(tiny_checkpoint)
    items = load_celeba_attributes(path)
    right = {"raw": np.zeros(40), "after": np.zeros(40)}
    for item in items:
        a = pipe.ask(item.path.read_bytes(), "Describe this person's face.", SamplingParams(max_new_tokens=1))
        for j, name in enumerate(CELEBA_ATTRIBUTES):
            right["raw"][j] += (a.attributes_raw[name] >= 0.5) == bool(item.labels[name])
            right["after"][j] += (a.attributes[name] >= 0.5) == bool(item.labels[name])
    assert summary["before_constraints"]["mean"] == pytest.approx(right["raw"].mean() / 5)
    assert summary["after_constraints"]["mean"] == pytest.approx(right["after"].mean() / 5)
    assert summary["before_constraints"]["per_attribute"]["Smiling"] == pytest.approx(
        right["raw"][CELEBA_ATTRIBUTES.index("Smiling")] / 5)
    assert "mean over 40 attributes" in capsys.readouterr().out


def test_attributes_refuses_facellm(tmp_path, tiny_facellm_checkpoint, capsys):
    path = write_celeba(tmp_path / "celeba", n=2)
    rc = main(["eval", "attributes", str(path), "--checkpoint", str(tiny_facellm_checkpoint),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "needs FaceInsight's attribute head" in capsys.readouterr().err


# ------------------------------------------------------------------------- --engines backend

def test_engines_backend_matches_the_checkpoint(tmp_path, tiny_checkpoint):
    """The same evaluation through an ONNX Runtime engines folder (built here from the tiny
    checkpoint) gives the torch run's P(yes) to fp32 tolerance, and the same attribute accuracies."""
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
        runs[where] = ({r["id"]: r for r in read_jsonl(out / "v" / "results.jsonl")},
                       json.loads((out / "a" / "summary.json").read_text()))
    (torch_v, torch_a), (ort_v, ort_a) = runs["--checkpoint"], runs["--engines"]
    for pid, r in torch_v.items():
        assert ort_v[pid]["p_yes"] == pytest.approx(r["p_yes"], rel=1e-4)
        assert ort_v[pid]["text"] == r["text"]
    assert ort_a["before_constraints"] == torch_a["before_constraints"]
    assert ort_a["after_constraints"] == torch_a["after_constraints"]
