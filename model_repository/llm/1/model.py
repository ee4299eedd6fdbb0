"""LLM step (decoupled): prompt-table splice, then prefill + KV-cache decode, streamed.

Portable (and native without a TensorRT-LLM engine), two schedulers (config parameter `scheduler`,
`facert repo --scheduler`), the prompts built by runtime.prompt.splice_prompt_table exactly as
in-process:
- `inflight` (the default): in-flight batching (runtime/serving/scheduler.py). `execute` checks
  each request, puts it on the scheduler's bounded admission queue and returns at once (a full
  queue is refused at once with UNAVAILABLE, "Exceeds maximum queue size"). The scheduler thread
  owns the LLM and `kv_slots` KV-cache slots of `slot_tokens` positions; every iteration it drops
  cancelled and timed-out requests, admits waiting ones while a slot is free, prefills at most
  `prefill_chunk` prompt tokens and runs one decode step over every generating slot, so a request
  joins the running batch at the next iteration and leaves it with its last token. A sender thread
  detokenises, sends every response and updates the metrics, off the scheduler thread. A prompt's
  prefix up to the end of its image and seg rows is kept in the prefix cache (`prefix_cache_bytes`,
  0 = off), keyed by IMAGE_KEY (preprocessing's hash of the image bytes) and the prefix's ids.
- `static`: the requests the dynamic batcher hands over generate as one batch through
  runtime.generate, to the end of the longest, inside `execute` (facert's first server; kept for
  comparison).

Native with a TensorRT-LLM engine (parameter llm_backend=tensorrtllm): each request is forwarded
through BLS to the `tensorrt_llm` model (tensorrtllm backend, in-flight batching) with the same
prompt-table scheme: its input ids, ids >= vocab_size included, and the image/seg rows as
prompt_embedding_table; its streamed tokens come back here.

Either way the text is detokenised here with the pipeline's own TextStream (the detokeniser's
state lives with the generation loop). With STREAM a response goes out for every token; the last
response of every request carries the finish reason, the timings and the attribute
probabilities, then the request is closed.

Reliability:
- Cancellation: a request whose client cancelled it or went away stops generating at its next
  token and is closed with a CANCELLED error; the batch's KV cache is freed when its last request
  ends. Called directly, Triton marks this step's own request cancelled; inside the ensemble,
  2.51 marks only the postprocessing requests that follow, so postprocessing tells this step by
  the request's CANCEL_KEY (runtime.serving.python_backend.CancelFlags).
- Deadline: a request sent with a timeout (the client's `timeout`, in microseconds, which also
  bounds its wait in every queue) stops generating once that much time has passed since it
  reached the server, and fails with a message saying so (the tokens it streamed stay sent).
- Metrics on the server's metrics endpoint: `facert_generated_tokens_total` (every token this
  step generated, cancelled requests' included) and `facert_llm_requests_total` by outcome
  (stop, length, cancelled, timeout, error, overloaded). In-flight also: the gauges
  `facert_waiting_requests` (admitted to this step, not yet in a slot: what an autoscaler should
  read, as Triton's own queue stays near empty when the queue lives in the model),
  `facert_active_slots` and `facert_free_slots`; the counters `facert_prefix_cache_hits_total` /
  `facert_prefix_cache_misses_total`; the histograms `facert_time_to_first_token_seconds` (from
  the request's arrival at the server) and `facert_inter_token_latency_seconds`.
"""

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.generate import SamplingParams, generate
from runtime.pipeline import STAGES, TextStream
from runtime.prompt import splice_prompt_table
from runtime.serving.caches import content_key
from runtime.serving.native import tensorrt_llm_inputs
from runtime.serving.python_backend import (CancelFlags, Step, bytes_tensor, error_response, image_key,
                                            make_response, read_inputs)
from runtime.serving.scheduler import (GenRequest, InflightScheduler, Outcome, Overloaded, SchedulerConfig,
                                       SchedulerObserver)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTCOMES = ("stop", "length", "cancelled", "timeout", "error", "overloaded")
# seconds; TTFT as vLLM's buckets, reaching further for CPU prefill under load
TTFT_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0]
ITL_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0]
MAX_UNSENT = 2  # in-flight: tokens a request may be generated ahead of its sent responses
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
    cancel_flags: CancelFlags
    deadline: float | None = None  # time.time() after which generation stops (the request's timeout)
    timeout_ms: float = 0.0
    key: str = field(default_factory=lambda: uuid.uuid4().hex)  # CANCEL_KEY: names this request to postprocessing
    ended: str = ""  # why generation was stopped early: "cancelled" or "timeout"
    emitted: list = field(default_factory=list)
    image_key: str | None = None  # preprocessing's hash of the image bytes (IMAGE_KEY), if sent
    queued: int = 0  # in-flight: tokens handed to the sender thread (written by the scheduler thread only)
    sent: int = 0  # in-flight: tokens the sender thread has sent on (written by the sender thread only)

    def should_stop(self) -> bool:
        """Checked after every token: the client cancelled or left, or the request's deadline passed."""
        if not self.ended:
            if self.cancel_flags.is_marked(self.key) or self.sender.is_cancelled():
                self.ended = "cancelled"
            elif self.deadline is not None and time.time() >= self.deadline:
                self.ended = "timeout"
        return bool(self.ended)

    def stop_reason(self) -> str:
        """The scheduler's should_stop: "cancelled", "timeout" or ""."""
        return self.ended if self.should_stop() else ""

    def may_continue(self) -> bool:
        """The scheduler's may_continue: at most MAX_UNSENT tokens generated ahead of those sent, so
        that a client's cancellation, which reaches this step only through postprocessing as it
        handles the sent responses, stops generation within a few tokens."""
        return self.queued - self.sent < MAX_UNSENT


class Outbox:
    """The sender thread: runs what the scheduler hands it (send a token, finish a request, update a
    metric) in order, so that no response or metric call ever waits on the scheduler thread."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="facert-llm-sender", daemon=True)
        self._thread.start()

    def put(self, fn, *args) -> None:
        self._queue.put((fn, args))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 (one failed send must not stop the others)
                pb_utils.Logger.log_error(f"llm sender: {type(e).__name__}: {e}")

    def close(self, timeout_s: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)


class TritonMetrics(SchedulerObserver):
    """The scheduler's reports as Triton metrics, set from the sender thread."""

    def __init__(self, model: "TritonPythonModel"):
        labels = {"model": model.name}

        def family(name, kind, description):
            f = pb_utils.MetricFamily(name=name, description=description, kind=kind)
            model.metric_families.append(f)  # the families must outlive their metrics
            return f

        gauge, counter, histogram = (pb_utils.MetricFamily.GAUGE, pb_utils.MetricFamily.COUNTER,
                                     pb_utils.MetricFamily.HISTOGRAM)
        self.waiting = family("facert_waiting_requests", gauge, "Requests admitted to the llm step, waiting for a "
                                                                "KV-cache slot").Metric(labels=labels)
        self.active = family("facert_active_slots", gauge, "KV-cache slots holding a request").Metric(labels=labels)
        self.free = family("facert_free_slots", gauge, "KV-cache slots free").Metric(labels=labels)
        self.hits = family("facert_prefix_cache_hits_total", counter,
                           "Requests whose prompt prefix (image and seg rows) came from the prefix cache"
                           ).Metric(labels=labels)
        self.misses = family("facert_prefix_cache_misses_total", counter,
                             "Requests whose prompt prefix was not in the prefix cache").Metric(labels=labels)
        self.ttft = family("facert_time_to_first_token_seconds", histogram,
                           "Time from a request's arrival at the server to its first token"
                           ).Metric(labels=labels, buckets=TTFT_BUCKETS)
        self.itl = family("facert_inter_token_latency_seconds", histogram,
                          "Time between two consecutive tokens of a request").Metric(labels=labels, buckets=ITL_BUCKETS)
        self.outbox = model.outbox

    def gauges(self, waiting, active, free):
        self.outbox.put(self._set, waiting, active, free)

    def _set(self, waiting, active, free):
        self.waiting.set(waiting)
        self.active.set(active)
        self.free.set(free)

    def prefix_cache(self, hit):
        self.outbox.put((self.hits if hit else self.misses).increment, 1)

    def first_token(self, seconds):
        self.outbox.put(self.ttft.observe, seconds)

    def inter_token(self, seconds):
        self.outbox.put(self.itl.observe, seconds)


class TritonPythonModel(Step):
    parts = ("llm",)

    def wants_pipeline(self) -> bool:
        return self.params.get("llm_backend") != "tensorrtllm"

    def setup(self):
        self.has_attributes = "ATTRIBUTE_PROBS_OUT" in self.output_names
        self.num_attributes = next((o["dims"][-1] for o in self.model_config.get("output", [])
                                    if o["name"] == "ATTRIBUTE_PROBS_OUT"), 0)
        # the families must outlive their metrics, so the model holds them too
        labels = {"model": self.name}
        self.metric_families = [
            pb_utils.MetricFamily(name="facert_generated_tokens_total", kind=pb_utils.MetricFamily.COUNTER,
                                  description="Tokens generated by the llm step (cancelled and timed-out "
                                              "requests' included)"),
            pb_utils.MetricFamily(name="facert_llm_requests_total", kind=pb_utils.MetricFamily.COUNTER,
                                  description="Requests the llm step finished, by outcome "
                                              "(stop, length, cancelled, timeout, error)")]
        self.tokens_metric = self.metric_families[0].Metric(labels=labels)
        self.outcome_metrics = {r: self.metric_families[1].Metric(labels=dict(labels, outcome=r)) for r in OUTCOMES}
        self.cancel_flags = CancelFlags()
        self.timing_inputs = [n for n in self.input_names if n.endswith("_MS")]
        self.scheduler = None
        if self.pipe is not None:
            self.tokenizer, self.vocab_size = self.pipe.tokenizer, self.pipe.c.vocab_size
            self.eos_ids = self.pipe.eos_token_ids
            if hasattr(self.pipe.c, "decode_spins"):  # onnxruntime: say which, FACERT_ORT_SPIN may have changed it
                pb_utils.Logger.log_info(f"llm: the onnxruntime decode graph's workers "
                                         f"{'spin' if self.pipe.c.decode_spins else 'sleep'} between ops")
            if self.params.get("scheduler", "inflight") == "inflight":
                self._start_scheduler()
        else:  # tensorrtllm: the tokenizer and vocabulary size come from the engines folder
            from runtime.tokenizer import load_tokenizer

            engines = Path(self.params["engines"])
            self.tokenizer = load_tokenizer(engines)
            self.vocab_size = int(json.loads((engines / "manifest.json").read_text())["model"]["vocab_size"])
            eos = self.tokenizer.eos_token_id
            self.eos_ids = tuple(x for x in ([eos] if isinstance(eos, int) else (eos or [])) if x is not None)

    def _start_scheduler(self) -> None:
        from runtime.backends.base import SlotLLM

        llm = self.pipe.c.llm
        if not isinstance(llm, SlotLLM):
            pb_utils.Logger.log_warn(f"llm: the {self.pipe.c.backend} backend has no KV-cache slots; "
                                     "serving with the static scheduler")
            return
        config = SchedulerConfig(slots=int(self.params["kv_slots"]), slot_tokens=int(self.params["slot_tokens"]),
                                 prefill_chunk=int(self.params["prefill_chunk"]),
                                 max_waiting=int(self.params["max_waiting"]),
                                 prefix_cache_bytes=int(self.params["prefix_cache_bytes"]))
        # a request that sets no timeout of its own waits for a slot at most the queue's default
        # (facert repo --queue-timeout-ms), as it would in Triton's queue; 0: no bound
        policy = self.model_config.get("dynamic_batching", {}).get("default_queue_policy", {})
        self.queue_timeout_s = int(policy.get("default_timeout_microseconds", 0)) / 1e6 or None
        self.outbox = Outbox()
        self.scheduler = InflightScheduler(llm, self.eos_ids, config, TritonMetrics(self), pb_utils.Logger.log_error)
        self.scheduler.start()

    def finalize(self):
        if self.scheduler is not None:
            self.scheduler.stop()
            self.outbox.close()

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
        timings["prompt_tokens"] = int(gen.get("prompt_tokens", ids.shape[1]))
        probs = x["ATTRIBUTE_PROBS"][:1].astype(np.float32) if "ATTRIBUTE_PROBS" in x else None
        timeout_us = request.timeout()  # 0: none
        deadline = gen["received_at"] + timeout_us / 1e6 if timeout_us else None
        return Active(request.get_response_sender(), ids, torch.from_numpy(table), params, gen["stream"], timings,
                      probs, self.cancel_flags, deadline, timeout_us / 1e3, image_key=image_key(x),
                      key=gen.get("cancel_key") or uuid.uuid4().hex)  # the gateway's key, when it gave one

    def _response(self, a: Active, text: str, token_ids, finish: str = "", timings: dict | None = None, probs=None):
        out = {"TEXT": bytes_tensor([text]), "TOKEN_IDS": np.array([token_ids], np.int64).reshape(1, -1),
               "FINISH_REASON": bytes_tensor([finish]),
               "TIMINGS": bytes_tensor([json.dumps(timings) if timings else ""]), "CANCEL_KEY": bytes_tensor([a.key])}
        if self.has_attributes:
            out["ATTRIBUTE_PROBS_OUT"] = probs if probs is not None else np.zeros((1, 0, self.num_attributes), np.float32)
        return make_response(out)

    def _token(self, a: Active, stream: TextStream, token: int) -> None:
        self.tokens_metric.increment(1)
        piece = stream.push(token)
        a.emitted.append(piece)
        if a.stream and not a.ended:
            # the first token's response carries the prompt's length too, so that a client that stops
            # reading before the end (the OpenAI endpoint at a stop string) still has it for its usage
            first = {"prompt_tokens": a.timings["prompt_tokens"]} if len(a.emitted) == 1 else None
            a.sender.send(self._response(a, piece, [token], timings=first))

    def _fail(self, a: Active, response, outcome: str = "error") -> None:
        """Close the request with an error response."""
        self.outcome_metrics[outcome].increment(1)
        self.cancel_flags.clear(a.key)
        try:
            a.sender.send(response, flags=FINAL)
        except Exception:  # noqa: BLE001 (a cancelled request's client is gone: nothing is left to tell it)
            pass

    def _finish(self, a: Active, tokens: list[int], reason: str, prefill_s: float, decode_s: float,
                extra: dict | None = None) -> None:
        if a.ended == "cancelled":  # with Triton's code for a cancelled request
            error = pb_utils.TritonError(f"request cancelled by the client after {len(tokens)} generated tokens",
                                         pb_utils.TritonError.CANCELLED)
            self._fail(a, pb_utils.InferenceResponse(error=error), "cancelled")
            return
        if a.ended == "timeout":
            error = pb_utils.TritonError(f"request timed out: its {a.timeout_ms:.0f} ms timeout passed after "
                                         f"{len(tokens)} generated tokens")
            self._fail(a, pb_utils.InferenceResponse(error=error), "timeout")
            return
        self.outcome_metrics[reason].increment(1)
        self.cancel_flags.clear(a.key)
        full = self.tokenizer.decode(tokens, skip_special_tokens=True)
        timings = dict(a.timings, prefill_ms=prefill_s * 1e3, decode_ms=decode_s * 1e3,
                       decode_tokens_per_s=len(tokens) / decode_s if decode_s > 0 else 0.0, **(extra or {}))
        if a.stream:  # what the stream held back (a character split across tokens), if anything
            text, ids = full[len("".join(a.emitted)):], []
        else:
            text, ids = full, tokens
        a.sender.send(self._response(a, text, ids, reason, timings, a.probs), flags=FINAL)

    def execute(self, requests):
        active = []
        for r in requests:
            try:
                active.append(self._prepare(r))
            except Exception as e:  # noqa: BLE001 (this request fails alone, with the message)
                self.outcome_metrics["error"].increment(1)
                r.get_response_sender().send(error_response(e), flags=FINAL)
        if self.scheduler is not None:
            for a in active:
                self._submit(a)
        elif self.pipe is None:
            for a in active:  # TensorRT-LLM batches in flight: one BLS stream per request
                threading.Thread(target=self._run_tensorrtllm, args=(a,), daemon=True).start()
        elif active:
            self._run_generate(active)
        self.cancel_flags.sweep()
        return None

    # ------------------------------------------------------------------ in-flight (portable, default)

    def _submit(self, a: Active) -> None:
        """Onto the scheduler's admission queue (returns at once), or refused at once."""
        try:
            c = self.pipe.c
            embeds = splice_prompt_table(c.llm.embed, a.ids, a.table.to(c.llm.device), c.vocab_size)[0]
            prefix_key, prefix_len = self._prefix(a)
            stream = TextStream(self.tokenizer)
            req = GenRequest(embeds, a.params, on_token=lambda token: self._queue_token(a, stream, token),
                             on_done=lambda outcome: self.outbox.put(self._done, a, outcome),
                             should_stop=a.stop_reason, may_continue=a.may_continue, prefix_key=prefix_key,
                             prefix_len=prefix_len, arrived=a.timings["received_at"],
                             max_wait_s=None if a.deadline is not None else self.queue_timeout_s)
            self.scheduler.submit(req)
        except Overloaded as e:  # Triton's code for a full queue: the client may retry later
            self._fail(a, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.UNAVAILABLE)),
                       "overloaded")
        except Exception as e:  # noqa: BLE001 (this request fails alone, with the message)
            self._fail(a, error_response(e))

    def _queue_token(self, a: Active, stream: TextStream, token: int) -> None:
        """On the scheduler thread: hand the token to the sender thread."""
        a.queued += 1
        self.outbox.put(self._send_token, a, stream, token)

    def _send_token(self, a: Active, stream: TextStream, token: int) -> None:
        """On the sender thread."""
        try:
            self._token(a, stream, token)
        finally:
            a.sent += 1
            self.scheduler.wake()

    def _prefix(self, a: Active) -> tuple[str | None, int]:
        """The prefix cache's key and length: the prompt up to its last image or seg row, named by the
        image's content hash and those ids (never shared across images: their placeholder ids are equal)."""
        ids = a.ids[0]
        rows = (ids >= self.vocab_size).nonzero()
        if a.image_key is None or rows.numel() == 0:
            return None, 0
        n = int(rows[-1]) + 1
        if n >= ids.numel():
            return None, 0
        return content_key("prefix", a.image_key, ids[:n].numpy().astype("<i8").tobytes()), n

    def _done(self, a: Active, outcome: Outcome) -> None:
        """On the sender thread: the request's final response."""
        if outcome.reason == "error":
            self._fail(a, error_response(outcome.error))
            return
        if outcome.reason == "timeout" and not a.ended:  # waited longer than the queue timeout for a slot
            self._fail(a, pb_utils.InferenceResponse(error=pb_utils.TritonError(str(outcome.error))), "timeout")
            return
        extra = {"llm_queue_ms": outcome.queue_s * 1e3, "prefix_cached_tokens": outcome.prefix_tokens}
        self._finish(a, outcome.tokens, outcome.reason, outcome.prefill_s, outcome.decode_s, extra)

    # ------------------------------------------------------------------ runtime.generate (static)

    def _run_generate(self, active: list[Active]) -> None:
        c = self.pipe.c
        streams = [TextStream(self.tokenizer) for _ in active]
        try:
            embeds = [splice_prompt_table(c.llm.embed, a.ids, a.table.to(c.llm.device), c.vocab_size)[0] for a in active]
            res = generate(c.llm, embeds, [a.params for a in active], self.eos_ids,
                           on_token=lambda i, tok: self._token(active[i], streams[i], tok),
                           should_stop=lambda i: active[i].should_stop())
        except Exception as e:  # noqa: BLE001 (every request of the batch gets the error)
            for a in active:
                self._fail(a, error_response(e))
            return
        for i, a in enumerate(active):
            self._finish(a, res.tokens[i], res.finish_reasons[i], res.prefill_s, res.decode_s)

    # ------------------------------------------------------------------- TensorRT-LLM through BLS

    def _run_tensorrtllm(self, a: Active) -> None:
        from torch.utils.dlpack import to_dlpack

        try:
            p = a.params
            table_dtype = PROMPT_TABLE_DTYPES[self.params.get("prompt_table_type", "TYPE_FP16")]
            table = a.table[0].to(table_dtype).contiguous()  # [P, D]; the batch axis is the request's
            arrays = tensorrt_llm_inputs(a.ids.numpy(), p, self.eos_ids, table.shape[0])
            inputs = [pb_utils.Tensor(name, array) for name, array in arrays.items()]
            inputs.append(pb_utils.Tensor.from_dlpack("prompt_embedding_table", to_dlpack(table[None])))
            stops = set(self.eos_ids) | set(p.stop_token_ids)  # the engine stops at these too (stop_words_list)
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
                    if token in stops:
                        stopped = True
                        break
                    if len(tokens) < p.max_new_tokens:
                        tokens.append(int(token))
                        self._token(a, stream, int(token))
                # Stop reading at a stop token, on cancellation or at the deadline; 2.51's BLS response
                # iterator cannot cancel the tensorrt_llm request itself, which runs to its own end.
                if stopped or a.should_stop():
                    break
            end = time.perf_counter()
            first = first if first is not None else end
            reason = "stop" if stopped or len(tokens) < p.max_new_tokens else "length"
            self._finish(a, tokens, reason, first - t0, end - first)
        except Exception as e:  # noqa: BLE001 (the request gets the message)
            self._fail(a, error_response(e))
