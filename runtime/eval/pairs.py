"""Face-verification pair sets in the files each benchmark ships, read safely.

Formats (`facert eval verify --format NAME`, or detected from DATA, see `detect_format`):

  bin    insightface `.bin` packs (lfw, cfp_fp, agedb_30, calfw, cplfw, ...): a pickle of
         `(bins, issame)`, where `bins` holds 2N encoded images (pair i is bins[2i], bins[2i+1])
         and `issame` N booleans. Pickles can run code when loaded, so these are read with
         `SafeUnpickler`, which admits plain containers and a bool-only numpy array and refuses
         every other global before anything is called.
  lfw    LFW's `pairs.txt`: an optional header (`SETS<TAB>N` or `N`), then per line
         `name<TAB>n1<TAB>n2` (same person) or `name1<TAB>n1<TAB>name2<TAB>n2` (different);
         images `IMAGES/name/name_<n:04d>.jpg` (default IMAGES: `lfw/` beside the file, else
         the file's folder).
  rfw    RFW (Racial Faces in-the-Wild), as its `test/` folder ships: `txts/<Race>/<Race>_pairs.txt`
         per race (LFW's lines without a header), images `data/<Race>/<id>/<id>_<n:04d>.jpg`.
         DATA is the folder holding `txts/` and `data/` (every race; its parent also works) or
         one race's `<Race>_pairs.txt`. Results are per race, with the mean and standard
         deviation across races.
  calfw / cplfw  `pairs_CALFW.txt` / `pairs_CPLFW.txt`: two lines per pair, `image.jpg label`,
         label > 0 for the same person (the positive pair's fold, 1..10) and 0 for different;
         images in `aligned images/` (or `images/`) beside the file.
  cfp    CFP's protocol folder: `Protocol/Pair_list_F.txt` and `Pair_list_P.txt` (`index path`,
         paths relative to `Protocol/`), `Protocol/Split/FP/01..10/same.txt, diff.txt`
         (`frontal index,profile index` per line); `FF` (frontal-frontal) by choice.

Folds (for the 10-fold figures): a `.bin` has none, and is cut into contiguous blocks as
insightface's verification.py does. CFP names its folds. For the text formats, fold k is the k-th
tenth (in file order) of the same-person pairs together with the k-th tenth of the
different-person pairs: LFW's ten sets exactly, CALFW/CPLFW's positive folds (labels 1..10,
listed in order; their negatives carry no fold, so they are split in file order), and RFW's.

Every loader checks its input and raises `DataError` naming the file, line and reason.
"""

from __future__ import annotations

import io
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMATS = ("bin", "lfw", "rfw", "calfw", "cplfw", "cfp")
FOLDS = 10
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DataError(ValueError):
    """Evaluation data that cannot be used: missing, malformed, or refused as unsafe."""


@dataclass
class Pair:
    id: str
    issame: bool
    left: bytes | Path  # encoded image bytes (.bin) or a path, read when scored
    right: bytes | Path
    fold: int | None = None  # 0-based; None: contiguous folds over the whole set
    group: str | None = None  # RFW: the race

    def images(self) -> list[bytes]:
        return [x if isinstance(x, bytes) else Path(x).read_bytes() for x in (self.left, self.right)]


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


# ------------------------------------------------------------------------------- text formats

def kfold_ids(n: int, k: int = FOLDS) -> list[int]:
    """Fold of each of n items in order, as sklearn's KFold(k, shuffle=False) cuts them: contiguous
    blocks, the first n % k one item larger."""
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    return [f for f, size in enumerate(sizes) for _ in range(size)]


def assign_stratified_folds(pairs: list[Pair], k: int = FOLDS) -> list[Pair]:
    """Fold f = the f-th tenth (file order) of the same pairs + the f-th tenth of the different ones."""
    for same in (True, False):
        members = [p for p in pairs if p.issame == same]
        for p, f in zip(members, kfold_ids(len(members), k)):
            p.fold = f
    return pairs


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-split fields) of the non-empty lines."""
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file") from None
    return [(n, ln.split()) for n, ln in enumerate(text.splitlines(), 1) if ln.strip()]


def _check_images(pairs: list[Pair], listing: Path, hint: str) -> None:
    missing = [p for pair in pairs for p in (pair.left, pair.right) if not Path(p).is_file()]
    if missing:
        raise DataError(f"{len(missing)} images listed in {listing} are missing, e.g. {missing[0]}{hint}")


def person_image(root: Path, name: str, number: str) -> Path:
    return root / name / f"{name}_{int(number):04d}.jpg"


def _is_int(x: str) -> bool:
    return re.fullmatch(r"\d+", x) is not None


def parse_person_pairs(path: Path, root: Path, id_prefix: str = "", group: str | None = None) -> list[Pair]:
    """LFW-style lines (`name n1 n2` / `name1 n1 name2 n2`) with an optional LFW header line."""
    lines = _lines(path)
    if not lines:
        raise DataError(f"{path} is empty")
    if all(_is_int(x) for x in lines[0][1]) and len(lines[0][1]) in (1, 2):
        header = [int(x) for x in lines[0][1]]
        sets, per_class = (header[0], header[1]) if len(header) == 2 else (1, header[0])
        lines = lines[1:]
        if len(lines) != sets * 2 * per_class:
            raise DataError(f"{path}: header says {sets} sets of {per_class} same + {per_class} different pairs "
                            f"= {sets * 2 * per_class} lines, found {len(lines)}")
    pairs = []
    for i, (n, fields) in enumerate(lines):
        if len(fields) == 3 and _is_int(fields[1]) and _is_int(fields[2]):
            a, b, same = person_image(root, fields[0], fields[1]), person_image(root, fields[0], fields[2]), True
        elif len(fields) == 4 and _is_int(fields[1]) and _is_int(fields[3]):
            a, b, same = person_image(root, fields[0], fields[1]), person_image(root, fields[2], fields[3]), False
        else:
            raise DataError(f"{path}:{n}: expected `name n1 n2` or `name1 n1 name2 n2`, got {' '.join(fields)!r}")
        pairs.append(Pair(f"{id_prefix}{i}", same, a, b, group=group))
    return assign_stratified_folds(pairs)


def load_lfw(path: Path, images: Path | None = None) -> list[Pair]:
    if images:
        root = Path(images)
    else:
        root = path.parent / "lfw" if (path.parent / "lfw").is_dir() else path.parent
    pairs = parse_person_pairs(path, root)
    _check_images(pairs, path, "" if images else " (pass --images DIR: the folder holding one subfolder per person)")
    return pairs


def _rfw_races(txts: Path) -> list[tuple[str, Path]]:
    return [(d.name, d / f"{d.name}_pairs.txt") for d in sorted(txts.iterdir())
            if d.is_dir() and (d / f"{d.name}_pairs.txt").is_file()]


def _rfw_test_folder(path: Path) -> Path | None:
    for cand in (path, path / "test"):
        if (cand / "txts").is_dir() and _rfw_races(cand / "txts"):
            return cand
    return None


def load_rfw(path: Path, images: Path | None = None) -> list[Pair]:
    """Every race of an RFW test folder, or one race's pairs file; `images`: the folder holding one
    folder per race (default: `data/` of the test folder)."""
    if path.is_dir():
        test = _rfw_test_folder(path)
        if test is None:
            raise DataError(f"{path}: no RFW txts/<Race>/<Race>_pairs.txt found (DATA is RFW's test/ folder)")
        races = _rfw_races(test / "txts")
    else:
        m = re.fullmatch(r"(.+)_pairs\.txt", path.name)
        if not m:
            raise DataError(f"{path}: an RFW pairs file is named <Race>_pairs.txt")
        races = [(m.group(1), path)]
        test = path.parent.parent.parent  # test/txts/<Race>/<Race>_pairs.txt
    data = Path(images) if images else test / "data"
    pairs = []
    for race, txt in races:
        pairs += parse_person_pairs(txt, data / race, id_prefix=f"{race}/", group=race)
    _check_images(pairs, path, "" if images else " (pass --images DIR: RFW's data/ folder, one subfolder per race)")
    return pairs


def load_calfw(path: Path, images: Path | None = None) -> list[Pair]:
    """pairs_CALFW.txt / pairs_CPLFW.txt: two lines per pair, `image label`; label > 0 same."""
    lines = _lines(path)
    if not lines:
        raise DataError(f"{path} is empty")
    if len(lines) % 2:
        raise DataError(f"{path}: {len(lines)} lines, expected two per pair")
    raw = []
    for (n1, a), (n2, b) in zip(lines[0::2], lines[1::2]):
        for n, fields in ((n1, a), (n2, b)):
            if len(fields) != 2 or not re.fullmatch(r"-?\d+", fields[1]):
                raise DataError(f"{path}:{n}: expected `image label`, got {' '.join(fields)!r}")
        if a[1] != b[1]:
            raise DataError(f"{path}:{n1}-{n2}: the two lines of a pair carry different labels ({a[1]}, {b[1]})")
        raw.append((a[0], b[0], int(a[1])))
    if images:
        root = Path(images)
    else:
        candidates = [path.parent / d for d in ("aligned images", "images", "aligned_images")] + [path.parent]
        root = next((d for d in candidates if (d / raw[0][0]).is_file()), candidates[0])
    pairs = [Pair(str(i), label > 0, root / a, root / b) for i, (a, b, label) in enumerate(raw)]
    assign_stratified_folds(pairs)
    positive_labels = [label for _, _, label in raw if label > 0]
    if set(positive_labels) == set(range(1, FOLDS + 1)):  # the positives name their fold: use it
        for p, label in zip((p for p in pairs if p.issame), positive_labels):
            p.fold = label - 1
    _check_images(pairs, path, "" if images else " (pass --images DIR: the folder holding the images)")
    return pairs


def _cfp_image_list(path: Path) -> dict[int, Path]:
    if not path.is_file():
        raise DataError(f"{path} does not exist (CFP's Protocol folder holds Pair_list_F.txt and Pair_list_P.txt)")
    out = {}
    for n, fields in _lines(path):
        if len(fields) != 2 or not _is_int(fields[0]):
            raise DataError(f"{path}:{n}: expected `index path`, got {' '.join(fields)!r}")
        out[int(fields[0])] = (path.parent / fields[1]).resolve()
    return out


def load_cfp(path: Path, images: Path | None = None, protocol: str = "FP") -> list[Pair]:
    """CFP: DATA is the dataset folder (holding Protocol/), Protocol/ itself, or a file in it."""
    if protocol not in ("FP", "FF"):
        raise DataError(f"CFP protocol is FP or FF, got {protocol!r}")
    proto = path if path.is_dir() else path.parent
    if (proto / "Protocol").is_dir():
        proto = proto / "Protocol"
    frontal = _cfp_image_list(proto / "Pair_list_F.txt")
    second = _cfp_image_list(proto / "Pair_list_P.txt") if protocol == "FP" else frontal
    if images:  # re-root the listed paths (`../Data/Images/...`) at IMAGES (the folder holding Data/)
        base = (proto.parent).resolve()
        rebase = lambda p: Path(images) / p.relative_to(base) if p.is_relative_to(base) else p  # noqa: E731
        frontal = {k: rebase(v) for k, v in frontal.items()}
        second = {k: rebase(v) for k, v in second.items()}
    split = proto / "Split" / protocol
    folds = sorted(d for d in split.iterdir() if d.is_dir() and _is_int(d.name)) if split.is_dir() else []
    if not folds:
        raise DataError(f"{split}: no fold folders (01..10 with same.txt and diff.txt)")
    pairs = []
    for fold, d in enumerate(folds):
        for kind, same in (("same", True), ("diff", False)):
            f = d / f"{kind}.txt"
            if not f.is_file():
                raise DataError(f"{f} does not exist")
            for j, (n, fields) in enumerate(_lines(f)):
                parts = "".join(fields).split(",")
                if len(parts) != 2 or not all(_is_int(x) for x in parts):
                    raise DataError(f"{f}:{n}: expected `frontal index,{'profile' if protocol == 'FP' else 'frontal'} "
                                    f"index`, got {' '.join(fields)!r}")
                a, b = int(parts[0]), int(parts[1])
                if a not in frontal or b not in second:
                    raise DataError(f"{f}:{n}: index {a if a not in frontal else b} is not in the image lists")
                pairs.append(Pair(f"{d.name}/{kind}/{j}", same, frontal[a], second[b], fold=fold))
    _check_images(pairs, split, "" if images else " (pass --images DIR: the folder holding Data/)")
    return pairs


# --------------------------------------------------------------------------------- detection

def detect_format(path: Path) -> str:
    """The format of DATA, from its name, its folder layout, or (a .txt) its first line."""
    if path.is_dir():
        if (path / "Protocol" / "Pair_list_F.txt").is_file() or (path / "Pair_list_F.txt").is_file():
            return "cfp"
        if _rfw_test_folder(path) is not None:
            return "rfw"
        for name, fmt in (("pairs_CALFW.txt", "calfw"), ("pairs_CPLFW.txt", "cplfw"), ("pairs.txt", "lfw")):
            if (path / name).is_file():
                return fmt
        raise DataError(f"{path}: no pair set recognised (looked for CFP's Protocol/, RFW's txts/, "
                        "pairs_CALFW.txt, pairs_CPLFW.txt, pairs.txt); name the file or pass --format")
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    name = path.name
    if path.suffix == ".bin":
        return "bin"
    if name.lower() in ("pairs_calfw.txt", "pairs_cplfw.txt"):
        return name.lower()[6:-4]
    if name in ("Pair_list_F.txt", "Pair_list_P.txt"):
        return "cfp"
    m = re.fullmatch(r"(.+)_pairs\.txt", name)
    if m and path.parent.name == m.group(1):  # RFW: txts/<Race>/<Race>_pairs.txt
        return "rfw"
    if path.suffix == ".txt":
        first = next((fields for _, fields in _lines(path)), [])
        if len(first) == 2 and first[0].lower().endswith(IMAGE_SUFFIXES):
            return "calfw"  # two lines per pair, `image label`
        return "lfw"
    raise DataError(f"{path}: verify reads {', '.join(FORMATS)} pair sets; pass --format if the name hides it")


def load_pairs(path: str | Path, fmt: str | None = None, images: str | Path | None = None,
               cfp_protocol: str = "FP") -> tuple[list[Pair], str]:
    """(pairs, format) of DATA (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    fmt = fmt or detect_format(path)
    images = Path(images) if images else None
    if fmt == "bin":
        return load_bin(path), fmt
    if fmt == "lfw":
        return load_lfw(path / "pairs.txt" if path.is_dir() else path, images), fmt
    if fmt == "rfw":
        return load_rfw(path, images), fmt
    if fmt in ("calfw", "cplfw"):
        return load_calfw(path / f"pairs_{fmt.upper()}.txt" if path.is_dir() else path, images), fmt
    if fmt == "cfp":
        return load_cfp(path, images, cfp_protocol), fmt
    raise DataError(f"unknown format {fmt!r}: one of {', '.join(FORMATS)}")
