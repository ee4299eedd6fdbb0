"""Prompts: the checkpoint's own chat template, with each image's rows laid out as its processor does.

A request is a conversation in transformers' typed-content form (`{"type": "image"}` and
`{"type": "text", "text": ...}` parts); a plain question becomes one user turn holding its images,
then its text, as transformers' processors and FaceXBench build them. The template renders one
marker per image; each marker then becomes that image's rows, exactly as the model's processor
expands it:
- LLaVA: `<image>` x image_seq_length (one tile), then, for FaceInsight with trained seg weights,
  the image's segmentation rows;
- InternVL: `<img>` + `<IMG_CONTEXT>` x 256 per tile + `</img>`.

Visual and segmentation embeddings enter the LLM the way TensorRT-LLM does it: placeholder ids at
and above `vocab_size` index a per-request prompt-embedding table. A request's table holds every
image row (all tiles of all images, in order), then every seg row (image by image); the prompt's
placeholder `vocab_size + i` is table row i. Every backend uses `build_prompt_ids` and
`splice_prompt_table`.

User text is always text: the rendered prompt is tokenized whole, as transformers tokenizes it, and
any control token (an added or special token) that came from a message's text rather than from the
template is encoded again as ordinary text, so no client can close a turn or open one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

IMAGE_MARK = "<image>"
MAX_QUESTION_CHARS = 16_384
ROLES = ("system", "user", "assistant")


class PromptError(ValueError):
    """A question or conversation that cannot be asked: empty, malformed, or too long for the model."""


@dataclass(frozen=True)
class ImageLayout:
    """How the model's processor lays one image into the prompt."""

    markers: tuple[str, ...]  # what the chat template renders for an image (the first that matches is used)
    rows_per_tile: int
    seg_rows: int = 0  # FaceInsight: rows of the image's segmentation tokens, right after its image rows
    start: str | None = None  # InternVL: <img> before the rows, </img> after
    end: str | None = None


def image_layout(family: str, tokenizer, rows_per_tile: int, seg_rows: int = 0) -> ImageLayout:
    if family == "facellm":
        context = getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>"
        start = getattr(tokenizer, "start_image_token", None) or "<img>"
        end = getattr(tokenizer, "end_image_token", None) or "</img>"
        vocab = tokenizer.get_vocab()
        if start not in vocab or end not in vocab:  # a checkpoint whose vocabulary has no image brackets
            start = end = None
        return ImageLayout((context, IMAGE_MARK), rows_per_tile, 0, start, end)
    marker = getattr(tokenizer, "image_token", None) or IMAGE_MARK
    return ImageLayout((marker,) if marker == IMAGE_MARK else (marker, IMAGE_MARK), rows_per_tile, seg_rows)


# ---------------------------------------------------------------------------------- conversations

def _check_text(text, what: str) -> str:
    if not isinstance(text, str):
        raise PromptError(f"{what} must be text, got {type(text).__name__}")
    if len(text) > MAX_QUESTION_CHARS:
        raise PromptError(f"{what} is {len(text)} characters, over the {MAX_QUESTION_CHARS}-character bound")
    return text


def question_messages(question: str, num_images: int) -> list[dict]:
    """One user turn: the images, then the question."""
    _check_text(question, "question")
    if not question.strip():
        raise PromptError("question is empty")
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": question}]}]


def check_messages(messages, num_images: int) -> list[dict]:
    """A conversation in transformers' typed-content form, normalised; its image parts must match the images."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list of {role, content} objects")
    out, images, chars, has_text = [], 0, 0, False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i + 1} must be an object with a role and a content")
        role = m["role"]
        if role not in ROLES:
            raise PromptError(f"message {i + 1} has role {role!r}; roles are {', '.join(ROLES)}")
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise PromptError(f"message {i + 1}: content must be text or a list of parts")
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                if role != "user":
                    raise PromptError(f"message {i + 1}: only user messages may hold images")
                images += 1
                parts.append({"type": "image"})
            elif kind == "text":
                text = _check_text(part.get("text"), f"message {i + 1} part {j + 1} text")
                chars += len(text)
                has_text = has_text or bool(text.strip())
                parts.append({"type": "text", "text": text})
            else:
                raise PromptError(f"message {i + 1} part {j + 1}: type must be 'image' or 'text', got {kind!r}")
        out.append({"role": role, "content": parts})
    if chars > MAX_QUESTION_CHARS:
        raise PromptError(f"the messages hold {chars} characters of text, over the {MAX_QUESTION_CHARS}-character bound")
    if not has_text and images == 0:
        raise PromptError("the messages hold no text and no image")
    if out[-1]["role"] != "user":
        raise PromptError("the last message must be the user's (the model answers it)")
    if images != num_images:
        raise PromptError(f"the messages hold {images} image parts but the request carries {num_images} images")
    return out


def _user_texts(messages: list[dict]) -> list[str]:
    return [p["text"] for m in messages for p in m["content"] if p["type"] == "text" and p["text"]]


def _render(tokenizer, messages: list[dict], marker: str) -> str:
    """The chat template's text. Templates that read content as a plain string (facert's older
    checkpoints) get each user turn as its image markers then its text."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 (jinja raises TypeError & co. when a template concatenates a list)
        pass
    flat = [{"role": m["role"], "content": "".join(marker + "\n" if p["type"] == "image" else p["text"]
                                                   for p in m["content"])} for m in messages]
    try:
        return tokenizer.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # noqa: BLE001
        raise PromptError(f"the checkpoint's chat template cannot render this conversation: {e}") from None


# ------------------------------------------------------------------------------------ tokenizing

def _added_tokens(tokenizer) -> dict[str, int]:
    """Every token the tokenizer matches before its model runs (special and added tokens)."""
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens = {str(t): i for i, t in decoder.items()}
    for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids):
        tokens.setdefault(t, i)
    return tokens


def _ensure_token(tokenizer, token: str) -> None:
    """Make `token` one added token so the whole prompt tokenizes in one call (no effect where it is one)."""
    if token not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)


def _plain_ids(tokenizer, text: str, added: dict[str, int]) -> list[int]:
    """`text` as ordinary tokens: any control-token string in it is split so that it cannot match."""
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True) if t))
    ids, pos = [], 0
    for m in pattern.finditer(text):
        ids += tokenizer.encode(text[pos:m.start()], add_special_tokens=False) if m.start() > pos else []
        tok = m.group()
        ids += tokenizer.encode(tok[:1], add_special_tokens=False) + tokenizer.encode(tok[1:], add_special_tokens=False)
        pos = m.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:], add_special_tokens=False)
    return ids


def _user_spans(rendered: str, texts: list[str]) -> list[tuple[int, int]] | None:
    spans, pos = [], 0
    for t in texts:
        at = rendered.find(t, pos)
        if at < 0:
            return None
        spans.append((at, at + len(t)))
        pos = at + len(t)
    return spans


def tokenize_prompt(tokenizer, rendered: str, user_texts: list[str]) -> list[int]:
    """The rendered prompt tokenized whole (as transformers' processors do), with control tokens that
    came from user text re-encoded as ordinary text."""
    added = _added_tokens(tokenizer)
    hostile = [t for t in added if t and any(t in u for u in user_texts)]
    if not hostile:  # the usual case: exactly transformers' tokens
        return tokenizer(rendered, add_special_tokens=True)["input_ids"]
    spans = _user_spans(rendered, user_texts)
    if spans is None:
        raise PromptError(f"the text holds the control token(s) {', '.join(sorted(hostile))}, and this "
                          "checkpoint's chat template changes text so they cannot be passed as plain text")
    enc = tokenizer(rendered, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    added_ids = set(added.values())

    def span_of(k: int) -> int | None:
        s, e = offsets[k]
        return next((n for n, (a, b) in enumerate(spans) if a <= s < e <= b), None)

    tainted = {span_of(k) for k in range(len(ids)) if ids[k] in added_ids} - {None}
    out, i = [], 0
    while i < len(ids):
        n = span_of(i)
        if n not in tainted:
            out.append(ids[i])
            i += 1
            continue
        j = i  # every token of this user span becomes ordinary text
        while j < len(ids) and span_of(j) == n:
            j += 1
        out += _plain_ids(tokenizer, rendered[offsets[i][0]:offsets[j - 1][1]], added)
        i = j
    return out


def build_prompt_ids(tokenizer, messages: list[dict], layout: ImageLayout, tiles: list[int], vocab_size: int,
                     max_prompt_tokens: int | None = None) -> list[int]:
    """Prompt ids for a checked conversation whose images have `tiles[k]` tiles each."""
    texts = _user_texts(messages)
    rendered, marker = None, layout.markers[0]
    for candidate in layout.markers:
        text = _render(tokenizer, messages, candidate)
        outside = text
        for t in texts:  # markers a user typed are not the template's
            outside = outside.replace(t, "")
        if outside.count(candidate) == len(tiles):
            rendered, marker = text, candidate
            break
    if rendered is None:
        raise PromptError(f"the checkpoint's chat template did not render one image marker "
                          f"({' or '.join(layout.markers)}) per image ({len(tiles)} images)")
    _ensure_token(tokenizer, marker)
    marker_id = tokenizer.convert_tokens_to_ids(marker)
    raw = tokenize_prompt(tokenizer, rendered, texts)
    start_id = tokenizer.convert_tokens_to_ids(layout.start) if layout.start else None
    end_id = tokenizer.convert_tokens_to_ids(layout.end) if layout.end else None

    image_rows = sum(tiles) * layout.rows_per_tile
    ids: list[int] = []
    image, row = 0, 0
    for tok in raw:
        if tok != marker_id:
            ids.append(tok)
            continue
        if image >= len(tiles):
            raise PromptError("the prompt holds more image markers than images")
        n = tiles[image] * layout.rows_per_tile
        ids += [start_id] if start_id is not None else []
        ids += range(vocab_size + row, vocab_size + row + n)
        ids += [end_id] if end_id is not None else []
        if layout.seg_rows:
            seg0 = image_rows + image * layout.seg_rows
            ids += range(vocab_size + seg0, vocab_size + seg0 + layout.seg_rows)
        row += n
        image += 1
    if image != len(tiles):
        raise PromptError(f"the prompt holds {image} image markers for {len(tiles)} images")
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise PromptError(f"prompt is {len(ids)} tokens, over the model's {max_prompt_tokens}-token bound "
                          "(fewer images or tiles, a shorter question, or a lower max_tokens)")
    return ids


def splice_prompt_table(embed_tokens, input_ids: torch.Tensor, prompt_table: torch.Tensor,
                        vocab_size: int) -> torch.Tensor:
    """Token embeddings [B, T, D] with rows of `prompt_table` [B, P, D] at ids >= vocab_size."""
    virtual = input_ids >= vocab_size
    text = embed_tokens(torch.where(virtual, torch.zeros_like(input_ids), input_ids))
    if prompt_table is None or prompt_table.shape[1] == 0:
        return text
    rows = (input_ids - vocab_size).clamp(min=0, max=prompt_table.shape[1] - 1)
    table = torch.gather(prompt_table.to(text.dtype), 1, rows[..., None].expand(-1, -1, text.shape[-1]))
    return torch.where(virtual[..., None], table, text)
