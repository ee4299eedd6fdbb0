"""One request, end to end: images + question (or a conversation) -> streamed answer, attributes, timings.

    preprocess -> face parser -> seg tokens --+
        \\-----> vision tower + projector -----+--> prompt table -> LLM prefill + decode -> text
    pooled vision features -> attribute head -> constraint step

A request holds 1..max_images images (default 8, FACERT_MAX_IMAGES); each becomes the tiles its
model's processor gives it (InternVL: 1..max_tiles tiles + a thumbnail), and every tile of every
image of every request in a batch goes through the vision tower as one batch.

The pipeline drives any backend's components through one interface (runtime/backends/base.py:
`encode_image`, `parse_face`, `seg_tokens`, `attributes`, `llm`); `TorchComponents`
(runtime/backends/torch_backend.py) is the torch reference backend.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from runtime.backends.torch_backend import TorchComponents
from runtime.generate import GenerationResult, SamplingParams, generate
from runtime.models.attributes import CELEBA_ATTRIBUTES, apply_constraints
from runtime.preprocess import (MAX_IMAGE_PIXELS, MAX_IMAGES, ImageError, ImageInputs, check_image_count,
                                preprocess_images)
from runtime.prompt import (PromptError, build_prompt_ids, check_messages, image_layout, question_messages,
                            splice_prompt_table)

STAGES = ("preprocess", "parser", "seg", "vision", "attributes", "prefill", "decode")


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    finish_reason: str
    timings: dict[str, float]
    attributes: dict[str, float] | None = None
    attributes_raw: dict[str, float] | None = None
    constraints_fired: list[str] = field(default_factory=list)
    first_logits: torch.Tensor | None = None
    prompt_tokens: int = 0
    # every image's attributes ({attributes, attributes_raw, constraints_fired}); the fields above are image 1's
    image_attributes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "timings": self.timings, "attributes": self.attributes,
                "attributes_raw": self.attributes_raw, "constraints_fired": self.constraints_fired,
                "prompt_tokens": self.prompt_tokens, "image_attributes": self.image_attributes}


class TextStream:
    """Incremental detokenisation: emits only complete characters, in order."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new


@dataclass
class Prepared:
    prompt_embeds: list[torch.Tensor]
    attributes: list[list[dict]]  # per request, per image (empty where the model has no attribute head)
    timings: dict[str, float]
    prompt_tokens: list[int]


def attributes_by_image(probs: torch.Tensor) -> list[dict]:
    """[N, 40] raw probabilities -> per image {attributes (after the constraint step), attributes_raw, constraints_fired}."""
    fixed = apply_constraints(probs)
    return [{"attributes": dict(zip(CELEBA_ATTRIBUTES, map(float, fixed.probs[i]))),
             "attributes_raw": dict(zip(CELEBA_ATTRIBUTES, map(float, probs[i]))),
             "constraints_fired": list(fixed.fired[i])} for i in range(probs.shape[0])]


def _as_list(images) -> list[bytes]:
    return [images] if isinstance(images, (bytes, bytearray, memoryview)) else list(images)


class RequestBuilder:
    """A request (images + a question or a conversation) -> checked pixels and prompt ids.

    Needs no weights: the in-process pipeline and the server's preprocessing step both use it, so
    both build exactly the same inputs and refuse exactly the same requests."""

    def __init__(self, spec: dict, tokenizer, vocab_size: int, num_image_tokens: int, num_seg_tokens: int,
                 max_pixels: int = MAX_IMAGE_PIXELS, max_images: int | None = None, tile_limit: int | None = None):
        """`max_images`, `tile_limit`: what engines with a fixed capacity (TensorRT profiles, a
        TensorRT-LLM prompt table) were built for; a request over them is refused, naming the bound."""
        self.spec = spec
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_pixels = max_pixels
        self.max_images = int(max_images or os.environ.get("FACERT_MAX_IMAGES") or MAX_IMAGES)
        self.tile_limit = tile_limit
        self.max_context = int(spec["llm"].get("max_position_embeddings", 4096))
        self.layout = image_layout(spec["family"], tokenizer, num_image_tokens, num_seg_tokens)

    def conversation(self, num_images: int, question: str | None = None, messages=None) -> list[dict]:
        """`question` (a user turn of the images then the text) or `messages` (transformers'
        typed-content form), exactly one of them."""
        check_image_count(num_images, self.max_images)
        if (question is None) == (messages is None):
            raise PromptError("send a question or messages (a conversation), exactly one of them")
        if messages is not None:
            return check_messages(messages, num_images)
        return question_messages(question, num_images)

    def prompt_ids(self, conversation: list[dict], tiles: list[int], max_new_tokens: int) -> list[int]:
        if max_new_tokens >= self.max_context:  # else the prompt's bound below reads as a negative number
            raise PromptError(f"max_tokens {max_new_tokens} leaves no room for a prompt in the model's "
                              f"{self.max_context}-token context")
        return build_prompt_ids(self.tokenizer, conversation, self.layout, tiles, self.vocab_size,
                                max_prompt_tokens=self.max_context - max_new_tokens)

    def build(self, images, question: str | None, messages, max_new_tokens: int,
              max_tiles: int | None = None) -> tuple[ImageInputs, list[int]]:
        images = _as_list(images)
        conv = self.conversation(len(images), question, messages)
        if self.tile_limit is not None and max_tiles is not None and max_tiles > self.tile_limit:
            raise ImageError(f"max_tiles {max_tiles} is over the {self.tile_limit}-tile bound these engines were "
                             "built for (facert build --max-tiles)")
        inputs = preprocess_images(images, self.spec, self.max_pixels, max_tiles, self.max_images)
        if self.tile_limit is not None:
            per_image = self.tile_limit + 1 if self.tile_limit > 1 else 1  # InternVL adds a thumbnail to >1 tile
            for i, n in enumerate(inputs.tiles):
                if n > per_image:
                    raise ImageError(f"image {i + 1} makes {n} tiles, over the {self.tile_limit}-tile bound these "
                                     f"engines were built for (facert build --max-tiles); send max_tiles <= "
                                     f"{self.tile_limit}")
        return inputs, self.prompt_ids(conv, inputs.tiles, max_new_tokens)


class FacePipeline:
    def __init__(self, components, tokenizer, max_pixels: int = MAX_IMAGE_PIXELS, max_images: int | None = None,
                 tile_limit: int | None = None):
        self.c = components
        self.tokenizer = tokenizer
        self.spec = components.spec
        self.requests = RequestBuilder(self.spec, tokenizer, components.vocab_size, components.num_image_tokens,
                                       components.num_seg_tokens, max_pixels, max_images, tile_limit)
        self.max_context = self.requests.max_context
        eos = tokenizer.eos_token_id
        self.eos_token_ids = tuple(x for x in ([eos] if isinstance(eos, int) else (eos or [])) if x is not None)

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", dtype: str | None = None,
                        cuda_graphs: bool | None = None, parts=None, parser_pth=None, **kw) -> "FacePipeline":
        """`parts`: load only these components (see runtime.checkpoint.PARTS), e.g. for one serving step."""
        from runtime.checkpoint import load_checkpoint

        model, tok, _ = load_checkpoint(path, dtype=dtype, parts=parts, parser_pth=parser_pth)
        return cls(TorchComponents(model, device, cuda_graphs=cuda_graphs), tok, **kw)

    @property
    def random_parts(self) -> list[str]:
        return list(self.spec.get("random_parts", []))

    @property
    def max_images(self) -> int:
        return self.requests.max_images

    def prepare(self, images: list, questions: list, max_new_tokens: int, messages: list | None = None,
                max_tiles: int | None = None) -> Prepared:
        """Everything before the LLM, batched across requests; validates every input first."""
        t = {s: 0.0 for s in STAGES}
        t0 = time.perf_counter()
        messages = messages or [None] * len(images)
        for imgs, q, m in zip(images, questions, messages):  # every request's shape first, then pixels
            self.requests.conversation(len(_as_list(imgs)), q, m)
        built = [self.requests.build(imgs, q, m, max_new_tokens, max_tiles)
                 for imgs, q, m in zip(images, questions, messages)]
        inputs = [x for x, _ in built]
        ids = [row for _, row in built]
        t["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        image_tokens, pooled = self.c.encode_image(np.concatenate([x.pixel_values for x in inputs]))
        t["vision"] = time.perf_counter() - t0
        image_tokens = torch.as_tensor(image_tokens)
        tiles = [sum(x.tiles) for x in inputs]
        tables = [rows.reshape(1, -1, rows.shape[-1]) for rows in torch.split(image_tokens, tiles)]
        attrs: list[list[dict]] = [[] for _ in images]
        if self.c.num_seg_tokens:
            counts = [x.num_images for x in inputs]
            t0 = time.perf_counter()
            labels = self.c.parse_face(np.concatenate([x.parser_pixels for x in inputs]))
            t["parser"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            seg = torch.as_tensor(self.c.seg_tokens(labels))
            t["seg"] = time.perf_counter() - t0
            tables = [torch.cat([tab, rows.reshape(1, -1, rows.shape[-1]).to(tab.dtype)], dim=1)
                      for tab, rows in zip(tables, torch.split(seg, counts))]
            t0 = time.perf_counter()
            pooled_images = torch.as_tensor(pooled)  # one tile per image for FaceInsight
            probs = self.c.attributes(pooled_images).float().cpu()
            attrs = [attributes_by_image(p) for p in torch.split(probs, counts)]
            t["attributes"] = time.perf_counter() - t0
        embed = self.c.llm.embed
        embeds = [splice_prompt_table(embed, torch.tensor([row]), table.to(self.c.llm.device), self.c.vocab_size)[0]
                  for row, table in zip(ids, tables)]
        return Prepared(embeds, attrs, t, [len(row) for row in ids])

    def ask_batch(self, images: list, questions: list, params: SamplingParams | list[SamplingParams],
                  on_text: Callable[[int, str], None] | None = None,
                  should_stop: Callable[[int], bool] | None = None, messages: list | None = None,
                  max_tiles: int | None = None) -> list[Answer]:
        """One answer per request; request i is images[i] (bytes or a list of 1..max_images) with
        questions[i], or with messages[i] (a conversation) where questions[i] is None."""
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} image lists but {len(questions)} questions")
        if messages is not None and len(messages) != len(images):
            raise ValueError(f"{len(images)} image lists but {len(messages)} conversations")
        plist = params if isinstance(params, list) else [params] * len(images)
        for p in plist:
            p.validate()
        t_start = time.perf_counter()
        prep = self.prepare(images, questions, max(p.max_new_tokens for p in plist), messages, max_tiles)
        streams = [TextStream(self.tokenizer) for _ in images]

        def on_token(i: int, tok: int) -> None:
            piece = streams[i].push(tok)
            if piece and on_text is not None:
                on_text(i, piece)

        res: GenerationResult = generate(self.c.llm, prep.prompt_embeds, plist, self.eos_token_ids,
                                         on_token=on_token, should_stop=should_stop)
        total = time.perf_counter() - t_start
        answers = []
        for i in range(len(images)):
            timings = {f"{k}_ms": v * 1e3 for k, v in prep.timings.items()}
            timings["prefill_ms"] = res.prefill_s * 1e3
            timings["decode_ms"] = res.decode_s * 1e3
            timings["decode_tokens_per_s"] = (len(res.tokens[i]) / res.decode_s) if res.decode_s > 0 else 0.0
            timings["total_ms"] = total * 1e3
            a = Answer(self.tokenizer.decode(res.tokens[i], skip_special_tokens=True), res.tokens[i],
                       res.finish_reasons[i], timings, first_logits=res.first_logits[i],
                       prompt_tokens=prep.prompt_tokens[i], image_attributes=prep.attributes[i])
            if prep.attributes[i]:
                first = prep.attributes[i][0]
                a.attributes, a.attributes_raw = first["attributes"], first["attributes_raw"]
                a.constraints_fired = first["constraints_fired"]
            answers.append(a)
        return answers

    def ask(self, images, question: str | None = None, params: SamplingParams | None = None,
            on_text: Callable[[str], None] | None = None, *, messages: list | None = None,
            max_tiles: int | None = None) -> Answer:
        """`images`: one encoded image (bytes) or a list of them, in prompt order."""
        cb = (lambda _i, s: on_text(s)) if on_text is not None else None
        return self.ask_batch([images], [question], params or SamplingParams(), on_text=cb,
                              messages=None if messages is None else [messages], max_tiles=max_tiles)[0]
