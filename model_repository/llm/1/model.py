"""LLM step (decoupled): prompt-table splice, then prefill + KV-cache decode, streamed.

The requests the dynamic batcher hands over generate as one batch through runtime.generate (each
with its own sampling parameters and seeded generator), their prompts built by
runtime.prompt.splice_prompt_table exactly as in-process. Text is detokenised here, with the
pipeline's own TextStream, because the detokeniser's state lives with the generation loop. With
STREAM a response goes out for every token; the last response of every request carries the finish
reason, the timings and the attribute probabilities, then the request is closed.
"""

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.generate import SamplingParams, generate
from runtime.pipeline import STAGES, TextStream
from runtime.prompt import splice_prompt_table
from runtime.serving.python_backend import Step, bytes_tensor, error_response, make_response, read_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


@dataclass
class Active:
    sender: object
    embeds: torch.Tensor
    params: SamplingParams
    stream: bool
    timings: dict
    probs: np.ndarray | None
    emitted: list = field(default_factory=list)


class TritonPythonModel(Step):
    def setup(self):
        self.has_attributes = "ATTRIBUTE_PROBS_OUT" in self.output_names
        self.timing_inputs = [n for n in self.input_names if n.endswith("_MS")]

    def _prepare(self, request) -> Active:
        x = read_inputs(request, self.input_names)
        gen = json.loads(bytes(x["GENERATION"].reshape(-1)[0]))
        params = SamplingParams(max_new_tokens=gen["max_new_tokens"], temperature=gen["temperature"],
                                top_p=gen["top_p"], seed=gen["seed"]).validate()
        c = self.pipe.c
        ids = torch.from_numpy(x["INPUT_IDS"][:1].astype(np.int64))
        table = np.concatenate([x["IMAGE_TOKENS"][:1]] + ([x["SEG_TOKENS"][:1]] if "SEG_TOKENS" in x else []), axis=1)
        embeds = splice_prompt_table(c.llm.embed, ids, torch.from_numpy(table).to(c.llm.device), c.vocab_size)[0]
        upstream = {n[:-3].lower(): float(x[n].reshape(-1)[0]) for n in self.timing_inputs if n in x}
        timings = {f"{s}_ms": upstream.get(s, 0.0) for s in STAGES if s not in ("prefill", "decode")}
        timings["received_at"] = gen["received_at"]
        probs = x["ATTRIBUTE_PROBS"][:1].astype(np.float32) if "ATTRIBUTE_PROBS" in x else None
        return Active(request.get_response_sender(), embeds, params, gen["stream"], timings, probs)

    def _response(self, text: str, token_ids, finish: str = "", timings: dict | None = None, probs=None):
        out = {"TEXT": bytes_tensor([text]), "TOKEN_IDS": np.array([token_ids], np.int64).reshape(1, -1),
               "FINISH_REASON": bytes_tensor([finish]), "TIMINGS": bytes_tensor([json.dumps(timings) if timings else ""])}
        if self.has_attributes:
            out["ATTRIBUTE_PROBS_OUT"] = probs if probs is not None else np.zeros((1, 0), np.float32)
        return make_response(out)

    def execute(self, requests):
        active = []
        for r in requests:
            try:
                active.append(self._prepare(r))
            except Exception as e:  # noqa: BLE001 (this request fails alone, with the message)
                r.get_response_sender().send(error_response(e), flags=FINAL)
        if not active:
            return None
        streams = [TextStream(self.pipe.tokenizer) for _ in active]

        def on_token(i: int, token: int) -> None:
            piece = streams[i].push(token)
            a = active[i]
            a.emitted.append(piece)
            if a.stream:
                a.sender.send(self._response(piece, [token]))

        def should_stop(i: int) -> bool:
            is_cancelled = getattr(active[i].sender, "is_cancelled", None)
            return bool(is_cancelled and is_cancelled())

        try:
            res = generate(self.pipe.c.llm, [a.embeds for a in active], [a.params for a in active],
                           self.pipe.eos_token_ids, on_token=on_token, should_stop=should_stop)
        except Exception as e:  # noqa: BLE001 (every request of the batch gets the error)
            for a in active:
                a.sender.send(error_response(e), flags=FINAL)
            return None
        for i, a in enumerate(active):
            full = self.pipe.tokenizer.decode(res.tokens[i], skip_special_tokens=True)
            timings = dict(a.timings, prefill_ms=res.prefill_s * 1e3, decode_ms=res.decode_s * 1e3,
                           decode_tokens_per_s=len(res.tokens[i]) / res.decode_s if res.decode_s > 0 else 0.0)
            if a.stream:  # what the stream held back (a character split across tokens), if anything
                text, ids = full[len("".join(a.emitted)):], []
            else:
                text, ids = full, res.tokens[i]
            a.sender.send(self._response(text, ids, res.finish_reasons[i], timings, a.probs), flags=FINAL)
        return None
