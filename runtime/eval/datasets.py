"""Evaluation data in the formats the benchmarks ship in, read safely, and turned into items.

- insightface `.bin` pair sets (LFW, CALFW, CPLFW, CFP-FP, AgeDB-30, RFW): a pickle of
  `(bins, issame)`, where `bins` holds 2N encoded images (pair i is bins[2i], bins[2i+1]) and
  `issame` N booleans. Pickles can run code when loaded, so these are read with
  `SafeUnpickler`, which admits plain containers and a bool-only numpy array and refuses every
  other global before anything is called.
- LFW-style `pairs.txt` with an image folder (`DIR/name/name_0001.jpg`).
- FaceXBench JSON files (one file per dataset/subtask; a folder of them is the benchmark).
- CelebA `list_attr_celeba.txt` with an image folder.

Every loader checks its input and raises `DataError` with the file and the reason.
"""

from __future__ import annotations

import io
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from runtime.models.attributes import CELEBA_ATTRIBUTES
from runtime.preprocess import decode_image


class DataError(ValueError):
    """Evaluation data that cannot be used: missing, malformed, or refused as unsafe."""


# ------------------------------------------------------------------------ safe pickle loading

class _NdarrayToken:
    """What `numpy.ndarray` resolves to inside a .bin: a marker, not the class, so a pickle cannot
    call `ndarray(shape, dtype)` directly (it may only name it as `_reconstruct`'s first argument)."""


_NDARRAY = _NdarrayToken()
_BOOL_DTYPE_NAMES = ("b1", "?", "bool", b"b1", b"?", b"bool")


def _reconstruct_bool_array(subtype, shape, typecode):
    # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') followed by BUILD with the
    # real shape, dtype and bytes; only that exact call is admitted (a larger shape would let a
    # pickle allocate memory freely). The dtype the BUILD step can set is bool, see _bool_dtype.
    if subtype is not _NDARRAY or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise DataError(f"refused numpy _reconstruct{(subtype, shape, typecode)!r}: only plain arrays are admitted")
    return np.ndarray.__new__(np.ndarray, (0,), dtype=np.uint8)


def _bool_dtype(spec, align=False, copy=False):
    if spec not in _BOOL_DTYPE_NAMES:
        raise DataError(f"refused numpy dtype {spec!r}: a .bin may only carry bool arrays")
    # A fresh dtype object: the pickle's BUILD step calls __setstate__ on it, which must not touch
    # numpy's shared bool dtype.
    return np.dtype("b1", align=False, copy=True)


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes at pickle protocols <= 2 as _codecs.encode(str, 'latin1') (numpy's
    # array pickles carry their raw data this way). This stands in for _codecs.encode and does
    # only that one conversion.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"refused _codecs.encode with {type(text).__name__}, {encoding!r}")
    return text.encode("latin1")


# The only globals a .bin may name, each mapped to a safe stand-in defined above.
_ADMITTED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_bool_array,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_bool_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _bool_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Loads plain data (tuple, list, dict, str, bytes, int, float, bool, None) and bool numpy
    arrays; any other global (os.system, a class, a function) is refused by name, before it is
    imported or called."""

    def find_class(self, module: str, name: str):
        admitted = _ADMITTED_GLOBALS.get((module, name))
        if admitted is None:
            raise DataError(f"refused to load pickled global {module}.{name}: an insightface .bin holds only "
                            "encoded images and same/different flags, so this file is not one (or is malicious)")
        return admitted

    def persistent_load(self, pid):
        raise DataError("refused a pickle persistent id: not part of the insightface .bin format")


def safe_load_pickle(data: bytes):
    try:
        # encoding="bytes": Python 2 pickles store images as str, which must come back as bytes.
        return SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # truncated or garbage pickles raise many types
        raise DataError(f"not a readable pickle: {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------ verify

@dataclass
class Pair:
    id: str
    issame: bool
    left: bytes | Path  # encoded image bytes (.bin) or a path (pairs.txt), read when scored
    right: bytes | Path

    def images(self) -> tuple[bytes, bytes]:
        return tuple(x if isinstance(x, bytes) else Path(x).read_bytes() for x in (self.left, self.right))


def load_bin(path: str | Path) -> list[Pair]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        obj = safe_load_pickle(path.read_bytes())
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise DataError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if isinstance(issame, np.ndarray):
        if issame.dtype != np.bool_ or issame.ndim != 1:
            raise DataError(f"{path}: issame must be a 1-D bool array, got {issame.dtype} {issame.shape}")
        issame = issame.tolist()
    if not isinstance(bins, (list, tuple)) or not isinstance(issame, (list, tuple)):
        raise DataError(f"{path}: expected lists of images and flags, got {type(bins).__name__}, "
                        f"{type(issame).__name__}")
    bad = next((i for i, b in enumerate(bins) if not isinstance(b, (bytes, bytearray))), None)
    if bad is not None:
        raise DataError(f"{path}: image {bad} is {type(bins[bad]).__name__}, not encoded bytes")
    bad = next((i for i, s in enumerate(issame) if not isinstance(s, (bool, int)) or s not in (0, 1)), None)
    if bad is not None:
        raise DataError(f"{path}: flag {bad} is {issame[bad]!r}, not a bool")
    if len(bins) != 2 * len(issame):
        raise DataError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    return [Pair(str(i), bool(s), bytes(bins[2 * i]), bytes(bins[2 * i + 1])) for i, s in enumerate(issame)]


def lfw_image_path(root: Path, name: str, number: str) -> Path:
    return root / name / f"{name}_{int(number):04d}.jpg"


def load_pairs_txt(path: str | Path, images: str | Path | None = None) -> list[Pair]:
    """LFW's pairs.txt: a header `SETS<TAB>N` (or just `N`: one set), then per set N same-person
    lines `name n1 n2` followed by N different-person lines `name1 n1 name2 n2`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    root = Path(images) if images else path.parent
    lines = [ln.split() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    if not lines:
        raise DataError(f"{path} is empty")
    try:
        header = [int(x) for x in lines[0]]
    except ValueError:
        raise DataError(f"{path}: header must be `SETS N` or `N`, got {' '.join(lines[0])!r}") from None
    sets, per_class = (header[0], header[1]) if len(header) == 2 else (1, header[0])
    expected = sets * 2 * per_class
    if len(lines) - 1 != expected:
        raise DataError(f"{path}: header says {sets} sets of {per_class} same + {per_class} different pairs "
                        f"= {expected} lines, found {len(lines) - 1}")
    pairs = []
    for i, fields in enumerate(lines[1:]):
        lineno = i + 2
        try:
            if len(fields) == 3:
                a, b = lfw_image_path(root, fields[0], fields[1]), lfw_image_path(root, fields[0], fields[2])
                same = True
            elif len(fields) == 4:
                a, b = lfw_image_path(root, fields[0], fields[1]), lfw_image_path(root, fields[2], fields[3])
                same = False
            else:
                raise ValueError
        except ValueError:
            raise DataError(f"{path}:{lineno}: expected `name n1 n2` or `name1 n1 name2 n2`, "
                            f"got {' '.join(fields)!r}") from None
        pairs.append(Pair(str(i), same, a, b))
    missing = [p for pair in pairs for p in (pair.left, pair.right) if not Path(p).is_file()]
    if missing:
        hint = "" if images else " (pass --images DIR: the folder holding one subfolder per person)"
        raise DataError(f"{len(missing)} images listed in {path} are missing, e.g. {missing[0]}{hint}")
    return pairs


def load_pairs(path: str | Path, images: str | Path | None = None) -> list[Pair]:
    path = Path(path)
    if path.suffix == ".bin":
        return load_bin(path)
    if path.suffix == ".txt":
        return load_pairs_txt(path, images)
    raise DataError(f"{path}: verify reads an insightface .bin or an LFW-style pairs .txt")


# --------------------------------------------------------------------------------------- mcq

@dataclass
class MCQuestion:
    id: str  # "<json file stem>/<question id>"
    prompt: str  # the full text asked, options included
    options: list[str]
    answer: str  # the correct option letter
    images: list[Path]
    category: str
    subtask: str
    num_images: str


OPTION_LETTERS = "ABCDEFGHIJ"


def facexbench_prompt(data: dict, question: dict, prepend: bool) -> str:
    """The question text as FaceXBench's own evaluate.py builds it: [tool context] [task preamble
    if asked] question, answer instruction, then `(A) option` lines."""
    parts = []
    if data.get("category") == "tools_use" and data.get("context"):
        parts.append(data["context"])
    if prepend and data.get("prepend_text"):
        parts.append(data["prepend_text"])
    parts.append(question["question_text"])
    if data.get("postpend_text"):
        parts.append(data["postpend_text"])
    parts += [f"({OPTION_LETTERS[i]}) {opt}" for i, opt in enumerate(question["options"])]
    return "\n".join(parts) + "\n"


def load_facexbench(path: str | Path, prepend: bool = False) -> list[MCQuestion]:
    """One FaceXBench JSON file, or a folder of them (its `benchmark/` folder). Each file holds
    `category`, `sub-category`, `num_images`, `prepend_text`, `postpend_text`, [`context`] and
    `questions: {id: {image_paths, question_text, options, correct_answer_option, answer}}`;
    image paths are relative to the file's folder."""
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
            for key in ("question_text", "options", "correct_answer_option"):
                if key not in q:
                    raise DataError(f"{where}: missing `{key}`")
            options = q["options"]
            if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
                raise DataError(f"{where}: `options` must be a list of 2 to {len(OPTION_LETTERS)} choices")
            letters = OPTION_LETTERS[:len(options)]
            answer = str(q["correct_answer_option"]).strip().upper()
            if answer not in letters:
                raise DataError(f"{where}: correct_answer_option {answer!r} is not one of {', '.join(letters)}")
            images = [f.parent / p for p in q.get("image_paths", [])]
            missing = [p for p in images if not p.is_file()]
            if missing:
                raise DataError(f"{where}: image {missing[0]} does not exist")
            out.append(MCQuestion(f"{f.stem}/{qid}", facexbench_prompt(data, q, prepend), [str(o) for o in options],
                                  answer, images, str(data.get("category", "unknown")),
                                  str(data.get("sub-category", "unknown")), str(data.get("num_images", "unknown"))))
    return out


# -------------------------------------------------------------------------------- attributes

@dataclass
class AttributeImage:
    id: str  # the image file name as listed
    path: Path
    labels: dict[str, int] = field(default_factory=dict)  # attribute -> 1 present / 0 absent


def load_celeba_attributes(path: str | Path, images: str | Path | None = None) -> list[AttributeImage]:
    """CelebA's list_attr_celeba.txt: the image count, the attribute names, then one row per
    image: `000001.jpg -1 1 1 -1 ...` (1 present, -1 absent). Images are looked up in `images`
    (default: `img_align_celeba/` beside the file, else the file's own folder)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist")
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
    if images:
        root = Path(images)
    else:
        root = path.parent / "img_align_celeba"
        root = root if root.is_dir() else path.parent
    out = []
    for i, row in enumerate(rows):
        if len(row) != len(names) + 1 or any(v not in ("1", "-1") for v in row[1:]):
            raise DataError(f"{path}:{i + 3}: expected an image name and {len(names)} values of 1 or -1")
        out.append(AttributeImage(row[0], root / row[0], {n: int(v == "1") for n, v in zip(names, row[1:])}))
    missing = [a.path for a in out if not a.path.is_file()]
    if missing:
        hint = "" if images else " (pass --images DIR)"
        raise DataError(f"{len(missing)} images listed in {path} are missing, e.g. {missing[0]}{hint}")
    return out


# ------------------------------------------------------------------------ multi-image prompts

COMPOSITE_TILE = 224
COMPOSITE_FILL = (127, 127, 127)


def composite(images: list[bytes], tile: int = COMPOSITE_TILE, numbered: bool = False) -> bytes:
    """Several images as one PNG, because the served models take one image per prompt.

    Layout (documented, fixed): each image is scaled to fit a `tile` x `tile` square keeping its
    aspect ratio and centred on mid-grey; tiles go left to right, top to bottom, in a grid of
    ceil(sqrt(N)) columns, so two images sit side by side (left = first). With `numbered`, each
    tile carries its 1-based number in its top-left corner (FaceXBench questions refer to
    "Image 2" and so on).
    """
    if not images:
        raise DataError("no images to compose")
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    canvas = Image.new("RGB", (cols * tile, rows * tile), COMPOSITE_FILL)
    draw = ImageDraw.Draw(canvas)
    for i, data in enumerate(images):
        img = ImageOps.contain(decode_image(data), (tile, tile), Image.BICUBIC)
        x, y = (i % cols) * tile, (i // cols) * tile
        canvas.paste(img, (x + (tile - img.width) // 2, y + (tile - img.height) // 2))
        if numbered:
            label = str(i + 1)
            box = draw.textbbox((x + 4, y + 2), label, font_size=max(12, tile // 10))
            draw.rectangle((box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2), fill=(255, 255, 255))
            draw.text((x + 4, y + 2), label, fill=(0, 0, 0), font_size=max(12, tile // 10))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
