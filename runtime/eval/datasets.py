"""FaceXBench questions and CelebA attribute labels in the files they ship in, checked as they are read.

- FaceXBench JSON files (one file per dataset/subtask; its `benchmark/` folder of them is the benchmark).
- CelebA `list_attr_celeba.txt` with its image folder and, where present, `list_eval_partition.txt`
  (the test split is what is scored by default).

Face-verification pair sets are in `runtime.eval.pairs`. Every loader raises `DataError` with the
file and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.eval.pairs import DataError
from runtime.models.attributes import CELEBA_ATTRIBUTES

__all__ = ["DataError", "MCQuestion", "AttributeImage", "load_facexbench", "facexbench_prompt",
           "load_celeba_attributes"]


# --------------------------------------------------------------------------------------- mcq

@dataclass
class MCQuestion:
    id: str  # "<json file stem>/<question id>"
    prompt: str  # the full text asked, options included
    options: list[str]
    answer: str  # the correct option letter
    images: list[Path]
    category: str
    subtask: str  # the file's `sub-category`
    num_images: str
    source: Path  # the JSON file it came from


OPTION_LETTERS = "ABCDEFGHIJ"


def facexbench_prompt(data: dict, question: dict, prepend: bool) -> str:
    """The text FaceXBench's evaluate.py asks, each part ending in a newline: the tool context
    (tools_use), the task preamble (only with --prepend, its --prepend_text), the question, the
    answer instruction (`postpend_text`), then one `(A) option` line per option. The images go
    before it, each as its own image."""
    parts = []
    if data.get("category") == "tools_use" and data.get("context"):
        parts.append(data["context"])
    if prepend and data.get("prepend_text"):
        parts.append(data["prepend_text"])
    parts.append(question["question_text"])
    if data.get("postpend_text"):
        parts.append(data["postpend_text"])
    parts += [f"({OPTION_LETTERS[i]}) {opt}" for i, opt in enumerate(question["options"])]
    return "".join(part + "\n" for part in parts)


def load_facexbench(path: str | Path, prepend: bool = False) -> list[MCQuestion]:
    """One FaceXBench JSON file, or a folder of them (its `benchmark/` folder). Each file holds
    `category`, `sub-category`, `num_images`, `prepend_text`, `postpend_text`, [`context`] and
    `questions: {id: {image_paths, question_text, options, correct_answer_option, answer}}`;
    image paths are relative to the file's folder. Every FaceXBench question has at least one
    image (the tool-use questions a black one)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise DataError(f"{path} holds no .json files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{path} does not exist")
    out: list[MCQuestion] = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{f}: not JSON: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("questions"), dict):
            raise DataError(f"{f}: not a FaceXBench file (expected an object with a `questions` object)")
        for qid, q in data["questions"].items():
            where = f"{f}: question {qid}"
            for key in ("question_text", "options", "correct_answer_option", "image_paths"):
                if key not in q:
                    raise DataError(f"{where}: missing `{key}`")
            options = q["options"]
            if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
                raise DataError(f"{where}: `options` must be a list of 2 to {len(OPTION_LETTERS)} choices")
            letters = OPTION_LETTERS[:len(options)]
            answer = q["correct_answer_option"]
            if answer not in tuple(letters):  # compared as aggregate_results.py compares it: exactly
                raise DataError(f"{where}: correct_answer_option {answer!r} is not one of {', '.join(letters)}")
            paths = q["image_paths"]
            if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
                raise DataError(f"{where}: `image_paths` must be a non-empty list of paths")
            images = [f.parent / p for p in paths]
            missing = [p for p in images if not p.is_file()]
            if missing:
                raise DataError(f"{where}: image {missing[0]} does not exist")
            out.append(MCQuestion(f"{f.stem}/{qid}", facexbench_prompt(data, q, prepend), [str(o) for o in options],
                                  answer, images, str(data.get("category", "unknown")),
                                  str(data.get("sub-category", "unknown")), str(data.get("num_images", "unknown")), f))
    return out


# -------------------------------------------------------------------------------- attributes

@dataclass
class AttributeImage:
    id: str  # the image file name as listed
    path: Path
    labels: dict[str, int] = field(default_factory=dict)  # attribute -> 1 present / 0 absent


CELEBA_SPLITS = {"train": "0", "val": "1", "test": "2"}


def find_beside(path: Path, *candidates: str) -> Path | None:
    """The first of `candidates` (relative to path's folder) that exists."""
    return next((path.parent / c for c in candidates if (path.parent / c).exists()), None)


def read_celeba_partition(path: Path) -> dict[str, str]:
    """list_eval_partition.txt: `000001.jpg 0` per image (0 train, 1 val, 2 test)."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            raise DataError(f"{path}:{n}: expected `image partition` with partition 0, 1 or 2, got {line.strip()!r}")
        out[fields[0]] = fields[1]
    return out


def load_celeba_attributes(path: str | Path, images: str | Path | None = None, split: str | None = None,
                           partition: str | Path | None = None) -> tuple[list[AttributeImage], str]:
    """CelebA's list_attr_celeba.txt: the image count, the attribute names, then one row per
    image: `000001.jpg -1 1 1 -1 ...` (1 present, -1 absent). Returns (images, split scored).

    The split comes from `list_eval_partition.txt` (`partition`, default: beside the file or in
    `../Eval/`, as CelebA ships it): `split` train, val, test or all; by default test where the
    partition file is found, else all. Images are looked up in `images` (default:
    `img_align_celeba/` beside the file, or `../Img/img_align_celeba/`, else the file's folder).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    if split not in (None, "all", *CELEBA_SPLITS):
        raise DataError(f"split must be one of train, val, test, all; got {split!r}")
    lines = [ln.split() for ln in path.read_text().splitlines() if ln.strip()]
    if len(lines) < 2:
        raise DataError(f"{path}: expected a count line and an attribute-name line")
    try:
        count = int(lines[0][0])
    except ValueError:
        raise DataError(f"{path}: first line must be the image count, got {' '.join(lines[0])!r}") from None
    names = lines[1]
    unknown = [n for n in names if n not in CELEBA_ATTRIBUTES]
    if unknown:
        raise DataError(f"{path}: unknown attribute names {unknown[:3]} (expected CelebA's 40)")
    rows = lines[2:]
    if len(rows) != count:
        raise DataError(f"{path}: first line says {count} images, found {len(rows)} rows")
    root = Path(images) if images else (find_beside(path, "img_align_celeba", "../Img/img_align_celeba")
                                        or path.parent)
    out = []
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1 or any(v not in ("1", "-1") for v in row[1:]):
            raise DataError(f"{path}:{i + 3}: expected an image name and {len(names)} values of 1 or -1")
        out.append(AttributeImage(row[0], root / row[0], {n: int(v == "1") for n, v in zip(names, row[1:])}))

    partition = Path(partition) if partition else find_beside(path, "list_eval_partition.txt",
                                                              "../Eval/list_eval_partition.txt")
    if partition is not None and not partition.is_file():
        raise DataError(f"{partition} does not exist")
    if split is None:
        split = "test" if partition is not None else "all"
    if split != "all":
        if partition is None:
            raise DataError(f"--split {split} needs CelebA's list_eval_partition.txt (beside {path.name}, in "
                            "../Eval/, or --partition FILE)")
        parts = read_celeba_partition(partition)
        unlisted = [a.id for a in out if a.id not in parts]
        if unlisted:
            raise DataError(f"{len(unlisted)} images of {path} are not in {partition}, e.g. {unlisted[0]}")
        out = [a for a in out if parts[a.id] == CELEBA_SPLITS[split]]
        if not out:
            raise DataError(f"{partition} puts none of the images of {path} in the {split} split")
    missing = [a.path for a in out if not a.path.is_file()]
    if missing:
        hint = "" if images else " (pass --images DIR)"
        raise DataError(f"{len(missing)} images listed in {path} are missing, e.g. {missing[0]}{hint}")
    return out, split
