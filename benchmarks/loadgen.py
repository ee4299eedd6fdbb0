"""A bounded asynchronous streaming load generator for a running `facert serve`, over gRPC or its
OpenAI-compatible endpoint.

    .venv/bin/python benchmarks/loadgen.py --url 127.0.0.1:8001 [--concurrency 1,2,4,8] [--requests 16]
        [--max-seconds 60] [--max-tokens 16] [--warmup 1]
    .venv/bin/python benchmarks/loadgen.py --url 127.0.0.1:8001,127.0.0.1:9001 ...   (several replicas)
    .venv/bin/python benchmarks/loadgen.py --protocol openai --url 127.0.0.1:9000 ...   (facert serve --openai-port)
    facert bench serve ...                      (starts a server on the demo model and runs this)

Closed loop: `concurrency` virtual users, each sending its next request as soon as its previous
one finished: over gRPC each user has its own bidirectional stream (tritonclient.grpc.aio,
ModelStreamInfer); over OpenAI its own keep-alive HTTP connection (aiohttp), each request a
`POST /v1/chat/completions` with the image as a data URL, `stream: true` and the usage chunk. Every
request asks for a streamed answer (STREAM=true), so the server sends one response (one
server-sent event) per token; the client notes when each arrives:

  time to first token (TTFT)   request sent -> first response carrying a token
  inter-token latency (ITL)    gaps between consecutive token responses of one request
  request latency              request sent -> the response with the finish reason
  throughput                   completed requests / wall time, output tokens / wall time, where the
                               wall time runs from the first request sent to the last one finished

Bounded: a level stops handing out requests after --requests or after --max-seconds, whichever
comes first, and gives the requests in flight --grace-seconds more before cancelling them (they
are counted as timed out). Loopback only: the URL must name this machine.

Open loop (`--rate R --duration S`): requests arrive as a Poisson process of R requests per second
for S seconds, each sent at its time on its own stream whatever is still in flight (so a server
slower than the offered load builds a queue, as it does under real traffic), with MAX_TOKENS drawn
log-uniformly from --max-tokens-range; the summary uses genai-perf's metric names
(time_to_first_token, inter_token_latency, request_latency, output_sequence_length,
request_throughput, output_token_throughput: `genai_perf_metrics`). benchmarks/inflight.py runs it
against the static and the in-flight scheduler.

Several replicas (`--url A,B,...`, the same model behind each): virtual user i keeps its stream to
replica i mod R, as a client behind a connection-balancing Service does, so the users spread evenly
over the replicas. Each row then also says how many requests each replica answered
(`requests_per_url`) and how many different answers came back (`distinct_answers`: greedy requests
for one image and question give 1 when every replica serves the same model the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PERCENTILES = (50, 90, 99)
PROTOCOLS = ("grpc", "openai")


class LoadError(RuntimeError):
    """The load cannot run: a non-loopback URL, no server, no model."""


@dataclass
class RequestRecord:
    sent: float = 0.0
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0
    done: float | None = None
    error: str | None = None
    server_timings: dict = field(default_factory=dict)
    url: str = ""
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # over OpenAI (whose chunks carry text, not token ids)
    tag: str = ""  # open loop: what the request was (its workload's label)

    @property
    def ok(self) -> bool:
        return self.done is not None and self.error is None


def check_loopback(url: str) -> str:
    """HOST:PORT of `url` if HOST is this machine's loopback; LoadError otherwise."""
    from runtime.client import _split_url

    hostport = _split_url(url)
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise LoadError(f"the URL must be HOST:PORT, got {url!r}")
    host = host.strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, int(port), proto=socket.IPPROTO_TCP)}
    except socket.gaierror as e:
        raise LoadError(f"cannot resolve {host!r}: {e}") from None
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise LoadError(f"the load generator only loads this machine (loopback), not {host} ({sorted(addresses)})")
    return hostport


def percentiles(values: list[float], prefix: str) -> dict:
    if not values:
        return {f"{prefix}_p{p}": None for p in PERCENTILES}
    arr = np.asarray(values, dtype=np.float64)
    return {f"{prefix}_p{p}": round(float(np.percentile(arr, p)), 2) for p in PERCENTILES}


def summarize(records: list[RequestRecord], concurrency: int) -> dict:
    """One row: counts, TTFT / ITL / latency percentiles (ms), throughput."""
    ok = [r for r in records if r.ok]
    row = {"concurrency": concurrency, "requests": len(ok), "errors": sum(r.error is not None for r in records),
           "timed_out": sum(r.done is None and r.error is None for r in records)}
    if ok:
        start = min(r.sent for r in ok)
        end = max(r.done for r in ok)
        wall = max(end - start, 1e-9)
        tokens = sum(r.tokens for r in ok)
        row.update({"duration_s": round(wall, 3), "requests_per_s": round(len(ok) / wall, 4),
                    "output_tokens_per_s": round(tokens / wall, 2),
                    "output_tokens_mean": round(tokens / len(ok), 2)})
    else:
        row.update({"duration_s": None, "requests_per_s": 0.0, "output_tokens_per_s": 0.0, "output_tokens_mean": None})
    row.update(percentiles([(r.token_times[0] - r.sent) * 1e3 for r in ok if r.token_times], "ttft_ms"))
    row.update(percentiles([(b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:])], "itl_ms"))
    row.update(percentiles([(r.done - r.sent) * 1e3 for r in ok], "latency_ms"))
    # the server's own account of where the time went (means over the completed requests)
    keys = sorted({k for r in ok for k in r.server_timings if k.endswith("_ms")})
    for k in keys:
        vals = [r.server_timings[k] for r in ok if k in r.server_timings]
        row[f"server_{k}"] = round(float(np.mean(vals)), 2)
    errors = [r.error for r in records if r.error]
    if errors:
        row["first_error"] = errors[0][:300]
    urls = sorted({r.url for r in records if r.url})
    if len(urls) > 1:
        row["requests_per_url"] = {u: sum(r.url == u for r in ok) for u in urls}
    row["distinct_answers"] = len({(tuple(r.token_ids), r.text) for r in ok})
    return row


def _bytes_str(array) -> str:
    return bytes(array.reshape(-1)[0]).decode("utf-8") if array is not None and array.size else ""


async def _user(client, model: str, make_inputs, claim, records: list[RequestRecord], url: str = "") -> None:
    """One virtual user: one stream (to `url`), one request at a time, until `claim()` says stop."""
    if not claim():
        return
    pending: asyncio.Queue = asyncio.Queue()
    current = RequestRecord(url=url)
    records.append(current)

    async def requests():
        while True:
            item = await pending.get()
            if item is None:
                return
            item[0].sent = time.perf_counter()
            yield {"model_name": model, "inputs": make_inputs(), "request_id": str(id(item[0]))}

    pending.put_nowait((current,))
    responses = client.stream_infer(requests())
    try:
        async for result, error in responses:
            now = time.perf_counter()
            if error is not None:
                current.error = str(error)
                current.done = now
            else:
                ids = result.as_numpy("TOKEN_IDS")
                n = 0 if ids is None else int(ids.size)
                if n:
                    current.token_times.append(now)
                    current.tokens += n
                    current.token_ids.extend(int(t) for t in ids.reshape(-1))
                if _bytes_str(result.as_numpy("FINISH_REASON")):
                    current.done = now
                    timings = _bytes_str(result.as_numpy("TIMINGS"))
                    current.server_timings = json.loads(timings) if timings else {}
            if current.done is not None:
                if claim():
                    current = RequestRecord(url=url)
                    records.append(current)
                    pending.put_nowait((current,))
                else:
                    pending.put_nowait(None)
                    break
    finally:
        responses.cancel()


async def _openai_user(session, url: str, body: bytes, claim, records: list[RequestRecord]) -> None:
    """One virtual user of the OpenAI endpoint at `url`: one keep-alive connection, one streamed request
    at a time, until `claim()` says stop."""
    import aiohttp

    while claim():
        current = RequestRecord(url=url)
        records.append(current)
        current.sent = time.perf_counter()
        try:
            async with session.post(f"http://{url}/v1/chat/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                if r.status != 200:
                    current.error = f"HTTP {r.status}: {(await r.text())[:300]}"
                    current.done = time.perf_counter()
                    continue
                async for line in r.content:  # server-sent events: "data: {json}" lines, then "data: [DONE]"
                    if not line.startswith(b"data: "):
                        continue
                    now, data = time.perf_counter(), line[6:].strip()
                    if data == b"[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        current.error, current.done = event["error"]["message"], now
                        break
                    for choice in event["choices"]:
                        if choice["delta"].get("content"):
                            current.token_times.append(now)
                            current.text += choice["delta"]["content"]
                        if choice["finish_reason"]:
                            current.done = now
                            current.server_timings = (event.get("facert") or {}).get("timings") or {}
                    if event.get("usage"):
                        current.tokens = event["usage"]["completion_tokens"]
        except aiohttp.ClientError as e:
            current.error, current.done = f"{type(e).__name__}: {e}", time.perf_counter()


def openai_body(model: str, image: bytes, question: str, max_tokens: int) -> bytes:
    """The chat request that matches the gRPC load's: one user turn [image, question], greedy, streamed."""
    url = "data:image/png;base64," + base64.b64encode(image).decode("ascii")
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                 {"type": "text", "text": question}]}]}).encode()


async def openai_model(url: str) -> str:
    """The model the OpenAI endpoint at HOST:PORT serves."""
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://{url}/v1/models") as r:
            return (await r.json())["data"][0]["id"]
    except (aiohttp.ClientError, KeyError, IndexError, ValueError) as e:
        raise LoadError(f"no OpenAI endpoint at {url}: {e}") from None


async def run_bounded(workers: list, timeout_s: float, what: str) -> None:
    """Run the worker coroutines for at most timeout_s; those still running are cancelled (their
    unfinished requests are the caller's to count); a worker that failed is a LoadError."""
    tasks = [asyncio.ensure_future(w) for w in workers]
    done, not_done = await asyncio.wait(tasks, timeout=timeout_s)
    for task in not_done:
        task.cancel()
    await asyncio.gather(*not_done, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise LoadError(f"{what} failed: {task.exception()!r}") from task.exception()


async def run_level(url: str | list[str], concurrency: int, max_requests: int, max_seconds: float, image: bytes,
                    question: str, max_tokens: int, model: str | None = None, grace_seconds: float = 60.0,
                    protocol: str = "grpc") -> dict:
    """One concurrency level, bounded in requests and time; returns its summary row. With several
    URLs (replicas of one model), virtual user i sends to URL i mod len(urls).

    protocol: grpc (a URL is a server's gRPC HOST:PORT) or openai (the HOST:PORT of its OpenAI endpoint)."""
    if protocol not in PROTOCOLS:
        raise LoadError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    urls = [check_loopback(u) for u in ([url] if isinstance(url, str) else url)]
    if not urls:
        raise LoadError("no server URL given")
    if protocol == "openai":
        models = {u: model or await openai_model(u) for u in urls}
    else:
        from runtime.client import find_model

        models = {u: model or find_model(u, "grpc") for u in urls}
    if len(set(models.values())) != 1:
        raise LoadError(f"the replicas serve different models: {models}")
    model = models[urls[0]]
    handed_out = 0
    deadline = time.perf_counter() + max_seconds

    def claim() -> bool:
        nonlocal handed_out
        if handed_out >= max_requests or time.perf_counter() >= deadline:
            return False
        handed_out += 1
        return True

    records: list[RequestRecord] = []
    if protocol == "openai":
        import aiohttp

        body = openai_body(model, image, question, max_tokens)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            await run_bounded([_openai_user(session, urls[i % len(urls)], body, claim, records)
                               for i in range(concurrency)], max_seconds + grace_seconds, "a virtual user")
    else:
        import tritonclient.grpc.aio as aioclient

        from runtime.client import Request, _grpc_inputs
        from runtime.generate import SamplingParams

        params = SamplingParams(max_new_tokens=max_tokens).validate()
        clients = [aioclient.InferenceServerClient(u) for u in urls]
        try:
            await run_bounded([_user(clients[i % len(urls)], model,
                                     lambda: _grpc_inputs(Request([image], question), params, True),
                                     claim, records, urls[i % len(urls)])
                               for i in range(concurrency)], max_seconds + grace_seconds, "a virtual user")
        finally:
            for client in clients:
                await client.close()
    row = summarize(records, concurrency)
    row.update({"model": model, "protocol": protocol, "max_tokens": max_tokens, "max_requests": max_requests,
                "max_seconds": max_seconds})
    return row


# ------------------------------------------------------------------------- open loop (Poisson)

@dataclass
class Planned:
    """One request of an open-loop run: when it is sent (seconds from the start) and what it asks."""

    at: float
    images: list[bytes]
    question: str
    max_tokens: int
    tag: str = ""


def poisson_times(rate: float, duration_s: float, rng: np.random.Generator) -> list[float]:
    """Arrival times (s) of a Poisson process of `rate` per second over [0, duration_s)."""
    if rate <= 0 or duration_s <= 0:
        raise LoadError(f"an open loop needs a rate and a duration > 0, got {rate} /s for {duration_s} s")
    t, out = 0.0, []
    while True:
        t += float(rng.exponential(1.0 / rate))
        if t >= duration_s:
            return out
        out.append(t)


def log_uniform_tokens(n: int, low: int, high: int, rng: np.random.Generator) -> list[int]:
    """n answer lengths between low and high, uniform in log scale (as many short as long ones)."""
    return [int(round(x)) for x in np.exp(rng.uniform(np.log(low), np.log(high), n))]


async def _one_request(client, model: str, inputs, record: RequestRecord) -> None:
    """One request on its own stream, recorded as it streams; a transport failure (the server went
    away) is the request's error, not the run's."""
    import grpc

    async def requests():
        yield {"model_name": model, "inputs": inputs, "request_id": str(id(record))}

    record.sent = time.perf_counter()
    responses = client.stream_infer(requests())
    try:
        async for result, error in _responses_or_failure(responses, grpc.aio.AioRpcError):
            now = time.perf_counter()
            if error is not None:
                record.error, record.done = str(error), now
                return
            ids = result.as_numpy("TOKEN_IDS")
            if ids is not None and ids.size:
                record.token_times.append(now)
                record.tokens += int(ids.size)
                record.token_ids.extend(int(t) for t in ids.reshape(-1))
            if _bytes_str(result.as_numpy("FINISH_REASON")):
                record.done = now
                timings = _bytes_str(result.as_numpy("TIMINGS"))
                record.server_timings = json.loads(timings) if timings else {}
                return
    finally:
        responses.cancel()


async def _responses_or_failure(responses, failure):
    """The stream's (result, error) pairs; a `failure` raised by the stream ends it as an error."""
    try:
        async for item in responses:
            yield item
    except failure as e:
        yield None, f"{e.code()}: {e.details()}"


async def run_open_loop(url: str, plan: list[Planned], model: str | None = None,
                        grace_seconds: float = 120.0) -> list[RequestRecord]:
    """Send every planned request at its time (open loop), then give those in flight grace_seconds;
    returns one record per planned request, in plan order (unfinished ones: done None)."""
    import tritonclient.grpc.aio as aioclient

    from runtime.client import Request, _grpc_inputs, find_model
    from runtime.generate import SamplingParams

    url = check_loopback(url)
    model = model or find_model(url, "grpc")
    records = [RequestRecord(url=url, tag=p.tag) for p in plan]
    client = aioclient.InferenceServerClient(url)
    tasks = []
    try:
        start = time.perf_counter()
        for p, record in zip(plan, records):
            delay = start + p.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            inputs = _grpc_inputs(Request(p.images, p.question), SamplingParams(max_new_tokens=p.max_tokens), True)
            tasks.append(asyncio.ensure_future(_one_request(client, model, inputs, record)))  # sent now
        if tasks:  # the last arrival is sent: the ones in flight get grace_seconds more
            await run_bounded(tasks, grace_seconds, "a request")
    finally:
        await client.close()
    return records


def _stats(values: list[float], unit: str) -> dict:
    if not values:
        return {"unit": unit, "avg": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64)
    return {"unit": unit, "avg": round(float(arr.mean()), 3), "min": round(float(arr.min()), 3),
            "max": round(float(arr.max()), 3), **{f"p{p}": round(float(np.percentile(arr, p)), 3) for p in PERCENTILES}}


def genai_perf_metrics(records: list[RequestRecord]) -> dict:
    """The completed requests' figures under genai-perf's names and definitions:
    time_to_first_token (sent -> first token), inter_token_latency per request ((request_latency -
    time_to_first_token) / (output_sequence_length - 1)), request_latency, output_sequence_length,
    request_throughput and output_token_throughput over the run's wall time (first request sent ->
    last answer done). Also `token_gap` (every gap between two tokens, not in genai-perf: it shows
    stalls such as a prefill chunk that per-request averages hide)."""
    ok = [r for r in records if r.ok and r.token_times]
    out = {"request_count": {"unit": "count", "avg": len(ok)},
           "error_count": {"unit": "count", "avg": sum(r.error is not None for r in records)},
           "unfinished_count": {"unit": "count", "avg": sum(r.done is None and r.error is None for r in records)}}
    ttft = [(r.token_times[0] - r.sent) * 1e3 for r in ok]
    latency = [(r.done - r.sent) * 1e3 for r in ok]
    itl = [(lat - t) / (r.tokens - 1) for r, lat, t in zip(ok, latency, ttft) if r.tokens > 1]
    out.update(time_to_first_token=_stats(ttft, "ms"), inter_token_latency=_stats(itl, "ms"),
               request_latency=_stats(latency, "ms"),
               output_sequence_length=_stats([float(r.tokens) for r in ok], "tokens"),
               token_gap=_stats([(b - a) * 1e3 for r in ok for a, b in zip(r.token_times, r.token_times[1:])], "ms"))
    wall = (max(r.done for r in ok) - min(r.sent for r in ok)) if ok else 0.0
    out["request_throughput"] = {"unit": "requests/sec", "avg": round(len(ok) / wall, 4) if wall else 0.0}
    out["output_token_throughput"] = {"unit": "tokens/sec",
                                      "avg": round(sum(r.tokens for r in ok) / wall, 3) if wall else 0.0}
    out["duration"] = {"unit": "sec", "avg": round(wall, 3)}
    errors = sorted({r.error[:200] for r in records if r.error})
    if errors:
        out["errors"] = {"unit": "messages", "avg": errors[:5]}
    return out


def sweep(url: str | list[str], concurrencies: list[int], image: bytes, question: str, max_tokens: int = 16,
          requests_per_level: int | None = None, max_seconds: float = 60.0, warmup: int = 1,
          stop_at: float | None = None, log=lambda m: None, protocol: str = "grpc") -> list[dict]:
    """Every concurrency level in turn (each its own bounded run), after `warmup` unmeasured requests
    (to each replica, where `url` lists several).

    requests_per_level: None means 2 x concurrency + 2 (every user gets at least two requests).
    stop_at: a time.perf_counter() deadline: no level starts after it, none hands out requests past it.
    """
    rows = []
    if warmup:
        replicas = 1 if isinstance(url, str) else len(url)
        asyncio.run(run_level(url, replicas, warmup * replicas, max_seconds, image, question, max_tokens,
                              protocol=protocol))
    for c in concurrencies:
        seconds = max_seconds if stop_at is None else min(max_seconds, stop_at - time.perf_counter())
        if seconds <= 0:
            log(f"concurrency {c}: skipped, out of time")
            continue
        n = requests_per_level if requests_per_level is not None else 2 * c + 2
        row = asyncio.run(run_level(url, c, n, seconds, image, question, max_tokens, protocol=protocol))
        log(f"concurrency {c}: {row['requests']} requests ({row['errors']} errors, {row['timed_out']} timed out), "
            f"TTFT p50 {row['ttft_ms_p50']} ms, {row['requests_per_s']} req/s, {row['output_tokens_per_s']} tok/s"
            + (f", per replica {row['requests_per_url']}" if "requests_per_url" in row else ""))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    from benchmarks.stages import parse_list
    from runtime.cli import DEMO_IMAGE, DEMO_QUESTION
    from runtime.client import RemoteError

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    ap.add_argument("--url", default="127.0.0.1:8001",
                    help="gRPC HOST:PORT of the server (of its OpenAI endpoint with --protocol openai), or several "
                         "comma-separated (replicas; loopback only)")
    ap.add_argument("--protocol", default="grpc", choices=PROTOCOLS,
                    help="grpc (the ensemble's stream, default) or openai (POST /v1/chat/completions, streamed)")
    ap.add_argument("--concurrency", default="1,2,4,8", help="levels, comma-separated (default 1,2,4,8)")
    ap.add_argument("--requests", type=int, help="requests per level (default 2 x concurrency + 2)")
    ap.add_argument("--max-seconds", type=float, default=60.0, help="stop handing out requests after this (default 60)")
    ap.add_argument("--max-tokens", type=int, default=16, help="MAX_TOKENS of every request (default 16)")
    ap.add_argument("--image", default=str(DEMO_IMAGE), help="image file (default: the astronaut photo)")
    ap.add_argument("--question", default=DEMO_QUESTION)
    ap.add_argument("--warmup", type=int, default=1, help="unmeasured requests first, to each replica (default 1)")
    ap.add_argument("--rate", type=float, help="open loop: Poisson arrivals of this many requests per second")
    ap.add_argument("--duration", type=float, default=60.0, help="open loop: seconds of arrivals (default 60)")
    ap.add_argument("--max-tokens-range", help="open loop: LOW,HIGH: MAX_TOKENS drawn log-uniformly (default: "
                                               "--max-tokens for every request)")
    ap.add_argument("--seed", type=int, default=0, help="open loop: seed of the arrivals and lengths (default 0)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    urls = [u.strip() for u in args.url.split(",") if u.strip()]
    if args.rate is not None:
        return open_loop_main(args, urls)
    try:
        rows = sweep(urls[0] if len(urls) == 1 else urls, parse_list(args.concurrency, "--concurrency"),
                     Path(args.image).read_bytes(), args.question, args.max_tokens, args.requests, args.max_seconds,
                     warmup=args.warmup, log=lambda m: print(f"[loadgen] {m}", file=sys.stderr, flush=True),
                     protocol=args.protocol)
    except (LoadError, RemoteError) as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(serve_table(rows))
    return 0


def open_loop_main(args, urls: list[str]) -> int:
    from runtime.client import RemoteError

    if len(urls) != 1:
        print("loadgen: error: the open loop loads one server", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    image = Path(args.image).read_bytes()
    try:
        times = poisson_times(args.rate, args.duration, rng)
        if args.max_tokens_range:
            low, high = (int(x) for x in args.max_tokens_range.split(","))
            lengths = log_uniform_tokens(len(times), low, high, rng)
        else:
            lengths = [args.max_tokens] * len(times)
        plan = [Planned(t, [image], args.question, n) for t, n in zip(times, lengths)]
        records = asyncio.run(run_open_loop(urls[0], plan))
    except (LoadError, RemoteError, ValueError) as e:
        print(f"loadgen: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"rate": args.rate, "duration": args.duration, **genai_perf_metrics(records)}, indent=2))
    return 0


def serve_table(rows: list[dict], peer: list[dict] | None = None) -> str:
    """The server-load table; with peer rows (same concurrency = batch), ratios against them."""
    from benchmarks.report import md_table

    peer_by_c = {p["concurrency"]: p for p in (peer or [])}
    header = ["concurrency", "requests", "TTFT p50 / p90 / p99 ms", "ITL p50 / p99 ms",
              "latency p50 / p90 / p99 ms", "requests/s", "output tokens/s"]
    if peer_by_c:
        header += ["peer requests/s", "throughput vs peer", "TTFT p50 speedup vs peer"]
    out = []
    for r in rows:
        row = [r["concurrency"], r["requests"] if not (r["errors"] or r["timed_out"])
               else f"{r['requests']} ({r['errors']} errors, {r['timed_out']} timed out)",
               _triple(r, "ttft_ms"), f"{_num(r['itl_ms_p50'])} / {_num(r['itl_ms_p99'])}", _triple(r, "latency_ms"),
               _num(r["requests_per_s"], 3), _num(r["output_tokens_per_s"])]
        p = peer_by_c.get(r["concurrency"])
        if peer_by_c:
            row += [_num(p["requests_per_s"], 3) if p else None,
                    f"{r['requests_per_s'] / p['requests_per_s']:.2f}x" if p and r["requests_per_s"] else None,
                    f"{p['ttft_ms'] / r['ttft_ms_p50']:.2f}x" if p and r["ttft_ms_p50"] else None]
        out.append(row)
    return md_table(header, out)


def _num(x, digits: int = 1) -> str | None:
    return None if x is None else f"{x:.{digits}f}"


def _triple(r: dict, key: str) -> str:
    return " / ".join(_num(r[f"{key}_p{p}"]) or "–" for p in PERCENTILES)


if __name__ == "__main__":
    sys.exit(main())
