"""Evaluation metrics and answer parsing, against values computed independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.eval.metrics import (
    across_groups,
    attribute_accuracy,
    best_threshold,
    contiguous_folds,
    decision_correct,
    equal_error_rate,
    fold_accuracy_of_decisions,
    grouped_accuracy,
    plot_roc,
    roc_curve,
    ten_fold_accuracy,
    tmr_at_fmr,
    verification_metrics,
)
from runtime.eval.scoring import YesNoTokens, extract_option_letter, parse_yes_no, yes_no_from_logprobs, yes_no_probability


# ----------------------------------------------------------------------- brute-force references

def brute_rates(scores, labels):
    """[(threshold, FMR, FNMR)] at every distinct score and +inf, by plain loops."""
    out = []
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    for t in sorted(set(scores)) + [math.inf]:
        fmr = sum(1 for s in neg if s >= t) / len(neg)
        fnmr = sum(1 for s in pos if s < t) / len(pos)
        out.append((t, fmr, fnmr))
    return out


def brute_eer(scores, labels):
    return min(max(fmr, fnmr) for _, fmr, fnmr in brute_rates(scores, labels))


def brute_tmr_at(scores, labels, target):
    return max(1 - fnmr for _, fmr, fnmr in brute_rates(scores, labels) if fmr <= target)


def brute_accuracy(scores, labels, t):
    return sum(1 for s, y in zip(scores, labels) if (s >= t) == y) / len(scores)


@pytest.fixture
def random_scores():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.5
    # Same-person pairs score higher on average; rounding makes ties, which the metrics must handle.
    scores = np.round(np.where(labels, rng.normal(0.6, 0.2, 300), rng.normal(0.3, 0.2, 300)), 2)
    return scores.tolist(), labels.tolist()


def test_eer_and_tmr_match_brute_force(random_scores):
    scores, labels = random_scores
    eer, t = equal_error_rate(scores, labels)
    assert eer == pytest.approx(brute_eer(scores, labels), abs=1e-12)
    assert 0.0 < eer < 0.5
    # The returned threshold achieves it.
    fmr = np.mean([s >= t for s, y in zip(scores, labels) if not y])
    fnmr = np.mean([s < t for s, y in zip(scores, labels) if y])
    assert max(fmr, fnmr) == pytest.approx(eer)
    for target in (1e-3, 1e-2, 0.1, 0.3):
        r = tmr_at_fmr(scores, labels, target)
        assert r["tmr"] == pytest.approx(brute_tmr_at(scores, labels, target), abs=1e-12)
        assert r["fmr"] <= target
    # 300 pairs, about 150 different: FMR 1e-3 cannot be measured, FMR 1e-2 can.
    assert not tmr_at_fmr(scores, labels, 1e-3)["resolvable"]
    assert tmr_at_fmr(scores, labels, 1e-2)["resolvable"]


def test_eer_tmr_by_hand():
    # same: 0.9 0.8 0.4; different: 0.7 0.3 0.2
    scores = [0.9, 0.8, 0.4, 0.7, 0.3, 0.2]
    labels = [True, True, True, False, False, False]
    # t=0.8: FMR 0, FNMR 1/3; t=0.7: 1/3, 1/3; t=0.4: 1/3, 0; t=0.3: 2/3, 0 -> EER 1/3
    assert equal_error_rate(scores, labels)[0] == pytest.approx(1 / 3)
    assert tmr_at_fmr(scores, labels, 1e-3)["tmr"] == pytest.approx(2 / 3)
    assert tmr_at_fmr(scores, labels, 0.34)["tmr"] == pytest.approx(1.0)
    fmr, tmr, thr = roc_curve(scores, labels)
    assert thr[0] == math.inf and fmr[0] == 0 and tmr[0] == 0
    assert fmr[-1] == 1 and tmr[-1] == 1
    # A perfect separation has EER 0.
    assert equal_error_rate([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0])[0] == 0.0


def test_best_threshold_matches_brute_force_and_prefers_smallest(random_scores):
    scores, labels = random_scores
    t, acc = best_threshold(scores, labels)
    best = max(brute_accuracy(scores, labels, c) for c in sorted(set(scores)) + [math.inf])
    assert acc == pytest.approx(best)
    assert brute_accuracy(scores, labels, t) == pytest.approx(best)
    # Ties: 0.5 and 0.6 both separate perfectly; the smaller wins.
    assert best_threshold([0.6, 0.5, 0.2, 0.1], [True, True, False, False]) == (0.5, 1.0)


def test_folds_are_contiguous_blocks_like_kfold():
    # sklearn KFold(10, shuffle=False) on 23 items: three folds of 3, then seven of 2.
    ids = contiguous_folds(23).tolist()
    assert [ids.count(f) for f in range(10)] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert ids[:4] == [0, 0, 0, 1] and ids[-2:] == [9, 9] and ids == sorted(ids)
    assert [contiguous_folds(6000).tolist().count(f) for f in range(10)] == [600] * 10
    with pytest.raises(ValueError, match="at least 10"):
        contiguous_folds(9)


def test_ten_fold_against_hand_computation():
    # 20 pairs, folds of 2: (same, different). Every fold is same=0.8 / different=0.2, except
    # fold 0, which is inverted (same=0.1, different=0.9).
    scores = [0.1, 0.9] + [0.8, 0.2] * 9
    labels = [True, False] * 10
    r = ten_fold_accuracy(scores, labels)
    # Held-out fold 0: the nine others separate perfectly at 0.8 (0.2 accepts the different
    # pairs too: 50%) -> fold 0 scored with 0.8 gets both wrong: 0%.
    # Held-out fold k>0: training accuracies over 18 pairs: t=0.1 9/18, 0.2 8/18, 0.8 16/18,
    # 0.9 8/18, inf 9/18 -> 0.8, which gets the held-out fold right: 100%.
    assert r["thresholds"] == [0.8] * 10
    assert r["folds"] == [0.0] + [1.0] * 9
    assert r["mean"] == pytest.approx(0.9)
    assert r["std"] == pytest.approx(0.3)  # population std: sqrt((0.81 + 9 * 0.01) / 10)


def brute_ten_fold(scores, labels, fold_of):
    """Per fold: the threshold (smallest on ties) best on the other folds, scored on this one."""
    accs = []
    for k in range(10):
        train = [i for i in range(len(scores)) if fold_of[i] != k]
        test = [i for i in range(len(scores)) if fold_of[i] == k]
        ts, tl = [scores[i] for i in train], [labels[i] for i in train]
        best = max(sorted(set(ts)) + [math.inf], key=lambda c: (brute_accuracy(ts, tl, c), -c))
        accs.append(brute_accuracy([scores[i] for i in test], [labels[i] for i in test], best))
    return accs


def test_ten_fold_matches_brute_force(random_scores):
    scores, labels = random_scores
    r = ten_fold_accuracy(scores, labels)
    accs = brute_ten_fold(scores, labels, [i * 10 // len(scores) for i in range(len(scores))])  # 30 per fold
    assert r["folds"] == pytest.approx(accs)
    assert r["mean"] == pytest.approx(np.mean(accs))
    assert r["std"] == pytest.approx(np.std(accs))


def test_ten_fold_with_the_data_sets_own_folds_matches_brute_force(random_scores):
    """Folds given per pair (CFP's Split folders, the text formats' stratified folds): interleaved
    here, so that contiguous blocks would give other numbers."""
    scores, labels = random_scores
    folds = [(7 * i) % 10 for i in range(len(scores))]
    r = ten_fold_accuracy(scores, labels, folds=folds)
    assert r["folds"] == pytest.approx(brute_ten_fold(scores, labels, folds))
    assert r["folds"] != pytest.approx(ten_fold_accuracy(scores, labels)["folds"])
    with pytest.raises(ValueError, match="cover folds 0..9"):
        ten_fold_accuracy(scores, labels, folds=[f % 9 for f in folds])


def test_decision_accuracy_counts_neither_as_wrong():
    labels = [True, True, False, False, True, False]
    decisions = [True, None, False, True, False, None]
    assert decision_correct(decisions, labels).tolist() == [True, False, True, False, False, False]
    r = fold_accuracy_of_decisions(decisions, labels, k=3, folds=[0, 0, 1, 1, 2, 2])
    assert r["folds"] == [0.5, 0.5, 0.0]
    assert r["mean"] == pytest.approx(1 / 3) and r["std"] == pytest.approx(np.std([0.5, 0.5, 0.0]))


def test_verification_metrics_brute_force(random_scores):
    scores, labels = random_scores
    rng = np.random.default_rng(3)
    decisions = [None if u < 0.1 else bool(s >= 0.45) for u, s in zip(rng.random(len(scores)), scores)]
    folds = [i % 10 for i in range(len(scores))]
    m = verification_metrics(labels, scores, decisions, folds)
    right = [d is not None and d == y for d, y in zip(decisions, labels)]
    assert m["decision_accuracy"] == pytest.approx(sum(right) / len(right))
    assert m["answers_neither"] == decisions.count(None)
    per_fold = [np.mean([r for r, f in zip(right, folds) if f == k]) for k in range(10)]
    assert m["decision_folds"]["mean"] == pytest.approx(np.mean(per_fold))
    assert m["threshold_ten_fold"]["folds"] == pytest.approx(brute_ten_fold(scores, labels, folds))
    assert m["eer"]["eer"] == pytest.approx(brute_eer(scores, labels))
    assert m["tmr_at_fmr"]["0.001"]["tmr"] == pytest.approx(brute_tmr_at(scores, labels, 1e-3))
    # Without scores (a server that returns no first-token probabilities): the decisions only.
    m = verification_metrics(labels, None, decisions, folds)
    assert m["decision_accuracy"] == pytest.approx(sum(right) / len(right))
    assert m["threshold_ten_fold"] is None and m["eer"] is None and "first-token" in m["notes"][-1]


def test_verification_metrics_handles_one_class_and_few_pairs():
    m = verification_metrics([True] * 12, [0.9] * 12, decisions=[True] * 6 + [False] * 6)
    assert m["eer"] is None and any("both" in n for n in m["notes"])
    assert m["decision_accuracy"] == 0.5
    # 12 pairs: folds [0:2] [2:4] [4] [5] ... [11]; the first six decisions are right.
    assert m["decision_folds"]["folds"] == [1.0] * 4 + [0.0] * 6
    m = verification_metrics([True, False] * 3, [0.9, 0.1] * 3)
    assert m["threshold_ten_fold"] is None and any("at least 10" in n for n in m["notes"])
    assert m["eer"]["eer"] == 0.0


def test_across_groups_mean_and_population_std():
    per = {"African": {"decision_accuracy": 0.8, "eer": {"eer": 0.2}}, "Asian": {"decision_accuracy": 0.9, "eer": None},
           "Caucasian": {"decision_accuracy": 0.95, "eer": {"eer": 0.1}}, "Indian": {"decision_accuracy": 0.85}}
    a = across_groups(per, ("decision_accuracy", "eer.eer", "threshold_ten_fold.mean"))
    vals = [0.8, 0.9, 0.95, 0.85]
    assert a["decision_accuracy"]["mean"] == pytest.approx(sum(vals) / 4)
    assert a["decision_accuracy"]["std"] == pytest.approx(math.sqrt(sum((v - 0.875) ** 2 for v in vals) / 4))
    assert a["eer.eer"] == {"mean": pytest.approx(0.15), "std": pytest.approx(0.05), "groups": 2}
    assert a["threshold_ten_fold.mean"] is None


def test_roc_plot_writes_png(tmp_path, random_scores):
    scores, labels = random_scores
    fmr, tmr, _ = roc_curve(scores, labels)
    plot_roc({"model": (fmr, tmr)}, tmp_path / "roc.png", "ROC")
    assert (tmp_path / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grouped_and_attribute_accuracy_by_hand():
    recs = [{"cat": "a", "correct": True}, {"cat": "a", "correct": False}, {"cat": "b", "correct": True}]
    g = grouped_accuracy(recs, "cat")
    assert g == {"a": {"correct": 1, "total": 2, "accuracy": 0.5}, "b": {"correct": 1, "total": 1, "accuracy": 1.0}}
    labels = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.6, 0.1], [0.5, 0.4], [0.1, 0.7]])
    # attribute 0: right, wrong (0.6 >= 0.5), right (0.5 counts as present), right -> 3/4
    # attribute 1: right, right, wrong, right -> 3/4
    r = attribute_accuracy(labels, probs, ["x", "y"])
    assert r["per_attribute"] == {"x": 0.75, "y": 0.75} and r["mean"] == 0.75


# ---------------------------------------------------------------------------- answer parsing

OPTIONS = ["Images 1 and 2", "Images 4 and 5", "Images 1 and 4", "Images 5 and 4"]
LETTER_TABLE = [
    ("A", "A"), ("(B)", "B"), ("Option C", "C"), ("option d", "D"), ("D.", "D"), ("B:", "B"),
    ("C) Images 1 and 4", "C"), ("B - because", "B"), ("  (A) Images 1 and 2", "A"),
    ("The answer is B", "B"), ("The answer is (c).", "C"), ("Answer: D", "D"),
    ("The correct answer is: (B) Images 4 and 5", "B"), ("I think it is C.", "C"),
    ("A man and a woman; the answer is b.", "B"), ("A person. Answer: C", "C"),
    ("the answer is a man", None),
    ("Images 5 and 4", "D"), ("images 1 and 4.", "C"), ("Images 1 and 2 or images 1 and 4", None),
    ("E", None), ("", None), ("I cannot tell.", None),
]


@pytest.mark.parametrize("text,expected", LETTER_TABLE)
def test_option_letter_from_free_text(text, expected):
    assert extract_option_letter(text, OPTIONS) == expected


def test_option_letters_limited_to_the_options():
    assert extract_option_letter("C", ["yes", "no"]) is None
    assert extract_option_letter("no", ["yes", "no"]) == "B"  # the option text, when no letter


@pytest.mark.parametrize("text,expected", [
    ("Yes", True), ("yes.", True), (" No, they differ", False), ("NO", False), ("Yes, no doubt", True),
    ("I think not", None), ("", None), ("nobody knows", None), ("They are; yes", True),
])
def test_yes_no_parse(text, expected):
    assert parse_yes_no(text) is expected


def test_yes_no_token_sets_and_probability():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["yes", "Yes", "YES", "yes.", "yesterday", "y", "ye", "no", "No", "not", "none", "n", "now", "maybe"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["[UNK]"] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    sets = YesNoTokens(tok)
    assert sorted(words[i] for i in sets.yes) == sorted(["yes", "Yes", "YES", "yes.", "y", "ye"])
    assert sorted(words[i] for i in sets.no) == sorted(["no", "No", "n"])
    logits = np.log(np.arange(1, len(vocab) + 1, dtype=np.float64))  # p_i proportional to i + 1
    p = np.arange(1, len(vocab) + 1) / np.arange(1, len(vocab) + 1).sum()
    p_yes, p_no = yes_no_probability(logits, sets)
    assert p_yes == pytest.approx(sum(p[vocab[w]] for w in ["yes", "Yes", "YES", "yes.", "y", "ye"]))
    assert p_no == pytest.approx(sum(p[vocab[w]] for w in ["no", "No", "n"]))
    # Server-side top-k log-probabilities.
    got = yes_no_from_logprobs({" Yes": math.log(0.6), "No": math.log(0.3), "Not": math.log(0.05)})
    assert got == pytest.approx((0.6, 0.3))
    assert yes_no_from_logprobs([{"token": "yes", "logprob": math.log(0.5)}]) == pytest.approx((0.5, 0.0))
    assert yes_no_from_logprobs(None) is None
