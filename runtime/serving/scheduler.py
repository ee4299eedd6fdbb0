"""In-flight batching for the served LLM step: one thread, S KV-cache slots, one iteration at a time.

The pattern of the Triton backends of TensorRT-LLM (in-flight batching) and vLLM (continuous
batching), over runtime.generate's slot interface (`new_slots`, `slot_rows`, `forward_slots`), so
it runs on the torch and onnxruntime LLMs alike and needs no Triton (tests/test_inflight.py drives
it directly):

- `submit()` puts a request on a bounded admission queue and returns at once; a full queue raises
  `Overloaded` (its message carries Triton's "Exceeds maximum queue size", which clients read as
  back-pressure). A request that cannot fit a slot (prompt + max_tokens over the slot length) is
  refused there too, with a message saying so.
- One scheduler thread owns the LLM and the slots. Each iteration (`step()`):
  1. drops the waiting and running requests whose `should_stop()` says cancelled or timed out,
     and the waiting ones that waited longer than their `max_wait_s`, freeing their slots at once;
  2. admits waiting requests first come, first served while a slot is free (a prompt's prefix found
     in the prefix cache is copied into the slot, and only the rest is prefilled);
  3. prefills, oldest admission first, in chunks cut at fixed multiples of `prefill_chunk` from each
     prompt's start and at the end of its cacheable prefix, at most `prefill_chunk` tokens per
     iteration (at least one chunk), so the running requests wait at most one chunk between two
     tokens. A prompt is cut the same way whatever else runs and whether its prefix came from the
     cache or not, so its rows and logits are computed the same way either way;
  4. runs one decode step over every decoding slot at once (rows 0 .. highest decoding slot; each row
     its own position and mask), samples each request's next token with its own parameters and
     seeded generator, and hands it to the request's `on_token`; a request that stops (a stop token,
     max_tokens) gets `on_done` at once and leaves its slot. A request whose `may_continue()` says
     no sits this step out (the served step says so while its sent responses lag behind: a
     client's cancellation reaches this step only through the responses it sends, so a request
     must not run far ahead of them). An iteration with nothing to do waits for `wake()` (or 2 ms).
  Greedy tokens do not depend on what else runs: a row's attention reads only its own slot, its
  chunks are cut the same way, its sampling uses only its own logits, and the backends decode in a
  shape whose per-row arithmetic does not change with the number of rows (runtime.generate).
- Callbacks run on the scheduler thread and must not block: the served step queues them for its
  sender thread, which does the detokenising, sending and metrics.

Prefix cache: a request may name a prefix (`prefix_key`, `prefix_len`: the prompt's first tokens,
up to the end of its image and seg rows). When a request's prefill passes that length, the slot's
K/V rows of the prefix are copied into a bounded LRU store (runtime.serving.caches.BytesLRU); a
later request with the same key copies them into its own slot and prefills only the rest, so while
the first request is still generating the store already holds its prefix. The key must name
everything the rows depend on: the served step builds it from the request's IMAGE_KEY (a hash of its
image bytes) and the prefix's token ids, so two different images never share rows.
"""

from __future__ import annotations

import itertools
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from runtime.generate import SamplingParams, sample_next
from runtime.serving.caches import BytesLRU

OUTCOMES = ("stop", "length", "cancelled", "timeout", "error")


class Overloaded(RuntimeError):
    """The admission queue is full: the request is refused at once (retry later)."""


@dataclass
class SchedulerConfig:
    slots: int = 8  # S: requests generating at once, each in its own KV-cache slot
    slot_tokens: int = 1024  # L: positions per slot (prompt + max_tokens must fit)
    prefill_chunk: int = 256  # prompt tokens per chunk, and per iteration
    max_waiting: int = 64  # admission queue bound: one more is refused as overloaded
    prefix_cache_bytes: int = 256 * 2**20  # the prefix store's bound (0: no prefix cache)

    def validate(self) -> "SchedulerConfig":
        for name, low in (("slots", 1), ("slot_tokens", 2), ("prefill_chunk", 1), ("max_waiting", 1),
                          ("prefix_cache_bytes", 0)):
            if int(getattr(self, name)) < low:
                raise ValueError(f"scheduler {name} must be >= {low}, got {getattr(self, name)}")
        return self


@dataclass
class Outcome:
    """How a request ended: reason (one of OUTCOMES), the tokens it generated, the error if any, and
    where its time went (seconds: waiting for a slot, admission to first token, first to last token)."""

    reason: str
    tokens: list[int]
    error: BaseException | None = None
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefix_tokens: int = 0  # prompt tokens taken from the prefix cache


def _nothing(*_args) -> None:
    return None


@dataclass(eq=False)
class GenRequest:
    """One request for the scheduler: its spliced prompt and what to call as it runs."""

    embeds: torch.Tensor  # [T, D]: the prompt's embeddings, image and seg rows spliced in
    params: SamplingParams
    on_token: Callable[[int], None] = _nothing  # every kept token (stop tokens are not kept)
    on_done: Callable[[Outcome], None] = _nothing  # once, at the end, whatever the end
    should_stop: Callable[[], str] = lambda: ""  # "cancelled" / "timeout" to stop it, else ""
    # False holds the request back from this iteration's decode step (its responses are not sent
    # yet: the served step keeps generation at most a few tokens ahead of what it has sent)
    may_continue: Callable[[], bool] = lambda: True
    prefix_key: str | None = None  # names the first prefix_len tokens' K/V (None: no prefix caching)
    prefix_len: int = 0
    arrived: float = field(default_factory=time.time)  # wall clock at the server; TTFT counts from it
    max_wait_s: float | None = None  # refused as timed out if still waiting for a slot after this long


class SchedulerObserver:
    """What the scheduler reports as it runs (no-ops here; the served step turns them into metrics)."""

    def gauges(self, waiting: int, active: int, free: int) -> None:
        pass

    def prefix_cache(self, hit: bool) -> None:
        pass

    def first_token(self, seconds: float) -> None:
        pass

    def inter_token(self, seconds: float) -> None:
        pass


@dataclass(eq=False)
class _Running:
    req: GenRequest
    slot: int
    seq: int  # admission order
    submitted: float
    admitted: float
    generator: torch.Generator | None
    stops: frozenset
    prefilled: int = 0  # prompt positions written to the slot
    length: int = 0  # positions written (prompt, then each fed token)
    next_token: int | None = None  # sampled, not yet fed back
    tokens: list = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    prefix_tokens: int = 0
    prefix_stored: bool = False


class InflightScheduler:
    def __init__(self, llm, eos_token_ids=(), config: SchedulerConfig | None = None,
                 observer: SchedulerObserver | None = None, log: Callable[[str], None] = print):
        self.config = (config or SchedulerConfig()).validate()
        self.llm = llm
        self.eos_token_ids = tuple(eos_token_ids)
        self.observer = observer or SchedulerObserver()
        self.log = log
        self.slots = llm.new_slots(self.config.slots, self.config.slot_tokens)
        self.prefixes = BytesLRU(self.config.prefix_cache_bytes)
        self._running: list[_Running | None] = [None] * self.config.slots
        self._waiting: deque = deque()  # (GenRequest, submitted perf_counter)
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._reported: tuple | None = None
        self.last_step = {"prefill_tokens": 0, "decode_rows": 0}  # what the last iteration ran

    # ------------------------------------------------------------------------------ the outside

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(r is not None for r in self._running)

    @property
    def free(self) -> int:
        return self.config.slots - self.active

    def submit(self, req: GenRequest) -> None:
        """Queue a request (returns at once); ValueError if it cannot fit a slot, Overloaded if full."""
        req.params.validate()
        t = int(req.embeds.shape[0])
        need = t + int(req.params.max_new_tokens)
        if t < 1:
            raise ValueError("the prompt is empty")
        if need > self.config.slot_tokens:
            raise ValueError(f"prompt ({t} tokens) + max_tokens ({req.params.max_new_tokens}) = {need} tokens, over "
                             f"the {self.config.slot_tokens} tokens of this server's KV-cache slots: lower max_tokens "
                             f"(or serve with a larger `facert repo --slot-tokens`)")
        if req.prefix_key is not None and not 0 < req.prefix_len < t:
            raise ValueError(f"a prefix of {req.prefix_len} tokens must leave some of the {t}-token prompt to prefill")
        with self._cv:
            if self._stopping:
                raise RuntimeError("the llm step is shutting down")
            if len(self._waiting) >= self.config.max_waiting:
                raise Overloaded(f"server overloaded: Exceeds maximum queue size: {len(self._waiting)} requests are "
                                 f"waiting for one of the llm step's {self.config.slots} KV-cache slots "
                                 f"(max_queue_size {self.config.max_waiting}); retry later")
            self._waiting.append((req, time.perf_counter()))
            self._cv.notify()
        self._report()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="facert-inflight-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the thread; every request still waiting or running ends with an error."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)
        error = RuntimeError("the llm step is shutting down")
        with self._cv:
            waiting, self._waiting = list(self._waiting), deque()
        for req, submitted in waiting:
            self._done_waiting(req, submitted, "error", error)
        for r in list(self._running):
            if r is not None:
                self._end(r, "error", error)

    def wake(self) -> None:
        """Something a held-back iteration waits for happened (a response went out)."""
        with self._cv:
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and self.active == 0:
                    self._cv.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # noqa: BLE001 (a bug must not end the thread: its requests fail)
                self.log(f"llm scheduler: {traceback.format_exc()}")
                with self._cv:
                    waiting, self._waiting = list(self._waiting), deque()
                for req, submitted in waiting:
                    self._done_waiting(req, submitted, "error", e)
                for r in list(self._running):
                    if r is not None:
                        self._end(r, "error", e)
            if not (self.last_step["prefill_tokens"] or self.last_step["decode_rows"]):
                with self._cv:  # held back (or only waiting for a slot): do not spin
                    if not self._stopping:
                        self._cv.wait(0.002)

    # ------------------------------------------------------------------------------ one iteration

    def step(self) -> None:
        """One iteration: drop, admit, prefill (chunked), decode."""
        self._drop_stopped()
        self._admit()
        self._prefill()
        self._decode()
        self._report()

    @staticmethod
    def _waited_too_long(req: GenRequest, submitted: float, now: float) -> tuple[str, BaseException] | None:
        if req.max_wait_s is None or now - submitted <= req.max_wait_s:
            return None
        return "timeout", TimeoutError(f"request timed out: it waited {(now - submitted) * 1e3:.0f} ms for a KV-cache "
                                       f"slot, over the {req.max_wait_s * 1e3:.0f} ms queue timeout")

    @staticmethod
    def _stop_reason(req: GenRequest) -> tuple[str, BaseException | None]:
        try:
            return req.should_stop(), None
        except Exception as e:  # noqa: BLE001 (a request that cannot say ends with the error)
            return "error", e

    def _drop_stopped(self) -> None:
        with self._cv:
            waiting = list(self._waiting)
        now = time.perf_counter()
        dropped = [(req, submitted, why) for req, submitted in waiting
                   if (why := self._waited_too_long(req, submitted, now) or self._stop_reason(req))[0]]
        if dropped:
            gone = {id(req) for req, _, _ in dropped}
            with self._cv:
                self._waiting = deque(w for w in self._waiting if id(w[0]) not in gone)
            for req, submitted, (why, error) in dropped:
                self._done_waiting(req, submitted, why, error)
        for r in list(self._running):
            if r is not None:
                why, error = self._stop_reason(r.req)
                if why:
                    self._end(r, why, error)

    def _admit(self) -> None:
        while True:
            free = next((i for i, r in enumerate(self._running) if r is None), None)
            if free is None:
                return
            with self._cv:
                if not self._waiting:
                    return
                req, submitted = self._waiting.popleft()
            p = req.params
            generator = None
            if p.temperature > 0:  # seeded as runtime.generate seeds it, so a request samples the same there
                generator = torch.Generator()
                generator.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item()))
            r = _Running(req, free, next(self._seq), submitted, time.perf_counter(), generator,
                         frozenset(self.eos_token_ids) | frozenset(p.stop_token_ids))
            self._running[free] = r
            if req.prefix_key is not None and self.prefixes.enabled:
                entry = self.prefixes.get(req.prefix_key)
                self.observer.prefix_cache(entry is not None)
                if entry is not None:
                    n, keys, values = entry
                    for layer, (k, v) in enumerate(zip(keys, values)):
                        self.slots.keys[layer][free, :, :n].copy_(k)
                        self.slots.values[layer][free, :, :n].copy_(v)
                    r.prefilled = r.length = r.prefix_tokens = n
                    r.prefix_stored = True

    def _prefill(self) -> None:
        chunk = self.config.prefill_chunk
        spent = self.last_step["prefill_tokens"] = 0
        for r in sorted((r for r in self._running if r is not None and r.next_token is None and r.first_at is None),
                        key=lambda r: r.seq):
            embeds = r.req.embeds
            total = int(embeds.shape[0])
            while r.prefilled < total:
                end = min(total, (r.prefilled // chunk + 1) * chunk)
                if r.req.prefix_key is not None and r.prefilled < r.req.prefix_len:
                    end = min(end, r.req.prefix_len)
                n = end - r.prefilled
                if spent and spent + n > chunk:
                    return
                try:
                    logits = self.llm.forward_slots(self.slots, embeds[None, r.prefilled:end], r.slot,
                                                    torch.tensor([r.prefilled]))
                except Exception as e:  # noqa: BLE001 (this request fails alone)
                    self._end(r, "error", e)
                    break
                spent += n
                self.last_step["prefill_tokens"] = spent
                r.prefilled = r.length = end
                self._store_prefix(r)
                if end == total:
                    self._sampled(r, logits[0])

    def _store_prefix(self, r: _Running) -> None:
        req = r.req
        if r.prefix_stored or req.prefix_key is None or not self.prefixes.enabled or r.prefilled < req.prefix_len:
            return
        n = req.prefix_len
        keys = [k[r.slot, :, :n].clone() for k in self.slots.keys]
        values = [v[r.slot, :, :n].clone() for v in self.slots.values]
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        self.prefixes.put(req.prefix_key, (n, keys, values), nbytes)
        r.prefix_stored = True

    def _decode(self) -> None:
        decoding = [r for r in self._running if r is not None and r.next_token is not None and r.req.may_continue()]
        self.last_step["decode_rows"] = len(decoding)
        if not decoding:
            return
        rows = min(self.llm.slot_rows(max(r.slot for r in decoding) + 1, self.config.slots), self.config.slots)
        ids = torch.zeros(rows, 1, dtype=torch.long)
        # the rows not decoding (free, prefilling or held-back slots) write only at their first
        # unwritten position, which nothing reads before it is written again
        starts = torch.tensor([0 if r is None else r.length for r in self._running[:rows]])
        for r in decoding:
            ids[r.slot, 0] = r.next_token
        embeds = self.llm.embed(ids)
        try:
            logits = self.llm.forward_slots(self.slots, embeds, 0, starts)
        except Exception as e:  # noqa: BLE001 (the requests of this step fail with the error)
            for r in decoding:
                self._end(r, "error", e)
            return
        for r in decoding:
            r.length += 1
            self._sampled(r, logits[r.slot])

    def _sampled(self, r: _Running, logits: torch.Tensor) -> None:
        """The next token of r from its logits: kept and streamed, or the end of r."""
        p = r.req.params
        token = sample_next(logits, p, r.generator)
        now = time.perf_counter()
        if token in r.stops:
            self._end(r, "stop")
            return
        r.tokens.append(token)
        if r.first_at is None:
            r.first_at = now
            self.observer.first_token(max(0.0, time.time() - r.req.arrived))
        else:
            self.observer.inter_token(now - r.last_at)
        r.last_at = now
        r.req.on_token(token)
        if len(r.tokens) >= p.max_new_tokens:
            self._end(r, "length")
        else:
            r.next_token = token

    def _end(self, r: _Running, reason: str, error: BaseException | None = None) -> None:
        """r leaves its slot now, with its final outcome."""
        if self._running[r.slot] is r:
            self._running[r.slot] = None
        end = r.last_at or time.perf_counter()
        first = r.first_at or end
        outcome = Outcome(reason, r.tokens, error, r.admitted - r.submitted, first - r.admitted, end - first,
                          r.prefix_tokens)
        self._call_done(r.req, outcome)

    def _done_waiting(self, req: GenRequest, submitted: float, reason: str, error: BaseException | None = None) -> None:
        self._call_done(req, Outcome(reason, [], error, time.perf_counter() - submitted))

    def _call_done(self, req: GenRequest, outcome: Outcome) -> None:
        try:
            req.on_done(outcome)
        except Exception:  # noqa: BLE001 (one request's callback must not stop the others)
            self.log(f"llm scheduler: on_done failed: {traceback.format_exc()}")

    def _report(self) -> None:
        # under the lock, so that the submitting thread's and the scheduler's reports arrive in the
        # order they were counted (the scheduler reports again after each iteration)
        with self._cv:
            counts = (len(self._waiting), self.active, self.free)
            if counts != self._reported:
                self._reported = counts
                self.observer.gauges(*counts)
