"""FaceXBench as its own code scores it: the answer extraction of aggregate_results.py on a table
of tricky free-text answers, the prompt of evaluate.py, the totals by category, sub-category and
num_images, and the results written in its layout."""

from __future__ import annotations

import json

import pytest

from eval_data import write_facexbench
from runtime.eval.datasets import DataError, MCQuestion, facexbench_prompt, load_facexbench
from runtime.eval.scoring import extract_option_letter, facexbench_option
from runtime.eval.tasks import summarize_mcq, write_facexbench_results


def aggregate_results_rule(answer: str, options: list[str]) -> str | None:
    """aggregate_results.py's extraction, re-implemented here from its description (not from
    facert's code): on the stripped answer, the first single ASCII letter with no word character
    (letter, digit, underscore) right before or after it that is one of the option labels A, B,
    ... (upper case: its labels are chr(ord('A') + i)); else the first option, in option order,
    whose stripped text appears in the answer, case-sensitively; else nothing."""
    labels = [chr(ord("A") + i) for i in range(len(options))]
    text = answer.strip()

    def is_word(c: str) -> bool:
        return c.isalnum() or c == "_"

    for i, c in enumerate(text):
        if c.isascii() and c.isalpha():
            alone = (i == 0 or not is_word(text[i - 1])) and (i == len(text) - 1 or not is_word(text[i + 1]))
            if alone and c in labels:
                return c
    for label, option in zip(labels, options):
        if option.strip() in text:
            return label
    return None


IMAGES = ["Images 1 and 2", "Images 4 and 5", "Images 1 and 4", "Images 5 and 4"]
EMOTIONS = ["Happy", "Sad", "Angry", "Neutral"]
AGES = ["20-29", "30-39", "40-49", "50-59"]
GENDERS = ["male", "female"]

# (answer, options, what aggregate_results.py extracts)
TABLE = [
    ("A man is shown in the image, so the answer is (C).", IMAGES, "A"),  # the article A counts
    ("The answer is (C).", IMAGES, "C"),
    ("(C)", IMAGES, "C"),
    ("C", IMAGES, "C"),
    ("c", IMAGES, None),  # lower case is no label
    ("the answer is c", EMOTIONS, None),
    ("b) Sad", EMOTIONS, "B"),  # no letter: the option text
    ("Images 1 and 4", IMAGES, "C"),
    ("Images 5 and 4 show the same person.", IMAGES, "D"),
    ("images 1 and 4", IMAGES, None),  # option text is matched case-sensitively
    ("B and C", IMAGES, "B"),  # two letters: the first
    ("C or B", IMAGES, "C"),
    ("I think B.", IMAGES, "B"),  # "I" is not an option label
    ("I", IMAGES, None),
    ("Option D", IMAGES, "D"),
    ("D.", IMAGES, "D"),
    ("Answer: B", IMAGES, "B"),
    ("Answer:C", IMAGES, "C"),
    ("**C**", IMAGES, "C"),
    ("\n   C   \n", IMAGES, "C"),
    ("E", IMAGES, None),  # a letter beyond the options
    ("", IMAGES, None),
    ("Neutral", EMOTIONS, "D"),
    ("The person looks Happy, maybe Sad.", EMOTIONS, "A"),
    ("Sad, not Happy", EMOTIONS, "A"),  # the first option in option order, not in the text
    ("female", GENDERS, "A"),  # "male" is in "female"
    ("30-39 years", AGES, "B"),
    ("Between 20-29 and 30-39", AGES, "A"),
    ("AB", IMAGES, None),  # not a standalone letter
    ("A1", IMAGES, None),  # a digit is a word character
    ("_A", IMAGES, None),  # so is the underscore
    ("Aé", IMAGES, None),  # and a non-ASCII letter
    ("Ａ", IMAGES, None),  # a full-width A is no ASCII letter
    ("(B)C", IMAGES, "B"),
    ("The correct option is B, not A.", IMAGES, "B"),
    ("None of the above", EMOTIONS, None),
    ("a) happy", EMOTIONS, None),
    ("D-", IMAGES, "D"),
    ("It's B", IMAGES, "B"),  # the "s" after the apostrophe stands alone but is lower case
    ("Image 2 (A)", IMAGES, "A"),
    ("B\nExplanation: A is wrong because ...", IMAGES, "B"),
    ("The images 1 and 2 show one person", IMAGES, None),
    ("Both look 40-49.", AGES, "C"),
]


@pytest.mark.parametrize("answer,options,expected", TABLE)
def test_facexbench_extraction_table(answer, options, expected):
    assert aggregate_results_rule(answer, options) == expected  # the table is the rule's
    assert facexbench_option(answer, options) == expected  # and facert reads it the same


def test_table_is_tricky_enough():
    assert len(TABLE) >= 30
    # Where facert's strict parser reads the answer differently from FaceXBench's own rule.
    differs = [a for a, opts, want in TABLE if extract_option_letter(a, opts) != want]
    assert "A man is shown in the image, so the answer is (C)." in differs
    assert extract_option_letter("A man is shown in the image, so the answer is (C).", IMAGES) == "C"


def test_prompt_as_evaluate_py_builds_it(tmp_path):
    bench = write_facexbench(tmp_path)
    qs = load_facexbench(bench)
    assert [q.id for q in qs] == ["celeba_single_mcq/1", "celeba_single_mcq/2", "celeba_single_mcq/3",
                                  "lfw_multiple_mcq/1", "lfw_multiple_mcq/2"]
    q = qs[0]
    assert (q.category, q.subtask, q.num_images, q.answer) == ("attributes_expression", "attributes", "single", "A")
    # question + '\n', postpend_text + '\n', then '(A) option\n' per option (the images go first).
    assert q.prompt == ("Which attribute is present?\n"
                        "Please answer the question and provide only the correct option letter, e.g., A, B, C, D.\n"
                        "(A) Smiling\n(B) Eyeglasses\n(C) Bald\n(D) Wearing_Hat\n")
    assert load_facexbench(bench, prepend=True)[0].prompt.startswith("Facial attribute prediction is the task of ...\n"
                                                                      "Which attribute")
    assert qs[3].images == [bench / f"images/lfw_multiple_mcq/question_1_{k}.png" for k in range(1, 5)]
    tools = {"category": "tools_use", "context": "API list", "postpend_text": "Letter only.",
             "questions": {"1": {"question_text": "Q?", "options": ["a", "b"], "correct_answer_option": "B"}}}
    assert facexbench_prompt(tools, tools["questions"]["1"], False) == "API list\nQ?\nLetter only.\n(A) a\n(B) b\n"


def test_question_files_are_checked(tmp_path):
    bench = write_facexbench(tmp_path)
    data = json.loads((bench / "lfw_multiple_mcq.json").read_text())
    data["questions"]["1"]["correct_answer_option"] = "b"  # compared exactly, as aggregate_results.py does
    (bench / "lfw_multiple_mcq.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="question 1: correct_answer_option 'b' is not one of A, B, C, D"):
        load_facexbench(bench)
    data["questions"]["1"]["correct_answer_option"] = "B"
    data["questions"]["1"]["image_paths"] = []
    (bench / "lfw_multiple_mcq.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="question 1: `image_paths` must be a non-empty list"):
        load_facexbench(bench)
    (bench / "images/celeba_single_mcq/question_2.png").unlink()
    with pytest.raises(DataError, match="question_2.png does not exist"):
        load_facexbench(bench / "celeba_single_mcq.json")


def _q(i, cat, sub, n, options=("cat", "dog")):
    return MCQuestion(str(i), "", list(options), "A", [], cat, sub, n, source=None)


def test_totals_as_aggregate_results_computes_them():
    qs = [_q(0, "c1", "s1", "single"), _q(1, "c1", "s1", "single"), _q(2, "c1", "s2", "multiple"),
          _q(3, "c2", "s3", "multiple"), _q(4, "c2", "s3", "single"), _q(5, "c2", "s3", "single")]
    recs = {"0": {"id": "0", "text": "A"}, "1": {"id": "1", "text": "I'd say a cat"},
            "2": {"id": "2", "text": "The answer is (B)."}, "3": {"id": "3", "error": "prompt too long"},
            "4": {"id": "4", "text": "A dog, so B"}}  # "5" never ran
    s, text = summarize_mcq(qs, recs, "facexbench", "t")
    # Correct: 0 ("A"), 1 (no label; "cat" is option A), 4 (the article A comes first). Wrong: 2 (B),
    # 3 (refused), 5 (no answer). Every question counts: 3 / 6.
    assert s["total"] == {"correct": 3, "total": 6, "accuracy": 50.0}
    assert s["category"]["c1"] == {"correct": 2, "total": 3, "accuracy": pytest.approx(200 / 3)}
    assert s["sub-category"]["s3"] == {"correct": 1, "total": 3, "accuracy": pytest.approx(100 / 3)}
    assert s["num_images"]["single"] == {"correct": 3, "total": 4, "accuracy": 75.0}
    assert s["answer_extraction"] == "FaceXBench's aggregate_results.py rule"
    assert (s["errors"], s["answered"], s["unparsed_answers"]) == (1, 4, 0)
    assert text.splitlines()[1] == "Total Accuracy: 50.00% (3/6)"
    assert "Sub-category Accuracies:\ns1: 100.00% (2/2)" in text and "Number of Images Accuracies:" in text
    # facert's strict parser on the same answers: "I'd say a cat" -> A (option text), "A dog, so B" -> B.
    strict, text = summarize_mcq(qs, recs, "strict", "t")
    assert strict["total"]["correct"] == 2 and strict["answer_extraction"] == "facert's strict parser"
    assert s["total_with_other_parser"]["correct"] == 2 and strict["total_with_other_parser"]["correct"] == 3


def test_results_in_facexbench_layout(tmp_path):
    bench = write_facexbench(tmp_path)
    qs = load_facexbench(bench)
    recs = {qs[0].id: {"id": qs[0].id, "text": "  B. Eyeglasses\n"}, qs[3].id: {"id": qs[3].id, "error": "refused"}}
    write_facexbench_results(qs, recs, tmp_path / "out")
    single = json.loads((tmp_path / "out" / "celeba_single_mcq.json").read_text())
    source = json.loads((bench / "celeba_single_mcq.json").read_text())
    assert single["questions"]["1"]["prediction"] == "B. Eyeglasses"  # stripped, as evaluate.py stores it
    assert single["questions"]["2"]["prediction"] == ""  # not run
    assert {k: v for k, v in single.items() if k != "questions"} == {k: v for k, v in source.items() if k != "questions"}
    assert json.loads((tmp_path / "out" / "lfw_multiple_mcq.json").read_text())["questions"]["1"]["prediction"] == ""
