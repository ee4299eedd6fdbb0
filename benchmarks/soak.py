"""Soak the served pipeline: many streamed requests, mixed valid, malformed and cancelled, with the
server's memory watched throughout.

    .venv/bin/python benchmarks/soak.py [--requests 1000] [--concurrency 64] [--max-seconds 1800]
        [--checkpoint DIR | --url 127.0.0.1:8001 --server-pid PID] [--out DIR] [--shared "note"]
    .venv/bin/python benchmarks/soak.py --per-case 64     # what tritonserver keeps per kind of request

Without --url it builds the tiny checkpoint in a temporary folder (or uses --checkpoint), fills a
model repository and starts its own tritonserver on free loopback ports; with --url it loads a
running server (loopback only) and watches the memory of --server-pid and its children.

Closed loop: `concurrency` workers, each sending its next request as soon as the previous one ended
on its own gRPC stream (tritonclient.grpc.aio, ModelStreamInfer, STREAM=true), kept from request to
request and opened anew after the worker cancelled it (--stream-per-request: a new stream for every
request; see `Stream`). The mix, drawn
per request from a seeded generator:

  valid       an image and a question, 1..max_tokens tokens, greedy or seeded sampling: must end
              with a finish reason (stop or length)
  malformed   one case of the malformed-request corpus (`MALFORMED`, images, text, tensor types and
              shapes, parameters): must be refused with the message the corpus names
  cancelled   a valid request the client cancels after a few tokens; the server must stop it (its
              own count of cancelled requests, facert_llm_requests_total{outcome="cancelled"})

A request refused as overloaded (the server already holds all it can) is sent again after a jittered,
doubling backoff, for up to two minutes, as a well-behaved client does; the retries are counted.
Anything else is an unexpected error and is counted by kind (overloaded, timeout, unavailable,
cancelled, wrong message, accepted malformed, other). Bounded: it stops handing out requests after
--requests or --max-seconds and gives those in flight --grace-seconds more. Meanwhile a thread
samples, every --sample-seconds, the resident memory (VmRSS from /proc) of tritonserver and of each
of its python-backend stub processes, and the python backend's shared-memory regions.

Memory is judged at rest, not under load: under load the server holds the data of the requests in
flight (images, prompt tables, queued tensors: about 100 MB at concurrency 64 on the tiny model),
which rises and falls with the queues. So the run rests for --rest-seconds three times, with nothing
in flight: before any request, after the warm-up (the first --warmup requests) and at the end. It
is "flat" when the memory at rest at the end exceeds the memory at rest after the warm-up by less
than max(2 %, 64 MB); what each process kept is reported beside it.

Results: <out>/soak.json (everything), soak.md (summary) and soak.png (memory over time, requests
done), by default under benchmarks/results/<date>-cpu-<machine>/.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.corpus import (QUESTIONS, Malformed, _png, apply_changes, good_grpc_tensors,  # noqa: E402
                               malformed_corpus, malformed_inputs, send_malformed)
from benchmarks.memory import MemorySampler, _total, memory_verdict, rss_mb  # noqa: E402


# ----------------------------------------------------------------------------------- the requests

@dataclass
class Record:
    index: int
    kind: str  # valid, malformed or cancel
    case: str = ""  # the malformed case's name
    expect: str = ""  # ... and the piece of its error message
    max_tokens: int = 0
    cancel_after: int = 0  # cancel: tokens to receive before cancelling
    cancel_at_s: float | None = None  # cancel at once: seconds after sending (0-50 ms), whatever came back
    sent: float = 0.0
    first: float | None = None
    done: float | None = None
    tokens: int = 0
    finish: str = ""
    error: str | None = None
    outcome: str = ""  # ok, refused (malformed, as expected), cancelled (by us) or unexpected
    error_kind: str = ""  # for unexpected: overloaded, timeout, unavailable, cancelled, wrong message, ...
    overloaded: int = 0  # times the server refused it as overloaded before taking it (each retried after a backoff)


def soak_images() -> list[bytes]:
    """The astronaut photo, three crops of it and a small flat image."""
    from PIL import Image

    from runtime.cli import DEMO_IMAGE

    photo = DEMO_IMAGE.read_bytes()
    img = Image.open(io.BytesIO(photo)).convert("RGB")
    out = [photo]
    for box in ((0, 0, 512, 512), (100, 0, 400, 300), (150, 20, 350, 260)):
        buf = io.BytesIO()
        img.crop(box).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out + [_png(64, 64)]


def plan_requests(n: int, corpus: list[Malformed], seed: int, max_tokens: int, p_malformed: float,
                  p_cancel: float, n_images: int, p_at_once: float = 0.5) -> list[tuple[Record, dict]]:
    """(record, request settings) for each of n requests, drawn from a seeded generator."""
    rng = random.Random(seed)
    grpc_cases = [c for c in corpus if c.protocol == "grpc" and not c.admin]
    plan = []
    for i in range(n):
        r = rng.random()
        settings = {"image": rng.randrange(n_images), "question": rng.choice(QUESTIONS),
                    "temperature": rng.choice((0.0, 0.0, 0.7)), "seed": i}
        if r < p_malformed:
            case = grpc_cases[i % len(grpc_cases)]
            rec = Record(i, "malformed", case.name, case.expect, max_tokens=4)
            settings["case"] = case
        elif r < p_malformed + p_cancel:
            # long enough that the server is still generating when the cancellation reaches it; a share
            # p_at_once of them cancelled at once, 0-50 ms after sending (the request in the first steps)
            rec = Record(i, "cancel", max_tokens=max(64, 4 * max_tokens), cancel_after=rng.randint(1, 3))
            if rng.random() < p_at_once:
                rec.cancel_after, rec.cancel_at_s = 0, round(rng.uniform(0.0, 0.05), 4)
        else:
            rec = Record(i, "valid", max_tokens=rng.randint(1, max_tokens))
        plan.append((rec, settings))
    return plan


def _str(array) -> str:
    return bytes(array.reshape(-1)[0]).decode("utf-8", "replace") if array is not None and array.size else ""


class Stream:
    """One worker's gRPC stream (ModelStreamInfer), kept for its consecutive requests and replaced after
    the worker cancels it. Clients should keep their streams: tritonserver 2.51 keeps some memory for
    every stream it has served (measured with glibc's malloc: about 0.3 MB a stream; with tcmalloc, as
    `TritonServer` runs it, about 10 KB); --stream-per-request soaks that way instead.
    """

    def __init__(self, client, model: str):
        self.client, self.model = client, model
        self.call = None

    def open(self) -> None:
        self.pending: asyncio.Queue = asyncio.Queue()

        async def requests():
            while (item := await self.pending.get()) is not None:
                yield item

        self.call = self.client.stream_infer(requests())
        self.responses = self.call.__aiter__()

    def close(self) -> None:
        if self.call is not None:
            self.pending.put_nowait(None)
            self.call.cancel()
            self.call = None


async def run_one(stream: Stream, rec: Record, inputs: list, case: Malformed | None = None,
                  overload_wait_s: float = 120.0) -> None:
    """Send one request on the worker's stream; fill in its record (cancelling it after cancel_after tokens,
    or cancel_at_s seconds after sending). A refusal as overloaded (the server holds as many requests as
    it can) is what a well-behaved client retries: again after a jittered, doubling backoff, for up to
    `overload_wait_s`; its times count from the first send."""
    from runtime.client import error_kind

    rng = random.Random(rec.index)
    first_sent, backoff = time.perf_counter(), 0.25
    while True:
        await _send_once(stream, rec, inputs, case)
        if rec.error is None or error_kind(rec.error) != "overloaded" \
                or time.perf_counter() - first_sent > overload_wait_s:
            break
        rec.overloaded += 1
        rec.error = rec.done = None
        await asyncio.sleep(backoff * rng.uniform(0.5, 1.5))
        backoff = min(2 * backoff, 4.0)
    rec.sent = first_sent
    judge(rec)


async def _send_once(stream: Stream, rec: Record, inputs: list, case: Malformed | None) -> None:
    if stream.call is None:
        stream.open()
    rec.sent = time.perf_counter()
    request = {"model_name": (case.model if case else None) or stream.model, "inputs": inputs,
               "request_id": f"soak-{rec.index}"}
    if case is not None and case.parameters:
        request["parameters"] = dict(case.parameters)
    stream.pending.put_nowait(request)
    try:
        while True:
            if rec.cancel_at_s is not None:
                try:
                    result, error = await asyncio.wait_for(
                        stream.responses.__anext__(), max(0.0, rec.sent + rec.cancel_at_s - time.perf_counter()))
                except asyncio.TimeoutError:
                    rec.done = time.perf_counter()
                    stream.close()  # at once: before any answer
                    break
            else:
                result, error = await stream.responses.__anext__()
            now = time.perf_counter()
            if error is not None:
                rec.error, rec.done = (error.message() if hasattr(error, "message") else str(error)), now
                break
            ids = result.as_numpy("TOKEN_IDS")
            n = 0 if ids is None else int(ids.size)
            if n:
                rec.tokens += n
                rec.first = rec.first if rec.first is not None else now
            rec.finish = _str(result.as_numpy("FINISH_REASON"))
            if rec.finish:
                rec.done = now
                break
            if rec.cancel_after and rec.tokens >= rec.cancel_after:
                rec.done = now
                stream.close()  # cancelling the stream cancels the request on it
                break
    except StopAsyncIteration:
        rec.error, rec.done = "the server closed the stream", time.perf_counter()
        stream.close()
    except Exception as e:  # noqa: BLE001 (a transport failure is an outcome to count)
        rec.error, rec.done = f"{type(e).__name__}: {e}", time.perf_counter()
        stream.close()


def judge(rec: Record) -> None:
    """The record's outcome: what its kind of request should get, or unexpected (with the error's kind)."""
    from runtime.client import error_kind

    if rec.kind == "malformed":
        if rec.error is not None and rec.expect in rec.error:
            rec.outcome = "refused"
        else:
            rec.outcome = "unexpected"
            rec.error_kind = ("accepted malformed" if rec.error is None
                              else error_kind(rec.error) if error_kind(rec.error) != "error" else "wrong message")
    elif rec.error is not None:
        rec.outcome, rec.error_kind = "unexpected", error_kind(rec.error)
    elif rec.kind == "cancel" and not rec.finish:
        rec.outcome = "cancelled" if rec.done is not None else "unexpected"
        rec.error_kind = "" if rec.done is not None else "no answer"
    elif rec.finish in ("stop", "length") and rec.tokens <= rec.max_tokens:
        rec.outcome = "ok"
    else:
        rec.outcome, rec.error_kind = "unexpected", f"finish {rec.finish or 'missing'}"


async def run_load(url: str, model: str, plan: list[tuple[Record, dict]], images: list[bytes], concurrency: int,
                   max_seconds: float, grace_seconds: float, progress=lambda done, total: None,
                   stream_per_request: bool = False) -> list[Record]:
    """Closed loop: `concurrency` workers, each on its own stream, take the next planned request until
    the plan or the time is spent."""
    import tritonclient.grpc.aio as aioclient

    from benchmarks.loadgen import run_bounded

    client = aioclient.InferenceServerClient(url)
    deadline = time.perf_counter() + max_seconds
    started: list[Record] = []
    it = iter(plan)

    async def worker():
        stream = Stream(client, model)
        try:
            await work(stream)
        finally:
            stream.close()

    async def work(stream: Stream):
        for rec, s in it:
            if time.perf_counter() >= deadline:
                return
            started.append(rec)
            if "case" in s:
                inputs = malformed_inputs(s["case"], images[0])
            else:
                inputs = apply_changes(good_grpc_tensors(images[s["image"]], s["question"], rec.max_tokens, True,
                                                         s["temperature"], s["seed"]), Malformed("valid", ""))
            await run_one(stream, rec, inputs, s.get("case"))
            if stream_per_request:
                stream.close()
            progress(sum(r.done is not None for r in started), len(plan))

    try:
        await run_bounded([worker() for _ in range(concurrency)], max_seconds + grace_seconds, "a soak worker")
    finally:
        await client.close()
    for rec in started:
        if rec.done is None:
            rec.outcome, rec.error_kind = "unexpected", "no answer in time"
    return started


# ------------------------------------------------------------------------------------- the report

def server_metrics(metrics_url: str) -> dict[str, float]:
    """facert_* and nv_inference_request_* lines of the metrics endpoint."""
    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("facert_", "nv_inference_request_success", "nv_inference_request_failure")):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def summarize(records: list[Record], before: dict, after: dict, memory: dict, settings: dict) -> dict:
    from benchmarks.loadgen import percentiles

    by = lambda kind: [r for r in records if r.kind == kind]  # noqa: E731
    ok = [r for r in records if r.outcome == "ok"]
    unexpected = [r for r in records if r.outcome == "unexpected"]
    kinds: dict[str, int] = {}
    for r in unexpected:
        kinds[r.error_kind] = kinds.get(r.error_kind, 0) + 1
    delta = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0)}
    server_tokens = sum(v for k, v in delta.items() if k.startswith("facert_generated_tokens_total"))
    client_tokens = sum(r.tokens for r in records)
    cancelled = [r for r in records if r.outcome == "cancelled"]
    wall = (max(r.done for r in records if r.done) - min(r.sent for r in records)) if records else 0.0
    return {
        "requests": len(records), "planned": settings["requests"], "wall_s": round(wall, 1),
        "requests_per_s": round(len(records) / wall, 2) if wall else None,
        "mix": {k: len(by(k)) for k in ("valid", "malformed", "cancel")},
        "cancelled_at_once": sum(r.cancel_at_s is not None for r in records),
        "overloaded_retries": {"requests": sum(r.overloaded > 0 for r in records),
                               "refusals": sum(r.overloaded for r in records)},
        "outcomes": {o: sum(r.outcome == o for r in records) for o in ("ok", "refused", "cancelled", "unexpected")},
        "unexpected_by_kind": kinds,
        "unexpected_examples": [{"index": r.index, "kind": r.kind, "case": r.case, "error_kind": r.error_kind,
                                 "error": (r.error or "")[:300]} for r in unexpected[:10]],
        "valid": {**percentiles([(r.first - r.sent) * 1e3 for r in ok if r.first], "ttft_ms"),
                  **percentiles([(r.done - r.sent) * 1e3 for r in ok], "latency_ms"),
                  "tokens": sum(r.tokens for r in ok)},
        "malformed": percentiles([(r.done - r.sent) * 1e3 for r in records if r.outcome == "refused"],
                                 "refusal_ms"),
        "cancel": {"cancelled_by_client": len(cancelled),
                   "cancelled_on_server": sum(v for k, v in delta.items() if 'outcome="cancelled"' in k),
                   "server_tokens": server_tokens, "client_tokens": client_tokens,
                   "tokens_generated_but_not_received": server_tokens - client_tokens},
        "server_metric_deltas": delta,
        "memory": memory,
    }


def plot(samples: list[dict], records: list[Record], t0: float, rests: dict, path: Path, title: str) -> Path:
    """Memory over time (stacked per process) above the requests ended over time; t0: the sampler's start."""
    from benchmarks.report import _pyplot

    plt = _pyplot()
    fig, (tx, ax, bx) = plt.subplots(3, 1, figsize=(10, 10), sharex=True, gridspec_kw={"height_ratios": [2, 3, 2]})
    t = [s["t"] for s in samples]
    # the total on its own scale (where a slow rise shows), then what it is made of
    tx.plot(t, [s["total_rss_mb"] + s["shm_mb"] for s in samples], color="black", lw=1.2, label="total")
    tx.plot(t, [s["total_rss_mb"] + s["shm_mb"] - s["rss_mb"].get("tritonserver", 0.0) for s in samples],
            color="tab:purple", lw=1, label="total less tritonserver (the stubs and their shared memory)")
    for i, (a, b) in enumerate(rests.values()):
        tx.axvspan(a, b, color="gray", alpha=0.2, lw=0, label="at rest (judged)" if i == 0 else None)
    tx.set_ylabel("MB")
    tx.set_title(title, fontsize=10)
    tx.legend(fontsize=7, loc="lower right")
    tx.grid(alpha=0.3)
    names = sorted({k for s in samples for k in s["rss_mb"]}, key=lambda k: -samples[-1]["rss_mb"].get(k, 0))
    stacks = [[s["rss_mb"].get(k, 0.0) for s in samples] for k in names] + [[s["shm_mb"] for s in samples]]
    ax.stackplot(t, stacks, labels=names + ["python-backend shared memory"], alpha=0.85)
    for a, b in rests.values():
        ax.axvspan(a, b, color="gray", alpha=0.2, lw=0)
    ax.set_ylabel("resident memory, MB")
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.grid(alpha=0.3)
    for outcome, color in (("ok", "tab:green"), ("refused", "tab:orange"), ("cancelled", "tab:blue"),
                           ("unexpected", "tab:red")):
        done = sorted(r.done - t0 for r in records if r.outcome == outcome and r.done)
        if done:
            bx.step(done, range(1, len(done) + 1), where="post", color=color, label=f"{outcome} ({len(done)})")
    for a, b in rests.values():
        bx.axvspan(a, b, color="gray", alpha=0.2, lw=0)
    bx.set_xlabel("seconds since the sampler started")
    bx.set_ylabel("requests ended")
    bx.legend(fontsize=8, loc="upper left")
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _kept_per_refusal(record: dict, s: dict) -> list[str]:
    """tritonserver's change at rest over the requests after the warm-up, per refused one among them: where
    soak-per-case.md shows that refused requests are what tritonserver keeps memory for, this sizes it."""
    warmup = record["settings"]["warmup"]
    refused = sum(r["outcome"] == "refused" for r in record.get("requests", []) if r["index"] >= warmup)
    change = s["memory"]["growth_by_process_mb"].get("tritonserver")
    if not refused or change is None:
        return []
    return [f"tritonserver's change, {change:+.1f} MB, over the {refused} requests refused after the warm-up: "
            f"{change * 1024 / refused:+.0f} KB each, were it all theirs (what each kind of request keeps: "
            f"`soak.py --per-case`, soak-per-case.md).", ""]


def markdown(record: dict, s: dict) -> str:
    from benchmarks.report import md_table

    st, m = record["settings"], s["memory"]
    lines = [f"# Soak: {s['requests']} streamed requests at concurrency {st['concurrency']}", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}, git {record['git']}",
             f"- machine: {record['machine']['cpu']}, {record['machine']['cores']} cores"
             + (f" ({record['machine']['shared']})" if record['machine'].get('shared') else ""),
             f"- model: {st['model_note']}",
             f"- server: tritonserver {record['versions'].get('tritonserver', '?')}, max_batch_size "
             f"{st['max_batch']}, max_queue_size {st['max_queue_size']}, queue timeout {st['queue_timeout_ms']} ms",
             f"- mix: {s['mix']['valid']} valid (1..{st['max_tokens']} tokens), {s['mix']['malformed']} malformed "
             f"(the {st['corpus_grpc_cases']} gRPC cases of the corpus in turn), {s['mix']['cancel']} cancelled by the "
             f"client ({s.get('cancelled_at_once', 0)} of them 0-50 ms after sending, the others after 1-3 tokens); "
             f"seed {st['seed']}",
             f"- tritonserver restarted during the run: {s.get('server_restarts', '?')} times",
             f"- refused as overloaded and retried after a backoff (as a client should): "
             f"{s.get('overloaded_retries', {}).get('requests', '?')} requests, "
             f"{s.get('overloaded_retries', {}).get('refusals', '?')} refusals in all",
             f"- wall time {s['wall_s']} s, {s['requests_per_s']} requests/s", "",
             "## Outcomes", "",
             md_table(["outcome", "requests"], [[k, v] for k, v in s["outcomes"].items()]), "",
             f"**Unexpected errors: {s['outcomes']['unexpected']}**"
             + (" (by kind: " + ", ".join(f"{k} {v}" for k, v in s["unexpected_by_kind"].items()) + ")"
                if s["unexpected_by_kind"] else ""), "",
             "## Latency (ms)", "",
             md_table(["", "p50", "p90", "p99"],
                      [["valid: time to first token"] + [s["valid"][f"ttft_ms_p{p}"] for p in (50, 90, 99)],
                       ["valid: whole answer"] + [s["valid"][f"latency_ms_p{p}"] for p in (50, 90, 99)],
                       ["malformed: refusal"] + [s["malformed"][f"refusal_ms_p{p}"] for p in (50, 90, 99)]]), "",
             "## Cancellation, counted on the server", "",
             f"- cancelled by the client: {s['cancel']['cancelled_by_client']}; stopped as cancelled by the llm "
             f"step: {s['cancel']['cancelled_on_server']:.0f}"
             + (" (the others had finished before the cancellation reached it)"
                if s['cancel']['cancelled_on_server'] < s['cancel']['cancelled_by_client'] else ""),
             f"- tokens generated on the server {s['cancel']['server_tokens']:.0f}, received by clients "
             f"{s['cancel']['client_tokens']}: {s['cancel']['tokens_generated_but_not_received']:.0f} generated "
             f"after a client had cancelled", "",
             "## Memory (RSS of tritonserver and its stubs + python-backend shared memory)", "",
             md_table(["at rest: start", "after warm-up", "end", "peak under load", "end vs after warm-up",
                       "verdict"],
                      [[f"{m['start_mb']:.0f} MB", f"{m['after_warmup_mb']:.0f} MB", f"{m['end_mb']:.0f} MB",
                        f"{m['peak_under_load_mb']:.0f} MB", f"{m['growth_mb']:+.1f} MB ({m['growth_pct']:+.2f} %)",
                        f"{'FLAT' if m['flat'] else 'GREW'}: "
                        f"{'under' if m['flat'] else 'over'} {m['flat_bound_mb']:.0f} MB"]]), "",
             md_table(["process", "at rest after warm-up (MB)", "at rest at the end (MB)", "change (MB)"],
                      [[k, m["rest_by_process_mb"]["after_warmup"].get(k, 0.0),
                        m["rest_by_process_mb"]["end"].get(k, 0.0), f"{v:+.1f}"]
                       for k, v in m["growth_by_process_mb"].items()]), "",
             *_kept_per_refusal(record, s),
             f"At rest: {st['rest_seconds']:g} s with nothing in flight before the first request, after the "
             f"warm-up (the first {st['warmup']} requests) and after the last; each judged on the median of "
             f"its second half. Under load the server also holds the requests in flight. Plot: soak.png "
             f"(rest windows shaded).", ""]
    if s["unexpected_examples"]:
        lines += ["## Unexpected errors (first 10)", "",
                  md_table(["#", "kind", "case", "error kind", "message"],
                           [[e["index"], e["kind"], e["case"], e["error_kind"], e["error"][:120]]
                            for e in s["unexpected_examples"]], align="rllll"), ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------- memory kept, per case

def rss_at_rest(pid: int, seconds: float, interval_s: float = 0.2) -> float:
    """tritonserver's RSS with nothing in flight: the median over the second half of `seconds`."""
    seen = []
    for _ in range(max(int(seconds / interval_s), 2)):
        time.sleep(interval_s)
        seen.append(rss_mb(pid) or 0.0)
    return float(np.median(seen[len(seen) // 2:]))


def payload_kb(inputs: list) -> float:
    return sum(len(i._get_content() or b"") for i in inputs) / 1024


def per_case_kept(url: str, model: str, server_pid: int, corpus: list[Malformed], images: list[bytes], n: int,
                  concurrency: int, rest_s: float, rounds: int = 3, seed: int = 0, say=lambda m: None) -> list[dict]:
    """For a valid request, a cancelled one and each gRPC case of the malformed corpus: n of them at
    `concurrency` (each worker keeping its stream), then tritonserver's memory at rest against before.
    Places a rise of the soak on the kind of request that leaves memory behind. The allocator's own
    ups and downs are several MB, so each kind is measured in `rounds` rounds, in a new random order
    each round, and the median is kept."""
    cases = [("valid (4 tokens)", None), ("cancelled after 1 token", None)] + [
        (c.name, c) for c in corpus if c.protocol == "grpc" and c.model is None and not c.admin]

    def plan_for(name, case, count):
        plan = []
        for i in range(count):
            settings = {"image": 0, "question": QUESTIONS[0], "temperature": 0.0, "seed": i}
            if case is not None:
                plan.append((Record(i, "malformed", case.name, case.expect, max_tokens=4), {**settings, "case": case}))
            elif name.startswith("cancelled"):
                plan.append((Record(i, "cancel", max_tokens=64, cancel_after=1), settings))
            else:
                plan.append((Record(i, "valid", max_tokens=4), settings))
        return plan

    def run(plan):
        return asyncio.run(run_load(url, model, plan, images, concurrency, 600.0, 60.0))

    for name, case in cases:  # every path once, so that first-use allocations are not counted
        run(plan_for(name, case, concurrency))
    kept: dict[str, list[float]] = {name: [] for name, _ in cases}
    unexpected = dict.fromkeys(kept, 0)
    rng = random.Random(seed)
    before = rss_at_rest(server_pid, rest_s)
    for r in range(rounds):
        order = rng.sample(cases, len(cases))
        for k, (name, case) in enumerate(order):
            records = run(plan_for(name, case, n))
            after = rss_at_rest(server_pid, rest_s)
            kept[name].append((after - before) * 1024 / n)
            unexpected[name] += sum(rec.outcome == "unexpected" for rec in records)
            before = after
            say(f"round {r + 1}/{rounds}, [{k + 1}/{len(cases)}] {name}: {kept[name][-1]:+.1f} KB per request kept")
    rows = []
    for name, case in cases:
        inputs = (malformed_inputs(case, images[0]) if case is not None
                  else apply_changes(good_grpc_tensors(images[0], QUESTIONS[0], 4), Malformed("valid", "")))
        size, kb = payload_kb(inputs), float(np.median(kept[name]))
        rows.append({"case": name, "payload_kb": round(size, 1), "requests": n * rounds,
                     "unexpected": unexpected[name], "kept_kb_per_request_rounds": [round(v, 1) for v in kept[name]],
                     "kept_kb_per_request": round(kb, 1),
                     "kept_share_of_payload": round(kb / size, 3) if size > 1 else None})
    return rows


def per_case_markdown(record: dict, rows: list[dict]) -> str:
    from benchmarks.report import md_table

    st = record["settings"]
    refused = [r for r in rows if r["kept_share_of_payload"] is not None and not r["case"].startswith(("valid", "cancel"))]
    big = [r for r in refused if r["payload_kb"] >= 100]
    lines = [f"# Memory tritonserver keeps per request, by kind ({st['per_case_rounds']} rounds of "
             f"{st['per_case']} requests each)", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}, git {record['git']}",
             f"- machine: {record['machine']['cpu']}, {record['machine']['cores']} cores"
             + (f" ({record['machine']['shared']})" if record['machine'].get('shared') else ""),
             f"- model: {st['model_note']}; tritonserver {record['versions'].get('tritonserver', '?')}; "
             f"concurrency {st['concurrency']}, each worker keeping its gRPC stream",
             f"- method: every kind once first; then, in {st['per_case_rounds']} rounds in a new random order "
             f"each, per kind tritonserver's RSS at rest ({st['rest_seconds']:g} s, median of the second half) "
             f"before and after its {st['per_case']} requests; the median of the rounds", "",
             md_table(["request", "sent (KB)", "kept per request (KB), median", "rounds", "kept / sent",
                       "unexpected"],
                      [[r["case"], r["payload_kb"], f"{r['kept_kb_per_request']:+.1f}",
                        " ".join(f"{v:+.0f}" for v in r["kept_kb_per_request_rounds"]),
                        "" if r["kept_share_of_payload"] is None else f"{r['kept_share_of_payload']:.3f}",
                        r["unexpected"]] for r in rows], align="lrrrrr"), ""]
    if big:
        share = float(np.median([r["kept_share_of_payload"] for r in big]))
        lines += [f"Refused requests that carried at least 100 KB ({len(big)} kinds): median {share:.1%} of what they "
                  f"sent stays in tritonserver; the valid and cancelled requests keep "
                  f"{rows[0]['kept_kb_per_request']:+.1f} and {rows[1]['kept_kb_per_request']:+.1f} KB.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------ malformed requests only

def malformed_only(grpc_url: str, http_url: str, server_pid: int, corpus: list[Malformed], image: bytes, n: int,
                   concurrency: int, rest_s: float, sample_s: float, say=lambda m: None) -> dict:
    """n requests of the whole corpus in turn (gRPC streams, HTTP, calls outside inference), each on its
    own connection, `concurrency` at a time; the server's memory sampled throughout. One pass over the
    corpus first (first-use allocations), then a rest, the n requests, a rest. The trend: a straight
    line fitted to the memory against requests done over the second half (past the allocator's
    warm-up), and the memory at rest at the end against after the first pass."""
    from concurrent.futures import ThreadPoolExecutor

    done = [0]
    sampler = MemorySampler(server_pid, sample_s, lambda: done[0])
    sampler.start()
    outcomes = {"refused": 0, "accepted": 0, "wrong message": 0, "failed": 0}
    examples: list[dict] = []
    lock = threading.Lock()

    def one(case: Malformed) -> None:
        try:
            error = send_malformed(case, grpc_url, http_url, image)
        except Exception as e:  # noqa: BLE001 (a transport failure is an outcome to count)
            error, outcome = f"{type(e).__name__}: {e}", "failed"
        else:
            outcome = "accepted" if error is None else "refused" if case.expect in error else "wrong message"
        with lock:
            done[0] += 1
            outcomes[outcome] += 1
            if outcome != "refused" and len(examples) < 10:
                examples.append({"case": case.name, "outcome": outcome, "error": (error or "")[:300]})

    def rest() -> tuple[float, float]:
        t = time.perf_counter() - sampler.t0
        time.sleep(rest_s)
        return round(t, 2), round(time.perf_counter() - sampler.t0, 2)

    rests = {"start": rest()}
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, corpus))
            rests["after_warmup"] = rest()
            warm = done[0]
            say(f"{len(corpus)} cases once; now {n} requests")
            list(pool.map(one, [corpus[i % len(corpus)] for i in range(n)]))
        rests["end"] = rest()
    finally:
        sampler.stop()
    samples = sampler.samples
    loaded = [s for s in samples if rests["after_warmup"][1] <= s["t"] <= rests["end"][0]]
    second = loaded[len(loaded) // 2:]
    x = np.array([s["done"] for s in second], float)
    y = np.array([_total(s) for s in second], float)
    slope = float(np.polyfit(x, y, 1)[0]) if len(second) > 2 and np.ptp(x) > 0 else 0.0  # MB per request
    memory = memory_verdict(samples, rests)
    return {"requests": done[0] - warm, "corpus_cases": len(corpus), "concurrency": concurrency,
            "outcomes": outcomes, "examples": examples, "memory": memory,
            "trend": {"fitted_over_requests": [int(x.min()) - warm, int(x.max()) - warm] if len(x) else [],
                      "slope_kb_per_request": round(slope * 1024, 3),
                      "fitted_growth_over_run_mb": round(slope * (done[0] - warm), 1)},
            "samples": samples, "warm_done": warm}


def plot_malformed(result: dict, path: Path, title: str) -> Path:
    """Memory against requests done: the total on its own scale with the fitted trend line, then
    tritonserver and the gateway (where refused requests used to stay)."""
    from benchmarks.report import _pyplot

    plt = _pyplot()
    samples, warm = result["samples"], result["warm_done"]
    fig, (tx, ax) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    x = [s["done"] - warm for s in samples]
    tx.plot(x, [_total(s) for s in samples], color="black", lw=1.2,
            label="total: tritonserver + gateway + stubs (RSS) + python-backend shared memory")
    t = result["trend"]
    if t["fitted_over_requests"]:
        a, b = t["fitted_over_requests"]
        second = [s for s in samples if a <= s["done"] - warm <= b]
        y0 = float(np.median([_total(s) for s in second])) if second else 0.0
        mid, slope = (a + b) / 2, t["slope_kb_per_request"] / 1024
        tx.plot([a, b], [y0 + slope * (a - mid), y0 + slope * (b - mid)], color="tab:red", lw=2, ls="--",
                label=f"fitted over the second half: {t['slope_kb_per_request']:+.2f} KB per request")
    tx.set_ylabel("MB")
    tx.set_title(title, fontsize=10)
    tx.grid(alpha=0.3)
    tx.legend(fontsize=8, loc="lower right")
    for name, color in (("tritonserver", "tab:blue"), ("gateway", "tab:orange")):
        ax.plot(x, [s["rss_mb"].get(name, 0.0) for s in samples], color=color, lw=1, label=f"{name} RSS")
    ax.set_xlabel("malformed requests done (counted from the end of one pass over the corpus)")
    ax.set_ylabel("MB")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def malformed_markdown(record: dict, r: dict) -> str:
    from benchmarks.report import md_table

    m, t = r["memory"], r["trend"]
    lines = [f"# {r['requests']} malformed requests (the whole corpus in turn, {r['corpus_cases']} cases)", "",
             f"- command: `{record['command']}`", f"- date: {record['date']}, git {record['git']}",
             f"- machine: {record['machine']['cpu']}, {record['machine']['cores']} cores"
             + (f" ({record['machine']['shared']})" if record['machine'].get('shared') else ""),
             f"- model: {record['settings']['model_note']}; concurrency {r['concurrency']}, each request on its own "
             f"connection (gRPC streams, HTTP generate / infer / other paths, calls outside inference)", "",
             md_table(["outcome", "requests"], [[k, v] for k, v in r["outcomes"].items()], align="lr"), "",
             "## Memory (RSS of tritonserver, its gateway and its stubs + python-backend shared memory)", "",
             md_table(["at rest: start", "after one pass", "end", "end vs after one pass", "fitted trend, second half",
                       "verdict"],
                      [[f"{m['start_mb']} MB", f"{m['after_warmup_mb']} MB", f"{m['end_mb']} MB",
                        f"{m['growth_mb']:+.1f} MB", f"{t['slope_kb_per_request']:+.2f} KB/request "
                        f"({t['fitted_growth_over_run_mb']:+.1f} MB over the run)",
                        "FLAT" if m["flat"] else "GREW"]], align="rrrrrr"), "",
             md_table(["process", "after one pass (MB)", "end (MB)", "change (MB)"],
                      [[k, m["rest_by_process_mb"]["after_warmup"].get(k, 0.0), m["rest_by_process_mb"]["end"].get(k, 0.0),
                        f"{v:+.1f}"] for k, v in m["growth_by_process_mb"].items()], align="lrrr"), "",
             "Plot: malformed.png (memory against requests done, with the fitted trend)."]
    if r["examples"]:
        lines += ["", "Not refused as expected:", ""] + [f"- {e['case']}: {e['outcome']}: {e['error']}"
                                                         for e in r["examples"]]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    from benchmarks.loadgen import LoadError, check_loopback
    from benchmarks.report import _jsonable, new_record, results_dir
    from runtime.serving.repo import DEFAULT_MAX_QUEUE_SIZE, DEFAULT_QUEUE_TIMEOUT_MS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=1800.0, help="stop handing out requests after this")
    ap.add_argument("--grace-seconds", type=float, default=120.0)
    ap.add_argument("--max-tokens", type=int, default=24, help="valid requests ask for 1..this many tokens")
    ap.add_argument("--malformed", type=float, default=0.2, help="share of malformed requests (default 0.2)")
    ap.add_argument("--cancel", type=float, default=0.1, help="share of requests cancelled by the client (0.1)")
    ap.add_argument("--cancel-at-once", type=float, default=0.5,
                    help="share of the cancelled requests cancelled 0-50 ms after sending instead of after 1-3 tokens "
                         "(0.5)")
    ap.add_argument("--warmup", type=int, default=100, help="requests before memory is judged (default 100)")
    ap.add_argument("--rest-seconds", type=float, default=6.0,
                    help="each rest with nothing in flight (start, after the warm-up, end), when memory is judged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stream-per-request", action="store_true",
                    help="open a new gRPC stream for every request (default: each worker keeps its stream)")
    ap.add_argument("--sample-seconds", type=float, default=1.0)
    ap.add_argument("--per-case", type=int, default=0, metavar="N",
                    help="instead of the soak: N requests of each kind (valid, cancelled, each malformed case) and "
                         "the memory tritonserver keeps per request of that kind -> soak-per-case.md")
    ap.add_argument("--per-case-rounds", type=int, default=3, help="with --per-case: rounds, median kept (3)")
    ap.add_argument("--malformed-only", type=int, default=0, metavar="N",
                    help="instead of the soak: N malformed or hostile requests, the whole corpus in turn over every "
                         "protocol, and the memory's trend -> malformed.md, malformed.png")
    ap.add_argument("--checkpoint", help="checkpoint to serve (default: the tiny one, built in a temp dir)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE)
    ap.add_argument("--queue-timeout-ms", type=int, default=DEFAULT_QUEUE_TIMEOUT_MS)
    ap.add_argument("--url", help="soak a running server instead (gRPC HOST:PORT, loopback only)")
    ap.add_argument("--server-pid", type=int, help="with --url: the tritonserver's pid (for its memory)")
    ap.add_argument("--metrics-url", help="with --url: its metrics endpoint (default: port + 1)")
    ap.add_argument("--http-url", help="with --url: its HTTP HOST:PORT (default: port - 1)")
    ap.add_argument("--out", help="results folder (default benchmarks/results/<date>-cpu-<machine>)")
    ap.add_argument("--shared", help="note when the machine was shared with other work")
    ap.add_argument("--rerender", metavar="SOAK_JSON", help="only write soak.md and soak.png again from a soak.json")
    args = ap.parse_args(argv)
    if args.rerender:
        rerender(Path(args.rerender))
        return 0
    say = lambda m: print(f"[soak] {m}", file=sys.stderr, flush=True)  # noqa: E731

    images = soak_images()
    corpus = malformed_corpus(images[0])
    server, tmp = None, None
    try:
        if args.url:
            if args.server_pid is None:
                ap.error("--url needs --server-pid (the memory of that process and its children is watched)")
            url = check_loopback(args.url)
            host, _, port = url.rpartition(":")
            metrics_url = args.metrics_url or f"http://{host}:{int(port) + 1}/metrics"
            http_url = args.http_url or f"{host}:{int(port) - 1}"
            server_pid, model_note = args.server_pid, f"the server at {url}"
        else:
            from runtime.checkpoint import init_checkpoint
            from runtime.serving.repo import fill_repository
            from runtime.serving.server import TritonServer, free_ports

            tmp = tempfile.TemporaryDirectory(prefix="facert-soak-")
            checkpoint = args.checkpoint
            if checkpoint is None:
                checkpoint = init_checkpoint("tiny", Path(tmp.name) / "tiny", seed=0, progress=lambda *a: None)
                model_note = ("the tiny test checkpoint (seeded random weights): 1,000 requests of the demo model "
                              "do not fit 2 shared cores in the time")
            else:
                model_note = f"checkpoint {checkpoint}"
            repo = Path(tmp.name) / "repository"
            fill_repository(repo, checkpoint=checkpoint, max_batch_size=args.max_batch,
                            max_queue_size=args.max_queue_size, queue_timeout_ms=args.queue_timeout_ms)
            http, grpc, metrics = free_ports(3)
            log_lines: list[str] = []
            server = TritonServer(repo, http_port=http, grpc_port=grpc, metrics_port=metrics, log=log_lines.append,
                                  provision_log=say, say=say)
            say(f"starting tritonserver on {repo}")
            server.start(timeout_s=600)
            url, metrics_url, server_pid, http_url = server.grpc_url, server.metrics_url, server.proc.pid, server.http_url
        from runtime.client import find_model

        model = find_model(url)
        plan = plan_requests(args.requests, corpus, args.seed, args.max_tokens, args.malformed, args.cancel,
                             len(images), args.cancel_at_once)
        settings = {"requests": args.requests, "concurrency": args.concurrency, "max_seconds": args.max_seconds,
                    "max_tokens": args.max_tokens, "malformed_share": args.malformed, "cancel_share": args.cancel,
                    "cancel_at_once_share": args.cancel_at_once,
                    "warmup": args.warmup, "rest_seconds": args.rest_seconds, "seed": args.seed,
                    "max_batch": args.max_batch,
                    "stream_per_request": args.stream_per_request,
                    "max_queue_size": args.max_queue_size, "queue_timeout_ms": args.queue_timeout_ms,
                    "corpus_grpc_cases": sum(c.protocol == "grpc" and not c.admin for c in corpus),
                    "model": model, "model_note": model_note}
        if args.malformed_only:
            settings.update(malformed_only=args.malformed_only)
            record = new_record("soak-malformed", shared=args.shared, settings=settings)
            result = malformed_only(url, http_url, server_pid, corpus, images[0], args.malformed_only, args.concurrency,
                                    args.rest_seconds, args.sample_seconds, say)
            record["result"] = result
            out = Path(args.out) if args.out else results_dir("cpu")
            out.mkdir(parents=True, exist_ok=True)
            (out / "malformed.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
            (out / "malformed.md").write_text(malformed_markdown(record, result))
            plot_malformed(result, out / "malformed.png",
                           f"{result['requests']} malformed requests (+ {result['warm_done']} first) at "
                           f"concurrency {args.concurrency}: {result['outcomes']}")
            say(f"wrote {out}/malformed.json, malformed.md, malformed.png")
            print(malformed_markdown(record, result))
            ok = result["outcomes"]["refused"] == sum(result["outcomes"].values())
            return 0 if ok and result["memory"]["flat"] else 1
        if args.per_case:
            settings.update(per_case=args.per_case, concurrency=min(args.concurrency, 8))
            record = new_record("soak-per-case", shared=args.shared, settings=settings)
            settings["per_case_rounds"] = args.per_case_rounds
            rows = per_case_kept(url, model, server_pid, corpus, images, args.per_case, settings["concurrency"],
                                 args.rest_seconds, args.per_case_rounds, args.seed, say)
            record["cases"] = rows
            out = Path(args.out) if args.out else results_dir("cpu")
            out.mkdir(parents=True, exist_ok=True)
            (out / "soak-per-case.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
            (out / "soak-per-case.md").write_text(per_case_markdown(record, rows))
            say(f"wrote {out}/soak-per-case.json, soak-per-case.md")
            print(per_case_markdown(record, rows))
            return 0 if not any(r["unexpected"] for r in rows) else 1
        record = new_record("soak", shared=args.shared, settings=settings)
        before = server_metrics(metrics_url)
        done = [0]
        sampler = MemorySampler(server_pid, args.sample_seconds, lambda: done[0])
        sampler.start()
        last = [0.0]

        def progress(n, total):
            done[0] = n
            if time.perf_counter() - last[0] > 10 and sampler.samples:
                last[0] = time.perf_counter()
                say(f"{n}/{total} requests done, server {sampler.samples[-1]['total_rss_mb']:.0f} MB")

        rests: dict[str, tuple[float, float]] = {}

        def rest(name: str) -> None:
            t = time.perf_counter() - sampler.t0
            time.sleep(args.rest_seconds)
            rests[name] = (round(t, 2), round(time.perf_counter() - sampler.t0, 2))

        say(f"{args.requests} requests at concurrency {args.concurrency} against {model} at {url}")
        deadline = time.perf_counter() + args.max_seconds
        records: list[Record] = []
        try:
            rest("start")
            for part in (plan[:args.warmup], plan[args.warmup:]):
                records += asyncio.run(run_load(url, model, part, images, args.concurrency,
                                                max(deadline - time.perf_counter(), 0.0), args.grace_seconds,
                                                lambda n, _t: progress(len(records) + n, len(plan)),
                                                args.stream_per_request))
                rest("after_warmup" if "after_warmup" not in rests else "end")
        finally:
            sampler.stop()
        after = server_metrics(metrics_url)
    except LoadError as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()

    t_offset = sampler.t0
    memory = memory_verdict(sampler.samples, rests)
    summary = summarize(records, before, after, memory, settings)
    from runtime.serving.server import process_stat

    # restarts of tritonserver under the load (a crash): counted by our server, or seen as its pid gone
    summary["server_restarts"] = (len(server.restarts) if server is not None
                                  else 0 if process_stat(server_pid) else "1 or more (its pid is gone)")
    record.update(summary=summary, sampler_t0=sampler.t0, memory_samples=sampler.samples,
                  requests=[{k: v for k, v in r.__dict__.items()} for r in records])
    out = Path(args.out) if args.out else results_dir("cpu")
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(record, indent=1, default=_jsonable) + "\n")
    (out / "soak.md").write_text(markdown(record, summary))
    plot(sampler.samples, records, t_offset, rests, out / "soak.png",
         f"{summary['requests']} requests, concurrency {args.concurrency}: {summary['outcomes']}")
    say(f"wrote {out}/soak.json, soak.md, soak.png")
    print(markdown(record, summary))
    return 0 if summary["outcomes"]["unexpected"] == 0 and memory["flat"] else 1


def rerender(path: Path) -> None:
    """Write soak.md and soak.png again from a soak.json (after a change to the summary or the plot)."""
    path = Path(path)
    record = json.loads(path.read_text())
    records = [Record(**r) for r in record["requests"]]
    samples = record["memory_samples"]
    # the sampler's clock: its last sample was taken as the last request ended
    t0 = record.get("sampler_t0") or max(r.done for r in records if r.done) - samples[-1]["t"]
    rests = {k: tuple(v) for k, v in record["summary"]["memory"]["rests"].items()}
    memory = memory_verdict(samples, rests)
    record["summary"]["memory"] = memory
    path.write_text(json.dumps(record, indent=1) + "\n")
    (path.parent / "soak.md").write_text(markdown(record, record["summary"]))
    plot(samples, records, t0, rests, path.parent / "soak.png",
         f"{record['summary']['requests']} requests, concurrency {record['settings']['concurrency']}: "
         f"{record['summary']['outcomes']}")


if __name__ == "__main__":
    sys.exit(main())
