"""LLM step (decoupled): prompt-table splice, then prefill + KV-cache decode, streamed.

Portable (and native without a TensorRT-LLM engine): the requests the dynamic batcher hands over
generate as one batch through runtime.generate (each with its own sampling parameters and seeded
generator), their prompts built by runtime.prompt.splice_prompt_table exactly as in-process.

Native with a TensorRT-LLM engine (parameter llm_backend=tensorrtllm): each request is forwarded
through BLS to the `tensorrt_llm` model (tensorrtllm backend, in-flight batching) with the same
prompt-table scheme: its input ids, ids >= vocab_size included, and the image/seg rows as
prompt_embedding_table; its streamed tokens come back here.

Either way the text is detokenised here with the pipeline's own TextStream (the detokeniser's
state lives with the generation loop). With STREAM a response goes out for every token; the last
response of every request carries the finish reason, the timings and the attribute
probabilities, then the request is closed.
"""

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.generate import SamplingParams, generate
from runtime.pipeline import STAGES, TextStream
from runtime.prompt import splice_prompt_table
from runtime.serving.python_backend import Step, bytes_tensor, error_response, make_response, read_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# the tensorrt_llm model's prompt_embedding_table type (the engine's precision) -> torch dtype
PROMPT_TABLE_DTYPES = {"TYPE_FP16": torch.float16, "TYPE_BF16": torch.bfloat16, "TYPE_FP32": torch.float32}


@dataclass
class Active:
    sender: object
    ids: torch.Tensor  # [1, T] prompt ids, placeholders >= vocab_size included
    table: torch.Tensor  # [1, P, D] image rows then seg rows
    params: SamplingParams
    stream: bool
    timings: dict
    probs: np.ndarray | None
    emitted: list = field(default_factory=list)


class TritonPythonModel(Step):
    def wants_pipeline(self) -> bool:
        return self.params.get("llm_backend") != "tensorrtllm"

    def setup(self):
        self.has_attributes = "ATTRIBUTE_PROBS_OUT" in self.output_names
        self.timing_inputs = [n for n in self.input_names if n.endswith("_MS")]
        if self.pipe is not None:
            self.tokenizer, self.vocab_size, self.eos_ids = self.pipe.tokenizer, self.pipe.c.vocab_size, self.pipe.eos_token_ids
        else:  # tensorrtllm: the tokenizer and vocabulary size come from the engines folder
            from runtime.tokenizer import load_tokenizer

            engines = Path(self.params["engines"])
            self.tokenizer = load_tokenizer(engines)
            self.vocab_size = int(json.loads((engines / "manifest.json").read_text())["model"]["vocab_size"])
            eos = self.tokenizer.eos_token_id
            self.eos_ids = tuple(x for x in ([eos] if isinstance(eos, int) else (eos or [])) if x is not None)

    def _prepare(self, request) -> Active:
        x = read_inputs(request, self.input_names)
        gen = json.loads(bytes(x["GENERATION"].reshape(-1)[0]))
        params = SamplingParams(max_new_tokens=gen["max_new_tokens"], temperature=gen["temperature"],
                                top_p=gen["top_p"], seed=gen["seed"]).validate()
        ids = torch.from_numpy(x["INPUT_IDS"][:1].astype(np.int64))
        table = np.concatenate([x["IMAGE_TOKENS"][:1]] + ([x["SEG_TOKENS"][:1]] if "SEG_TOKENS" in x else []), axis=1)
        upstream = {n[:-3].lower(): float(x[n].reshape(-1)[0]) for n in self.timing_inputs if n in x}
        timings = {f"{s}_ms": upstream.get(s, 0.0) for s in STAGES if s not in ("prefill", "decode")}
        timings["received_at"] = gen["received_at"]
        probs = x["ATTRIBUTE_PROBS"][:1].astype(np.float32) if "ATTRIBUTE_PROBS" in x else None
        return Active(request.get_response_sender(), ids, torch.from_numpy(table), params, gen["stream"], timings, probs)

    def _response(self, text: str, token_ids, finish: str = "", timings: dict | None = None, probs=None):
        out = {"TEXT": bytes_tensor([text]), "TOKEN_IDS": np.array([token_ids], np.int64).reshape(1, -1),
               "FINISH_REASON": bytes_tensor([finish]), "TIMINGS": bytes_tensor([json.dumps(timings) if timings else ""])}
        if self.has_attributes:
            out["ATTRIBUTE_PROBS_OUT"] = probs if probs is not None else np.zeros((1, 0), np.float32)
        return make_response(out)

    def _token(self, a: Active, stream: TextStream, token: int) -> None:
        piece = stream.push(token)
        a.emitted.append(piece)
        if a.stream:
            a.sender.send(self._response(piece, [token]))

    def _finish(self, a: Active, tokens: list[int], reason: str, prefill_s: float, decode_s: float) -> None:
        full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        timings = dict(a.timings, prefill_ms=prefill_s * 1e3, decode_ms=decode_s * 1e3,
                       decode_tokens_per_s=len(tokens) / decode_s if decode_s > 0 else 0.0)
        if a.stream:  # what the stream held back (a character split across tokens), if anything
            text, ids = full[len("".join(a.emitted)):], []
        else:
            text, ids = full, tokens
        a.sender.send(self._response(text, ids, reason, timings, a.probs), flags=FINAL)

    def execute(self, requests):
        active = []
        for r in requests:
            try:
                active.append(self._prepare(r))
            except Exception as e:  # noqa: BLE001 (this request fails alone, with the message)
                r.get_response_sender().send(error_response(e), flags=FINAL)
        if self.pipe is None:
            for a in active:  # TensorRT-LLM batches in flight: one BLS stream per request
                threading.Thread(target=self._run_tensorrtllm, args=(a,), daemon=True).start()
        elif active:
            self._run_generate(active)
        return None

    # ------------------------------------------------------------------ runtime.generate (portable)

    def _run_generate(self, active: list[Active]) -> None:
        c = self.pipe.c
        streams = [TextStream(self.tokenizer) for _ in active]

        def should_stop(i: int) -> bool:
            is_cancelled = getattr(active[i].sender, "is_cancelled", None)
            return bool(is_cancelled and is_cancelled())

        try:
            embeds = [splice_prompt_table(c.llm.embed, a.ids, a.table.to(c.llm.device), c.vocab_size)[0] for a in active]
            res = generate(c.llm, embeds, [a.params for a in active], self.eos_ids,
                           on_token=lambda i, tok: self._token(active[i], streams[i], tok), should_stop=should_stop)
        except Exception as e:  # noqa: BLE001 (every request of the batch gets the error)
            for a in active:
                a.sender.send(error_response(e), flags=FINAL)
            return
        for i, a in enumerate(active):
            self._finish(a, res.tokens[i], res.finish_reasons[i], res.prefill_s, res.decode_s)

    # ------------------------------------------------------------------- TensorRT-LLM through BLS

    def _run_tensorrtllm(self, a: Active) -> None:
        from torch.utils.dlpack import to_dlpack

        try:
            p = a.params
            ids = a.ids.to(torch.int32)
            table_dtype = PROMPT_TABLE_DTYPES[self.params.get("prompt_table_type", "TYPE_FP16")]
            table = a.table[0].to(table_dtype).contiguous()  # [P, D]; the batch axis is the request's

            def t(name, array):
                return pb_utils.Tensor(name, np.asarray(array))

            inputs = [t("input_ids", ids.numpy()), t("input_lengths", np.array([[ids.shape[1]]], np.int32)),
                      t("request_output_len", np.array([[p.max_new_tokens]], np.int32)),
                      t("temperature", np.array([[p.temperature]], np.float32)),
                      t("runtime_top_p", np.array([[p.top_p]], np.float32)),
                      t("streaming", np.array([[True]])),
                      pb_utils.Tensor.from_dlpack("prompt_embedding_table", to_dlpack(table[None])),
                      t("prompt_vocab_size", np.array([[table.shape[0]]], np.int32))]
            if self.eos_ids:
                inputs.append(t("end_id", np.array([[self.eos_ids[0]]], np.int32)))
                inputs.append(t("pad_id", np.array([[self.eos_ids[0]]], np.int32)))
            if p.seed is not None:
                inputs.append(t("random_seed", np.array([[p.seed]], np.uint64)))
            request = pb_utils.InferenceRequest(model_name=self.params.get("tensorrt_llm_model", "tensorrt_llm"),
                                                inputs=inputs, requested_output_names=["output_ids"])
            stream, tokens, stopped = TextStream(self.tokenizer), [], False
            t0 = time.perf_counter()
            first = None
            for response in request.exec(decoupled=True):
                if response.has_error():
                    raise RuntimeError(f"tensorrt_llm: {response.error().message()}")
                out = pb_utils.get_output_tensor_by_name(response, "output_ids")
                if out is None:  # the empty final response
                    continue
                for token in out.as_numpy().reshape(-1).tolist():
                    first = first if first is not None else time.perf_counter()
                    if token in self.eos_ids:
                        stopped = True
                        break
                    if len(tokens) < p.max_new_tokens:
                        tokens.append(int(token))
                        self._token(a, stream, int(token))
            end = time.perf_counter()
            first = first if first is not None else end
            reason = "stop" if stopped or len(tokens) < p.max_new_tokens else "length"
            self._finish(a, tokens, reason, first - t0, end - first)
        except Exception as e:  # noqa: BLE001 (the request gets the message)
            a.sender.send(error_response(e), flags=FINAL)
