"""One request, end to end: image bytes + question -> streamed answer, attributes, timings.

    preprocess -> face parser -> seg tokens --+
        \\-----> vision tower + projector -----+--> prompt table -> LLM prefill + decode -> text
    pooled vision features -> attribute head -> constraint step

The pipeline drives components through a small interface (`encode_image`, `parse_face`,
`seg_tokens`, `attributes`, `llm`); `TorchComponents` is the torch reference backend.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from runtime.generate import GenerationResult, SamplingParams, TorchLLM, generate
from runtime.models.attributes import CELEBA_ATTRIBUTES, apply_constraints
from runtime.preprocess import MAX_IMAGE_PIXELS, preprocess
from runtime.prompt import build_prompt_ids, splice_prompt_table

STAGES = ("preprocess", "parser", "seg", "vision", "attributes", "prefill", "decode")


class TorchComponents:
    """The torch backend: the model's own modules."""

    backend = "torch"

    def __init__(self, model, device: str | torch.device = "cpu", cuda_graphs: bool | None = None):
        if torch.device(device).type != "meta":  # parts loaded on meta (not needed here) stay there
            for m in model.children():
                if next(m.parameters(), torch.empty(0)).device.type != "meta":
                    m.to(device)
        self.model = model.eval()
        self.device = torch.device(device)
        if cuda_graphs is None:  # the GPU fast path is the default wherever there is a GPU
            cuda_graphs = self.device.type == "cuda"
        self.spec = model.spec
        self.family = model.family
        self.vocab_size = model.vocab_size
        self.num_image_tokens = model.num_image_tokens
        self.num_seg_tokens = model.num_seg_tokens
        self.llm = TorchLLM(model.llm, cuda_graphs=cuda_graphs)

    def _t(self, x) -> torch.Tensor:
        return torch.as_tensor(x).to(self.device)

    @torch.inference_mode()
    def encode_image(self, pixel_values):
        return self.model.encode_image(self._t(pixel_values))

    @torch.inference_mode()
    def parse_face(self, parser_pixels):
        return self.model.parse_face(self._t(parser_pixels))

    @torch.inference_mode()
    def seg_tokens(self, labels):
        return self.model.seg(self._t(labels))

    @torch.inference_mode()
    def attributes(self, pooled):
        return self.model.attributes(self._t(pooled))


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

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "timings": self.timings, "attributes": self.attributes,
                "attributes_raw": self.attributes_raw, "constraints_fired": self.constraints_fired}


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
    attributes: list[tuple[dict, dict, list[str]] | None]
    timings: dict[str, float]


class FacePipeline:
    def __init__(self, components, tokenizer, max_pixels: int = MAX_IMAGE_PIXELS):
        self.c = components
        self.tokenizer = tokenizer
        self.spec = components.spec
        self.max_pixels = max_pixels
        llm_spec = self.spec["llm"]
        self.max_context = int(llm_spec.get("max_position_embeddings", 4096))
        eos = tokenizer.eos_token_id
        self.eos_token_ids = tuple(x for x in ([eos] if isinstance(eos, int) else (eos or [])) if x is not None)

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", dtype: str | None = None,
                        cuda_graphs: bool | None = None, parts=None, parser_pth=None, **kw) -> "FacePipeline":
        """`parts`: load only these components (see runtime.checkpoint.PARTS), e.g. for one serving step.
        `parser_pth`: the BiSeNet 79999_iter.pth to use with a llava-hf directory."""
        from runtime.checkpoint import load_checkpoint

        model, tok, _ = load_checkpoint(path, dtype=dtype, parts=parts, parser_pth=parser_pth)
        return cls(TorchComponents(model, device, cuda_graphs=cuda_graphs), tok, **kw)

    @property
    def random_parts(self) -> list[str]:
        return list(self.spec.get("random_parts", []))

    def prompt_ids(self, question: str, max_new_tokens: int) -> list[int]:
        return build_prompt_ids(self.tokenizer, question, self.c.vocab_size, self.c.num_image_tokens,
                                self.c.num_seg_tokens, max_prompt_tokens=self.max_context - max_new_tokens)

    def prepare(self, images: list[bytes], questions: list[str], max_new_tokens: int) -> Prepared:
        """Everything before the LLM, batched across requests; validates every input first."""
        t = {s: 0.0 for s in STAGES}
        t0 = time.perf_counter()
        ids = [self.prompt_ids(q, max_new_tokens) for q in questions]
        inputs = [preprocess(b, self.spec, self.max_pixels) for b in images]
        t["preprocess"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        image_tokens, pooled = self.c.encode_image(np.stack([x.pixel_values for x in inputs]))
        t["vision"] = time.perf_counter() - t0
        tables = [image_tokens]
        attrs: list = [None] * len(images)
        if self.c.num_seg_tokens:
            t0 = time.perf_counter()
            labels = self.c.parse_face(np.stack([x.parser_pixels for x in inputs]))
            t["parser"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            tables.append(self.c.seg_tokens(labels))
            t["seg"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            probs = self.c.attributes(pooled).float().cpu()
            fixed = apply_constraints(probs)
            attrs = [(dict(zip(CELEBA_ATTRIBUTES, map(float, fixed.probs[i]))),
                      dict(zip(CELEBA_ATTRIBUTES, map(float, probs[i]))), fixed.fired[i])
                     for i in range(len(images))]
            t["attributes"] = time.perf_counter() - t0
        table = torch.cat([torch.as_tensor(x) for x in tables], dim=1)
        embed = self.c.llm.embed
        embeds = [splice_prompt_table(embed, torch.tensor([row]), table[i:i + 1].to(self.c.llm.device),
                                      self.c.vocab_size)[0] for i, row in enumerate(ids)]
        return Prepared(embeds, attrs, t)

    def ask_batch(self, images: list[bytes], questions: list[str], params: SamplingParams | list[SamplingParams],
                  on_text: Callable[[int, str], None] | None = None,
                  should_stop: Callable[[int], bool] | None = None) -> list[Answer]:
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        plist = params if isinstance(params, list) else [params] * len(images)
        for p in plist:
            p.validate()
        t_start = time.perf_counter()
        prep = self.prepare(images, questions, max(p.max_new_tokens for p in plist))
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
                       res.finish_reasons[i], timings, first_logits=res.first_logits[i])
            if prep.attributes[i] is not None:
                a.attributes, a.attributes_raw, a.constraints_fired = prep.attributes[i]
            answers.append(a)
        return answers

    def ask(self, image: bytes, question: str, params: SamplingParams | None = None,
            on_text: Callable[[str], None] | None = None) -> Answer:
        cb = (lambda _i, s: on_text(s)) if on_text is not None else None
        return self.ask_batch([image], [question], params or SamplingParams(), on_text=cb)[0]
