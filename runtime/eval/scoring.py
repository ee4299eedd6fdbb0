"""Turning model outputs into scores and answers.

- Yes/no: `YesNoTokens` finds the vocabulary entries that start a "yes" or a "no" answer, and
  `yes_no_probability` reads P(yes) and P(no) from the first generated token's logits: softmax over
  the whole vocabulary, then the sum over each set. A token counts for "yes" when its text, with
  surrounding whitespace removed and lower-cased, is "yes" followed by nothing or a non-letter
  ("Yes", " yes", "yes.", "YES,") or a leading piece of "yes" ("y", "ye": tokenizers that spell
  words in pieces start "yes" with one); "no" likewise ("No", " no", "n"), so "not"/"none"/"now"
  do not count. `parse_yes_no` reads the decision from the generated text.
- Multiple choice: `facexbench_option` reads the chosen option from free text exactly as
  FaceXBench's aggregate_results.py does (the default of `facert eval mcq`);
  `extract_option_letter` is facert's stricter reading (`--answer-parser strict`).
- Face embeddings: `OnnxFaceEmbedder` runs a face-recognition ONNX model (the specialist baseline).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.preprocess import decode_image


def _answer_word_matches(text: str, word: str) -> bool:
    t = text.strip().lower()
    if not t:
        return False
    if word.startswith(t):  # "y", "ye", "yes"; "n", "no"
        return True
    return t.startswith(word) and not t[len(word)].isalpha()


class YesNoTokens:
    """Token ids whose text starts a yes or a no answer, for one tokenizer."""

    def __init__(self, tokenizer, vocab_size: int | None = None):
        n = min(len(tokenizer), vocab_size) if vocab_size else len(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        self.yes = [i for i, t in enumerate(texts) if i not in special and _answer_word_matches(t, "yes")]
        self.no = [i for i, t in enumerate(texts) if i not in special and _answer_word_matches(t, "no")]
        if not self.yes or not self.no:
            raise ValueError("the tokenizer has no token that starts 'yes' or 'no'")


def yes_no_probability(first_logits, tokens: YesNoTokens) -> tuple[float, float]:
    """(P(yes), P(no)) of the first generated token, from its logits over the vocabulary."""
    logits = np.asarray(first_logits, dtype=np.float64).reshape(-1)
    logp = logits - logits.max()
    logp -= np.log(np.exp(logp).sum())
    p = np.exp(logp)
    return float(p[tokens.yes].sum()), float(p[tokens.no].sum())


def yes_no_from_logprobs(logprobs) -> tuple[float, float] | None:
    """(P(yes), P(no)) from a server's first-token log-probabilities, given as {token text: logprob}
    or [{"token": text, "logprob": lp}, ...] (usually the top-k only, so these are lower bounds)."""
    if not logprobs:
        return None
    items = logprobs.items() if isinstance(logprobs, dict) else ((e["token"], e["logprob"]) for e in logprobs)
    p_yes = p_no = 0.0
    for text, lp in items:
        if _answer_word_matches(text, "yes"):
            p_yes += math.exp(lp)
        elif _answer_word_matches(text, "no"):
            p_no += math.exp(lp)
    return p_yes, p_no


_YES_NO_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no, None when the text says neither (first of the two words wins)."""
    m = _YES_NO_WORD.search(text or "")
    return None if m is None else m.group(1).lower() == "yes"


# --------------------------------------------------------------------------- option letters

# A single ASCII letter with no word character (Unicode letter, digit, underscore) on either side.
_STANDALONE_LETTER = re.compile(r"(?<!\w)([A-Za-z])(?!\w)")
ANSWER_PARSERS = ("facexbench", "strict")


def facexbench_option(text: str, options: list[str]) -> str | None:
    """The option letter as FaceXBench's aggregate_results.py extracts it, or None.

    Its rule, read from its source: on the stripped answer, (1) the first standalone letter (see
    _STANDALONE_LETTER; its patterns "A", "(A)", "A.", "A:", "A -", "Option A" each only find
    such letters, at the start first and then anywhere, so the first one in the text is the one
    found) that is one of the option labels, upper case only (A-D for four options): "A man is
    shown" is A, "b" is nothing; else (2) the first option, in option order, whose stripped text
    occurs in the answer, case-sensitively ("Male" is found in "Male." and in "Female" is not).
    """
    labels = [chr(ord("A") + i) for i in range(len(options))]
    clean = (text or "").strip()
    for m in _STANDALONE_LETTER.finditer(clean):
        if m.group(1) in labels:
            return m.group(1)
    for label, option in zip(labels, options):
        if str(option).strip() in clean:
            return label
    return None


def option_parser(name: str):
    """The answer parser `facert eval mcq --answer-parser NAME` uses."""
    if name not in ANSWER_PARSERS:
        raise ValueError(f"answer parser must be one of {', '.join(ANSWER_PARSERS)}, got {name!r}")
    return facexbench_option if name == "facexbench" else extract_option_letter


def extract_option_letter(text: str, options: list[str]) -> str | None:
    """The option letter an answer chose, or None.

    In order: a bare letter or a letter opening the answer ("B", "(B)", "B.", "B:", "B)", "B -",
    "B. Images 1 and 2"); an explicit phrase anywhere ("Option B", "answer is B", "Answer: (b)",
    "choice B"); a parenthesised "(B)" anywhere; a standalone capital letter anywhere that is not
    the article "A" ("I think B."); then the option texts: the answer equal to one option, or
    exactly one option's text appearing in it (the longest, when one contains another).
    """
    letters = "ABCDEFGHIJ"[:len(options)]
    t = (text or "").strip()
    if not t:
        return None
    L = f"[{letters}]"
    patterns = [
        rf"^\(?({L})\)?\s*$",
        rf"^\(?({L})\s*[).:\-,]",
        rf"^\(({L})\)",
    ]
    for p in patterns:
        m = re.match(p, t)
        if m:
            return m.group(1)
    for m in re.finditer(r"\b(?:option|choice|answer(?:\s+is)?)\s*[:\-]?\s*\(?([A-Za-z])(?![A-Za-z])", t, re.IGNORECASE):
        letter, after = m.group(1), t[m.end():]
        # A lower-case letter counts only where it ends the phrase ("the answer is b."), not
        # where it is the article of a sentence ("the answer is a man ...").
        if letter.upper() in letters and (letter.isupper() or re.match(r"\)?\s*(?:$|[.:,;!])", after)):
            return letter.upper()
    m = re.search(rf"\(({L})\)", t)
    if m:
        return m.group(1)
    for m in re.finditer(rf"(?<![A-Za-z'])({L})(?![A-Za-z'])", t):
        after = t[m.end():]
        if m.group(1) == "A" and re.match(r"\s+[a-z]", after):  # the article: "A man with ..."
            continue
        return m.group(1)
    lowered = t.lower().rstrip(".")
    for i, opt in enumerate(options):
        if opt.strip().lower() == lowered:
            return letters[i]
    found = [(len(opt.strip()), i) for i, opt in enumerate(options)
             if opt.strip() and re.search(rf"(?<!\w){re.escape(opt.strip().lower())}(?!\w)", lowered)]
    if found:
        found.sort(reverse=True)
        if len(found) == 1 or found[0][0] > found[1][0]:
            return letters[found[0][1]]
    return None


# ------------------------------------------------------------------------ face embedding model

class OnnxFaceEmbedder:
    """A face-recognition model exported to ONNX (for example insightface's ArcFace models).

    Input: float32 [B, 3, 112, 112], RGB, normalised (x - mean) / std with insightface's
    mean 127.5 and std 128 (pass 127.5 for models trained with 127.5); images that are not
    112 x 112 (aligned crops, as in the .bin sets) are resized to it, without detection or
    alignment. Output: one embedding per image; the score of a pair is the cosine similarity.
    With `flip`, the embedding of the horizontally flipped image is added first, as insightface's
    verification.py does.
    """

    size = 112

    def __init__(self, path: str | Path, mean: float = 127.5, std: float = 128.0, flip: bool = False,
                 providers: list[str] | None = None):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("the embedding baseline needs onnxruntime: pip install 'facert[eval]'") from e
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"embedding model {path} does not exist")
        self.session = ort.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        inp = self.session.get_inputs()[0]
        shape = inp.shape
        if len(shape) != 4 or shape[1] not in (3, "3") or any(
                isinstance(d, int) and d != self.size for d in shape[2:]):
            raise ValueError(f"{path}: expected an input of shape [B, 3, 112, 112], got {shape}")
        self.input_name = inp.name
        self.mean, self.std, self.flip = float(mean), float(std), flip

    def pixels(self, data: bytes) -> np.ndarray:
        img = decode_image(data)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        return (x - self.mean) / self.std

    def embed(self, images: list[bytes]) -> np.ndarray:
        x = np.stack([self.pixels(b) for b in images])
        emb = self.session.run(None, {self.input_name: x})[0].astype(np.float64)
        if self.flip:
            emb = emb + self.session.run(None, {self.input_name: np.ascontiguousarray(x[..., ::-1])})[0]
        return emb.reshape(len(images), -1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=-1)
