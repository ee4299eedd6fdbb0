"""Evaluation data written in each benchmark's native layout (tiny synthetic faces), an ONNX
face-embedding model with known weights, and brute-force metric references.

Import into a test module with `from eval_data import ...`. Each writer returns what the test needs
to check the loader independently: the pairs it wrote, in order, as (left path/bytes, right, same,
fold) with the fold the benchmark's protocol gives them.
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from runtime.models.attributes import CELEBA_ATTRIBUTES

# ------------------------------------------------------------------------------------ images


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


def _put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- verification sets

def pair_plan(n: int) -> list[tuple[int, int, bool]]:
    """(identity a, identity b, same) for n pairs: blocks of same then different, as LFW orders them."""
    return [(i, i if (i // 3) % 2 == 0 else i + 500, (i // 3) % 2 == 0) for i in range(n)]


def write_bin(path: Path, n: int = 20, protocol: int = pickle.HIGHEST_PROTOCOL, issame_array: bool = False) -> Path:
    """An insightface .bin: pickle.dump((bins, issame_list), f) with encoded JPEG bytes."""
    bins, issame = [], []
    for a, b, same in pair_plan(n):
        bins += [face(a, 0), face(b, 1)]
        issame.append(same)
    with open(path, "wb") as f:
        pickle.dump((bins, np.array(issame) if issame_array else issame), f, protocol=protocol)
    return path


def write_lfw(root: Path, sets: int = 10, per_class: int = 1, header: bool = True) -> tuple[Path, list[tuple]]:
    """LFW: pairs.txt (header `SETS<TAB>N`, or none) and lfw/<name>/<name>_<n:04d>.jpg. Set k is fold k."""
    lines = [f"{sets}\t{per_class}"] if header else []
    expected, pid = [], 0
    images = root / "lfw"
    for fold in range(sets):
        for _ in range(per_class):
            name = f"Person_{pid}"
            a = _put(images / name / f"{name}_0001.jpg", face(pid, 1, size=250))
            b = _put(images / name / f"{name}_0002.jpg", face(pid, 2, size=250))
            lines.append(f"{name}\t1\t2")
            expected.append((a, b, True, fold))
            pid += 1
        for _ in range(per_class):
            n1, n2 = f"Person_{pid}", f"Person_{pid + 1}"
            a = _put(images / n1 / f"{n1}_0001.jpg", face(pid, 1, size=250))
            b = _put(images / n2 / f"{n2}_0003.jpg", face(pid + 1, 3, size=250))
            lines.append(f"{n1}\t1\t{n2}\t3")
            expected.append((a, b, False, fold))
            pid += 2
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root / "pairs.txt", expected


RFW_RACES = ("African", "Asian", "Caucasian", "Indian")


def write_rfw(root: Path, races=RFW_RACES, per_class: int = 10) -> tuple[Path, dict[str, list[tuple]]]:
    """RFW's test/ folder: txts/<Race>/<Race>_pairs.txt (tab-separated, no header, `id n1 n2` or
    `id1 n1 id2 n2`, Freebase-style ids) and data/<Race>/<id>/<id>_<n:04d>.jpg. Same and different
    pairs alternate in blocks of per_class / 10 (one block of each per fold)."""
    test = root / "test"
    expected: dict[str, list[tuple]] = {}
    for r, race in enumerate(races):
        data, lines, exp = test / "data" / race, [], []
        block = per_class // 10
        for fold in range(10):
            for same in (True, False):
                for j in range(block):
                    k = 1000 * (r + 1) + 100 * fold + 10 * same + j
                    a, b = f"m.0{race[:2].lower()}{k}", f"m.0{race[:2].lower()}{k}x"
                    pa = _put(data / a / f"{a}_0001.jpg", face(k, 1))
                    if same:
                        pb = _put(data / a / f"{a}_0004.jpg", face(k, 4))
                        lines.append(f"{a}\t1\t4")
                    else:
                        pb = _put(data / b / f"{b}_0002.jpg", face(k + 77777, 2))
                        lines.append(f"{a}\t1\t{b}\t2")
                    exp.append((pa, pb, same, fold))
        txt = test / "txts" / race / f"{race}_pairs.txt"
        txt.parent.mkdir(parents=True, exist_ok=True)
        txt.write_text("\n".join(lines) + "\n")
        expected[race] = exp
    return test, expected


def write_calfw(root: Path, name: str = "CALFW", image_dir: str = "aligned images",
                per_fold: int = 2) -> tuple[Path, list[tuple]]:
    """pairs_CALFW.txt as its authors ship it: two lines per pair (`image label`), every positive
    pair first, labelled with its fold 1..10 in order, then every negative pair, labelled 0; flat
    image folder `aligned images/` (Name_0001.jpg). The negatives carry no fold; the k-th tenth
    of them is fold k."""
    images = root / image_dir
    lines, expected = [], []
    for same in (True, False):
        for fold in range(10):
            for j in range(per_fold):
                k = 100 * fold + j + (50 if not same else 0)
                a_name, b_name = f"Person_{k}", (f"Person_{k}" if same else f"Other_{k}")
                a = _put(images / f"{a_name}_0001.jpg", face(k, 1))
                b = _put(images / f"{b_name}_000{3 if same else 2}.jpg", face(k if same else k + 9999, 3))
                label = fold + 1 if same else 0
                lines += [f"{a.name} {label}", f"{b.name} {label}"]
                expected.append((a, b, same, fold))
    path = root / f"pairs_{name}.txt"
    path.write_text("\n".join(lines) + "\n")
    return path, expected


def write_cfp(root: Path, ids: int = 12, per_fold: int = 2) -> tuple[Path, dict[str, list[tuple]]]:
    """CFP (cfp-dataset/): Data/Images/<id:03d>/frontal/NN.jpg and profile/NN.jpg;
    Protocol/Pair_list_F.txt and Pair_list_P.txt (`index ../Data/Images/...`, 1-based);
    Protocol/Split/{FP,FF}/01..10/same.txt and diff.txt (`i,j` per line). Returns the expected
    pairs per protocol, the fold being the folder."""
    data = root / "Data" / "Images"
    proto = root / "Protocol"
    proto.mkdir(parents=True)
    frontal, profile = [], []
    for i in range(1, ids + 1):
        for n in (1, 2):
            frontal.append(_put(data / f"{i:03d}" / "frontal" / f"{n:02d}.jpg", face(i, n)))
            profile.append(_put(data / f"{i:03d}" / "profile" / f"{n:02d}.jpg", face(i, 10 + n, size=100)))
    for name, items in (("Pair_list_F.txt", frontal), ("Pair_list_P.txt", profile)):
        (proto / name).write_text("".join(f"{k} ../Data/Images/{p.parent.parent.name}/{p.parent.name}/{p.name}\n"
                                          for k, p in enumerate(items, 1)))
    expected: dict[str, list[tuple]] = {"FP": [], "FF": []}
    rng = random.Random(5)
    for protocol, second in (("FP", profile), ("FF", frontal)):
        for fold in range(10):
            d = proto / "Split" / protocol / f"{fold + 1:02d}"
            d.mkdir(parents=True)
            for kind, same in (("same", True), ("diff", False)):
                rows = []
                for _ in range(per_fold):
                    i = rng.randrange(ids)
                    j = i if same else (i + 1 + rng.randrange(ids - 1)) % ids
                    a, b = 2 * i + 1, 2 * j + (2 if protocol == "FF" else 1)  # 1-based list indices
                    rows.append(f"{a},{b}")
                    expected[protocol].append((frontal[a - 1], second[b - 1], same, fold))
                (d / f"{kind}.txt").write_text("\n".join(rows) + "\n")
    return root, expected


# ------------------------------------------------------------------------ FaceXBench, CelebA

def write_facexbench(root: Path) -> Path:
    """Two FaceXBench files in its benchmark/ layout: one single-image, one with four images per question."""
    bench = root / "benchmark"
    single = {"category": "attributes_expression", "sub-category": "attributes", "dataset": "celeba",
              "question_type": "MCQ", "num_images": "single",
              "prepend_text": "Facial attribute prediction is the task of ...",
              "postpend_text": "Please answer the question and provide only the correct option letter, e.g., A, B, C, D.",
              "questions": {}}
    for q in range(1, 4):
        rel = f"images/celeba_single_mcq/question_{q}.png"
        _put(bench / rel, face(q, 0, fmt="PNG"))
        single["questions"][str(q)] = {"image_paths": [rel], "question_text": "Which attribute is present?",
                                       "options": ["Smiling", "Eyeglasses", "Bald", "Wearing_Hat"],
                                       "correct_answer_option": "ABC"[q - 1],
                                       "answer": ["Smiling", "Eyeglasses", "Bald"][q - 1]}
    multi = {"category": "face_recognition", "sub-category": "hr_fr", "dataset": "lfw", "question_type": "MCQ",
             "num_images": "multiple", "prepend_text": "High-resolution face recognition ...",
             "postpend_text": "Please answer the question and provide only the correct option letter, e.g., A, B, C, D.",
             "questions": {}}
    for q in range(1, 3):
        rels = []
        for k in range(1, 5):
            rel = f"images/lfw_multiple_mcq/question_{q}_{k}.png"
            _put(bench / rel, face(10 * q + k % 3, k, fmt="PNG"))
            rels.append(rel)
        multi["questions"][str(q)] = {"image_paths": rels, "question_text": "Which two images show the same person?",
                                      "options": ["Images 1 and 2", "Images 1 and 4", "Images 2 and 3", "Images 3 and 4"],
                                      "correct_answer_option": "B", "answer": "Images 1 and 4"}
    (bench / "celeba_single_mcq.json").write_text(json.dumps(single, indent=4))
    (bench / "lfw_multiple_mcq.json").write_text(json.dumps(multi, indent=4))
    return bench


def write_celeba(root: Path, n: int = 6, seed: int = 0, partition: list[int] | None = None,
                 layout: str = "flat") -> Path:
    """list_attr_celeba.txt (count, the 40 names, `000001.jpg -1  1 ...` rows), the images and,
    with `partition`, list_eval_partition.txt (`000001.jpg 0`; 0 train, 1 val, 2 test). layout
    "flat": everything in root (img_align_celeba/ beside the lists); "release": as CelebA's
    download is laid out, Anno/list_attr_celeba.txt, Eval/list_eval_partition.txt,
    Img/img_align_celeba/. Returns the attribute list's path."""
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 1], size=(n, 40))
    anno, evl, img = (root, root, root / "img_align_celeba") if layout == "flat" else \
        (root / "Anno", root / "Eval", root / "Img" / "img_align_celeba")
    rows = []
    for i in range(n):
        name = f"{i + 1:06d}.jpg"
        _put(img / name, face(i, 0, size=96))
        rows.append(name + " " + " ".join(f"{v:2d}" for v in labels[i]))
    anno.mkdir(parents=True, exist_ok=True)
    (anno / "list_attr_celeba.txt").write_text(f"{n}\n" + " ".join(CELEBA_ATTRIBUTES) + " \n" + "\n".join(rows) + "\n")
    if partition is not None:
        evl.mkdir(parents=True, exist_ok=True)
        (evl / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partition)))
    return anno / "list_attr_celeba.txt"


# ----------------------------------------------------------------------- face-embedding model

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


def independent_cosine(a_data: bytes, b_data: bytes, w: np.ndarray) -> float:
    a, b = independent_embedding(a_data, w), independent_embedding(b_data, w)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ------------------------------------------------------------------ brute-force references

def brute_accuracy(scores, labels, t) -> float:
    return sum(1 for s, y in zip(scores, labels) if (s >= t) == y) / len(scores)


def brute_rates(scores, labels):
    """[(threshold, FMR, FNMR)] at every distinct score and +inf, by plain loops."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return [(t, sum(1 for s in neg if s >= t) / len(neg), sum(1 for s in pos if s < t) / len(pos))
            for t in sorted(set(scores)) + [math.inf]]


def brute_eer(scores, labels) -> float:
    return min(max(fmr, fnmr) for _, fmr, fnmr in brute_rates(scores, labels))


def brute_tmr_at(scores, labels, target) -> float:
    return max(1 - fnmr for _, fmr, fnmr in brute_rates(scores, labels) if fmr <= target)


def brute_ten_fold(scores, labels, fold_of, k: int = 10) -> list[float]:
    """Per fold: the threshold (smallest on ties) best on the other folds, scored on this one."""
    accs = []
    for f in range(k):
        train = [i for i in range(len(scores)) if fold_of[i] != f]
        test = [i for i in range(len(scores)) if fold_of[i] == f]
        ts, tl = [scores[i] for i in train], [labels[i] for i in train]
        best = max(sorted(set(ts)) + [math.inf], key=lambda c: (brute_accuracy(ts, tl, c), -c))
        accs.append(brute_accuracy([scores[i] for i in test], [labels[i] for i in test], best))
    return accs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
