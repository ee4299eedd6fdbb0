"""The benchmarks' native files (written here in their exact layouts, tiny synthetic faces): each
loader, format detection, folds, errors; then `facert eval verify` end to end on every format with
the face-embedding baseline, its metrics checked against brute force on independently computed
scores; CelebA's evaluation partition."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from eval_data import (
    brute_eer,
    brute_ten_fold,
    brute_tmr_at,
    independent_cosine,
    read_jsonl,
    write_bin,
    write_calfw,
    write_celeba,
    write_cfp,
    write_embedding_onnx,
    write_lfw,
    write_rfw,
)
from runtime.cli import main
from runtime.eval.datasets import load_celeba_attributes
from runtime.eval.pairs import DataError, detect_format, load_pairs


def as_tuples(pairs):
    return [(p.left, p.right, p.issame, p.fold) for p in pairs]


# ----------------------------------------------------------------------------------- loaders

@pytest.mark.parametrize("header", [True, False])
def test_lfw_pairs_txt_with_and_without_header(tmp_path, header):
    path, expected = write_lfw(tmp_path, sets=10, per_class=1, header=header)
    first = path.read_text().splitlines()[0]
    assert (first == "10\t1") == header
    for data in (path, tmp_path):  # the file, or the folder holding it
        pairs, fmt = load_pairs(data)
        assert fmt == "lfw"
        assert as_tuples(pairs) == expected  # images found in lfw/ beside pairs.txt; set k is fold k
    lines = path.read_text().splitlines()
    if header:
        path.write_text("\n".join(lines[:-1]) + "\n")
        with pytest.raises(DataError, match="= 20 lines, found 19"):
            load_pairs(path)
    else:
        path.write_text("\n".join(lines[:2] + ["Person_0\tone\t2"] + lines[3:]) + "\n")
        with pytest.raises(DataError, match=r"pairs.txt:3: expected `name n1 n2`"):
            load_pairs(path)
        path.write_text("\n".join(lines) + "\n")
        shutil.move(tmp_path / "lfw", tmp_path / "elsewhere")
        with pytest.raises(DataError, match=r"40 images listed .* are missing, e\.g\. .*\(pass --images"):
            load_pairs(path)
        pairs, _ = load_pairs(path, images=tmp_path / "elsewhere")
        assert pairs[0].left == tmp_path / "elsewhere" / "Person_0" / "Person_0_0001.jpg"


def test_rfw_every_race_or_one(tmp_path):
    test, expected = write_rfw(tmp_path, races=("African", "Indian"), per_class=10)
    lines = (test / "txts" / "African" / "African_pairs.txt").read_text().splitlines()
    assert {len(ln.split("\t")) for ln in lines} == {3, 4}  # tab-separated, no header
    for data in (test, tmp_path):  # RFW's test/ folder, or the folder above it
        pairs, fmt = load_pairs(data)
        assert fmt == "rfw"
        assert [p.group for p in pairs] == ["African"] * 20 + ["Indian"] * 20
        assert pairs[0].id == "African/0" and pairs[20].id == "Indian/0"
        assert as_tuples(pairs) == expected["African"] + expected["Indian"]
    one, fmt = load_pairs(test / "txts" / "Indian" / "Indian_pairs.txt")
    assert fmt == "rfw" and as_tuples(one) == expected["Indian"] and {p.group for p in one} == {"Indian"}
    (test / "data" / "Indian" / one[3].left.parent.name / one[3].left.name).unlink()
    with pytest.raises(DataError, match=r"1 images listed .* missing, e\.g\. .*m\.0in.*\(pass --images DIR: RFW's data/"):
        load_pairs(test)


@pytest.mark.parametrize("name,image_dir", [("CALFW", "aligned images"), ("CPLFW", "images")])
def test_calfw_cplfw_two_lines_per_pair(tmp_path, name, image_dir):
    path, expected = write_calfw(tmp_path, name=name, image_dir=image_dir, per_fold=2)
    text = path.read_text().splitlines()
    assert len(text) == 2 * 40 and text[0].endswith(" 1") and text[-1].endswith(" 0")
    for data in (path, tmp_path):
        pairs, fmt = load_pairs(data)
        assert fmt == name.lower()
        # positives: the fold their label names; negatives: the k-th tenth in file order.
        assert as_tuples(pairs) == expected
    path.write_text("\n".join(text[:-1]) + "\n")
    with pytest.raises(DataError, match="79 lines, expected two per pair"):
        load_pairs(path)
    path.write_text("\n".join(text[:3] + [text[3].rsplit(" ", 1)[0] + " 7"] + text[4:]) + "\n")
    with pytest.raises(DataError, match="different labels"):
        load_pairs(path)


def test_cfp_protocol_folder(tmp_path):
    root, expected = write_cfp(tmp_path / "cfp-dataset", ids=12, per_fold=2)
    for data in (root, root / "Protocol", root / "Protocol" / "Pair_list_F.txt"):
        pairs, fmt = load_pairs(data)
        assert fmt == "cfp"
        assert as_tuples(pairs) == [(a.resolve(), b.resolve(), s, f) for a, b, s, f in expected["FP"]]
    ff, _ = load_pairs(root, cfp_protocol="FF")
    assert as_tuples(ff) == [(a.resolve(), b.resolve(), s, f) for a, b, s, f in expected["FF"]]
    assert all("/frontal/" in str(p.right) for p in ff) and all("/profile/" in str(p.right) for p in pairs)
    (root / "Protocol" / "Split" / "FP" / "03" / "same.txt").write_text("1;2\n")
    with pytest.raises(DataError, match=r"03/same.txt:1: expected `frontal index,profile index`"):
        load_pairs(root)
    (root / "Protocol" / "Split" / "FP" / "03" / "same.txt").write_text("1,999\n")
    with pytest.raises(DataError, match="index 999 is not in the image lists"):
        load_pairs(root)


def test_format_detection_and_override(tmp_path):
    bin_path = write_bin(tmp_path / "agedb_30.bin", n=4)
    assert detect_format(bin_path) == "bin"
    calfw, _ = write_calfw(tmp_path / "c", per_fold=1)
    renamed = calfw.with_name("my_list.txt")  # no telling name: detected from its first line
    calfw.rename(renamed)
    assert detect_format(renamed) == "calfw"
    assert load_pairs(renamed, images=tmp_path / "c" / "aligned images")[1] == "calfw"
    with pytest.raises(DataError, match="expected `name n1 n2`"):  # forced to the wrong format
        load_pairs(renamed, fmt="lfw")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no pair set recognised"):
        load_pairs(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_pairs(tmp_path / "missing.txt")


# ------------------------------------------------------------- end to end, against brute force

def _check_metrics(m: dict, scores, labels, folds):
    assert (m["pairs"], m["same"], m["different"]) == (len(labels), sum(labels), len(labels) - sum(labels))
    assert m["threshold_ten_fold"]["folds"] == pytest.approx(brute_ten_fold(scores, labels, folds))
    assert m["threshold_ten_fold"]["mean"] == pytest.approx(np.mean(brute_ten_fold(scores, labels, folds)))
    assert m["eer"]["eer"] == pytest.approx(brute_eer(scores, labels), abs=1e-12)
    for key, target in (("0.001", 1e-3), ("0.0001", 1e-4)):
        assert m["tmr_at_fmr"][key]["tmr"] == pytest.approx(brute_tmr_at(scores, labels, target))


def _expected_scores(expected, w):
    return [independent_cosine(*(x if isinstance(x, bytes) else x.read_bytes() for x in (a, b)), w)
            for a, b, _, _ in expected]


@pytest.mark.parametrize("fmt", ["lfw", "calfw", "cfp", "bin"])
def test_verify_embedding_baseline_on_each_format(tmp_path, fmt, capsys):
    onnx_path = tmp_path / "r50.onnx"
    w = write_embedding_onnx(onnx_path)
    if fmt == "lfw":
        data, expected = write_lfw(tmp_path / "d", sets=10, per_class=2, header=False)
    elif fmt == "calfw":
        data, expected = write_calfw(tmp_path / "d", per_fold=2)
    elif fmt == "cfp":
        data, expected = write_cfp(tmp_path / "d", ids=12, per_fold=2)
        expected = expected["FP"]
    else:
        data = write_bin(tmp_path / "cplfw.bin", n=24)
        pairs, _ = load_pairs(data)
        # insightface's verification.py: contiguous folds (KFold without shuffling), 24 -> 3,3,3,3,2,...
        folds = [f for f, size in enumerate([3] * 4 + [2] * 6) for _ in range(size)]
        expected = [(p.left, p.right, p.issame, f) for p, f in zip(pairs, folds)]
    out = tmp_path / "out"
    assert main(["eval", "verify", str(data), "--embedding-model", str(onnx_path), "--out", str(out)]) == 0
    scores = _expected_scores(expected, w)
    recs = read_jsonl(out / "results.jsonl")
    assert [r["score"] for r in recs] == pytest.approx(scores, rel=1e-4, abs=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    labels = [s for _, _, s, _ in expected]
    # Metrics from the scores the run recorded, checked against brute force with the protocol's folds.
    _check_metrics(summary["metrics"], [r["score"] for r in recs], labels, [f for *_, f in expected])
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "10-fold accuracy, threshold tuned on cosine" in printed and "TMR @ FMR 0.001" in printed


def test_verify_embedding_on_rfw_per_race_mean_and_std(tmp_path, capsys):
    onnx_path = tmp_path / "r50.onnx"
    w = write_embedding_onnx(onnx_path, seed=2)
    test, expected = write_rfw(tmp_path, per_class=10)
    out = tmp_path / "out"
    assert main(["eval", "verify", str(test), "--embedding-model", str(onnx_path), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    recs = {r["id"]: r for r in read_jsonl(out / "results.jsonl")}
    assert list(summary["groups"]) == ["African", "Asian", "Caucasian", "Indian"]
    means, eers = [], []
    for race, exp in expected.items():
        scores = [recs[f"{race}/{i}"]["score"] for i in range(len(exp))]
        assert scores == pytest.approx(_expected_scores(exp, w), rel=1e-4, abs=1e-5)
        labels, folds = [s for _, _, s, _ in exp], [f for *_, f in exp]
        _check_metrics(summary["groups"][race], scores, labels, folds)
        means.append(np.mean(brute_ten_fold(scores, labels, folds)))
        eers.append(brute_eer(scores, labels))
    across = summary["across_groups"]
    assert across["threshold_ten_fold.mean"]["mean"] == pytest.approx(np.mean(means))
    assert across["threshold_ten_fold.mean"]["std"] == pytest.approx(np.std(means))  # population std
    assert across["eer.eer"]["mean"] == pytest.approx(np.mean(eers))
    printed = capsys.readouterr().out
    assert "mean ± std across groups" in printed and "Caucasian" in printed


# ---------------------------------------------------------------------------------- CelebA

def test_celeba_scores_the_test_split_of_the_partition_file(tmp_path):
    partition = [0, 0, 1, 2, 2, 0, 2, 1]
    for layout in ("flat", "release"):
        path = write_celeba(tmp_path / layout, n=8, partition=partition, layout=layout)
        images, split = load_celeba_attributes(path)
        assert split == "test" and [a.id for a in images] == ["000004.jpg", "000005.jpg", "000007.jpg"]
        assert images[0].path.is_file()
        assert [a.id for a in load_celeba_attributes(path, split="val")[0]] == ["000003.jpg", "000008.jpg"]
        assert len(load_celeba_attributes(path, split="all")[0]) == 8
    # Without the partition file: every image, and a split cannot be asked for.
    path = write_celeba(tmp_path / "nopart", n=4)
    assert load_celeba_attributes(path) == (load_celeba_attributes(path)[0], "all")
    assert len(load_celeba_attributes(path)[0]) == 4
    with pytest.raises(DataError, match="--split test needs CelebA's list_eval_partition.txt"):
        load_celeba_attributes(path, split="test")
    # A partition file that misses an image, or is malformed.
    part = tmp_path / "flat" / "list_eval_partition.txt"
    part.write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(partition[:-1])))
    with pytest.raises(DataError, match="1 images of .* are not in .*000008.jpg"):
        load_celeba_attributes(tmp_path / "flat" / "list_attr_celeba.txt")
    part.write_text("000001.jpg 3\n")
    with pytest.raises(DataError, match="list_eval_partition.txt:1: expected `image partition`"):
        load_celeba_attributes(tmp_path / "flat" / "list_attr_celeba.txt")
