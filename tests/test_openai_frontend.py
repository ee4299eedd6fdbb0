"""The OpenAI-compatible chat endpoint (runtime/serving/openai_frontend.py), served by facert's gateway
in front of a real tritonserver (2.51, CPU) serving the tiny checkpoint, driven with the official
`openai` Python client: its answers equal the gRPC answers for the same request, streamed and
whole; bad requests get OpenAI's error JSON with the right status and a message naming the
problem; a stop string or a client that goes away stops the generation on the server.

One server for the module with small bounds (max_batch_size 2, max_queue_size 2), so that a burst
of a dozen requests overloads it; the endpoint accepts bodies up to 4 MiB.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not an installed package

from benchmarks.corpus import _png_header  # noqa: E402 (the malformed corpus's builder)
from runtime.cli import DEMO_IMAGE  # noqa: E402
from runtime.client import ask_remote  # noqa: E402
from runtime.generate import SamplingParams  # noqa: E402

QUESTION = "What can you tell about this face?"
MAX_TOKENS = 10
LONG = 400  # tokens: several seconds of generation on the tiny model here
MAX_BATCH, MAX_QUEUE = 2, 2
MAX_BODY_MB = 4


@dataclass
class Endpoint:
    server: object  # runtime.serving.server.TritonServer, with openai_port
    log: list[str]

    @property
    def base_url(self) -> str:
        return self.server.openai_url

    def client(self, **kw):
        return openai.OpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **kw)

    def async_client(self, **kw):
        return openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0, **kw)


@pytest.fixture(scope="module")
def ep(tiny_checkpoint, tmp_path_factory):
    from runtime.serving.repo import fill_repository
    from runtime.serving.server import ServerError, TritonServer, free_ports

    repo = tmp_path_factory.mktemp("openai") / "repository"
    fill_repository(repo, checkpoint=tiny_checkpoint, max_batch_size=MAX_BATCH, max_queue_size=MAX_QUEUE)
    http_port, grpc_port, metrics_port, openai_port = free_ports(4)
    log: list[str] = []
    server = TritonServer(repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, log=log.append,
                          provision_log=lambda _m: None, exit_timeout_s=3, openai_port=openai_port,
                          openai_max_body_mb=MAX_BODY_MB)
    try:
        server.start(timeout_s=300)
    except ServerError as e:
        pytest.fail(f"tritonserver did not start: {e}\n--- last log lines ---\n" + "\n".join(log[-40:]))
    try:
        yield Endpoint(server, log)
    finally:
        server.stop()


def data_url(image: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(image).decode()


def user_turn(images: list[bytes], text: str = QUESTION) -> dict:
    return {"role": "user", "content": [*({"type": "image_url", "image_url": {"url": data_url(i)}} for i in images),
                                        {"type": "text", "text": text}]}


def facert_metrics(ep) -> dict[str, float]:
    """The llm step's own counters: {"tokens": ..., "cancelled": ..., "stop": ..., ...}."""
    with urllib.request.urlopen(ep.server.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("facert_generated_tokens_total"):
            out["tokens"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("facert_llm_requests_total"):
            out[line.split('outcome="', 1)[1].split('"', 1)[0]] = float(line.rsplit(" ", 1)[1])
    return out


def wait_for(condition, timeout_s: float, what: str, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def generation_settles(ep, before: dict, received: int) -> float:
    """Waits until the server counted a cancellation and its token counter stopped short of the answer's
    LONG tokens; returns the tokens it generated past the `received` ones. Not a bound in tokens: the
    tiny model makes one every ~0.3-1 ms here, and a dropped connection reaches the llm step in tens to
    hundreds of ms (measured 17-330 tokens past the 5th chunk, 2026-11-30)."""
    after = wait_for(lambda: (m := facert_metrics(ep))["cancelled"] > before["cancelled"] and m, 120,
                     "the llm step counted the cancellation")
    total = after["tokens"]
    for _ in range(30):
        time.sleep(1.0)
        now = facert_metrics(ep)["tokens"]
        if now == total:
            break
        total = now
    else:
        raise AssertionError("still generating 30 s after the client went away")
    extra = total - before["tokens"] - received
    assert received + extra < LONG, f"{extra} tokens generated past the {received} the client received: all of them"
    assert facert_metrics(ep)["length"] == before["length"]
    return extra


# ------------------------------------------------------------------------- answers equal gRPC's

def test_whole_and_streamed_answers_equal_the_grpc_answer(ep, face_png):
    expected = ask_remote(ep.server.grpc_url, face_png, QUESTION, SamplingParams(max_new_tokens=MAX_TOKENS),
                          stream=True)
    client = ep.client()
    messages = [user_turn([face_png])]

    whole = client.chat.completions.create(model="faceinsight", messages=messages, max_tokens=MAX_TOKENS,
                                           temperature=0)
    assert whole.object == "chat.completion" and whole.model == "faceinsight" and whole.id.startswith("chatcmpl-")
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected["text"]
    assert whole.choices[0].finish_reason == expected["finish_reason"]
    assert whole.usage.completion_tokens == len(expected["token_ids"])
    assert whole.usage.prompt_tokens == expected["prompt_tokens"] > 0
    # facert's extras: the attributes after the constraint step and the per-stage timings
    extras = whole.facert
    assert extras["attributes"] == pytest.approx(expected["attributes"], rel=1e-6)
    assert extras["constraints_fired"] == expected["constraints_fired"]
    for stage in ("preprocess", "vision", "parser", "seg", "attributes", "prefill", "decode", "total"):
        assert extras["timings"][f"{stage}_ms"] > 0, stage

    stream = client.chat.completions.create(model="faceinsight", messages=messages, max_completion_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer arrived in one piece: not streamed"
    assert "".join(pieces) == expected["text"]
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0].choices[0].finish_reason == expected["finish_reason"]
    assert finishes[0].facert["attributes"] == pytest.approx(expected["attributes"], rel=1e-6)
    # include_usage: one last chunk without choices carries the usage; the others carry usage null
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == len(expected["token_ids"])
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_two_images_equal_the_grpc_answer(ep, face_images):
    """Several images in one user turn, in order: the same answer as gRPC's IMAGE list."""
    images = face_images[:2]
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    expected = ask_remote(ep.server.grpc_url, images, "Are these the same person?", params, stream=True)
    swapped = ask_remote(ep.server.grpc_url, images[::-1], "Are these the same person?", params, stream=True)
    assert expected["token_ids"] != swapped["token_ids"], "the order of the images should matter"
    got = ep.client().chat.completions.create(model="faceinsight", messages=[user_turn(images, "Are these the same "
                                                                                              "person?")],
                                              max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == expected["text"]
    assert got.usage.prompt_tokens == expected["prompt_tokens"]
    assert len(got.facert["images"]) == 2
    for mine, theirs in zip(got.facert["images"], expected["image_attributes"]):
        assert mine["attributes"] == pytest.approx(theirs["attributes"], rel=1e-6)


def test_system_message_and_earlier_turns_go_through_the_chat_template(ep, face_png):
    """A system message and earlier turns are the conversation the model's chat template renders: the
    answer equals gRPC's MESSAGES answer for the same conversation, and the system message counts."""
    conversation = [
        {"role": "system", "content": "You are a careful face analyst. Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
        {"role": "assistant", "content": "A person in a space suit."},
        {"role": "user", "content": [{"type": "text", "text": "Is the person smiling?"}]},
    ]
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    expected = ask_remote(ep.server.grpc_url, [face_png], params=params, messages=conversation, stream=True)
    without_system = ask_remote(ep.server.grpc_url, [face_png], params=params, messages=conversation[1:])
    assert expected["prompt_tokens"] > without_system["prompt_tokens"]

    openai_conversation = [
        {"role": "system", "content": conversation[0]["content"]},
        user_turn([face_png]),
        {"role": "assistant", "content": conversation[2]["content"]},
        {"role": "user", "content": "Is the person smiling?"},  # a plain string: the same as one text part
    ]
    client = ep.client()
    got = client.chat.completions.create(model="faceinsight", messages=openai_conversation, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == expected["text"]
    assert got.usage.prompt_tokens == expected["prompt_tokens"]
    assert got.usage.total_tokens == expected["prompt_tokens"] + len(expected["token_ids"])
    # OpenAI's newer name for the system role reads the same
    openai_conversation[0]["role"] = "developer"
    got = client.chat.completions.create(model="faceinsight", messages=openai_conversation, max_tokens=MAX_TOKENS,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(got)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["text"]
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]


def test_stream_is_server_sent_events_ending_with_done(ep, face_png):
    """The wire format itself, which the openai client hides: `data: {json}` events, then `data: [DONE]`."""
    body = json.dumps({"model": "faceinsight", "messages": [user_turn([face_png])], "max_tokens": 4, "stream": True})
    host, port = ep.base_url.split("//")[1].split("/")[0].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
        events = [e for e in r.read().decode().split("\n\n") if e]
    finally:
        conn.close()
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last  # no include_usage: no usage


def test_sampling_parameters_reach_the_server(ep, face_png):
    """temperature, top_p and seed travel: a seeded sampled answer repeats, and equals gRPC's."""
    params = SamplingParams(max_new_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9, seed=1234)
    expected = ask_remote(ep.server.grpc_url, face_png, QUESTION, params, stream=True)
    greedy = ask_remote(ep.server.grpc_url, face_png, QUESTION, SamplingParams(max_new_tokens=MAX_TOKENS))
    assert expected["token_ids"] != greedy["token_ids"], "pick a seed whose sample differs from greedy"
    got = ep.client().chat.completions.create(model="faceinsight", messages=[user_turn([face_png])],
                                              max_tokens=MAX_TOKENS, temperature=1.5, top_p=0.9, seed=1234)
    assert got.choices[0].message.content == expected["text"]


def test_models_and_health(ep):
    client = ep.client()
    assert [m.id for m in client.models.list()] == ["faceinsight"]
    assert client.models.retrieve("faceinsight").owned_by == "facert"
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' does not exist"):
        client.models.retrieve("gpt-4o")
    with urllib.request.urlopen(ep.base_url[:-3] + "/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read())["status"] == "ok"


# ------------------------------------------------------------------------------ stop strings

def test_stop_string_cuts_the_answer_and_stops_the_generation(ep, face_png, tiny_checkpoint):
    client = ep.client()
    messages = [user_turn([face_png])]
    full = client.chat.completions.create(model="faceinsight", messages=messages, max_tokens=40)
    text = full.choices[0].message.content
    # a stop string that first occurs some way into the answer: it cuts the answer there
    at = next(i for i in range(8, len(text) - 3) if text.find(text[i:i + 3]) == i)
    stop = text[at:at + 3]
    before = facert_metrics(ep)
    # room for hundreds of tokens after the cut (greedy: the same first 40): the tiny model makes one in a
    # millisecond or two, so with only 40 the answer could end before the cancellation reaches the llm step
    context = json.loads((tiny_checkpoint / "config.json").read_text())["llm"]["max_position_embeddings"]
    room = context - full.usage.prompt_tokens - 8
    cut = client.chat.completions.create(model="faceinsight", messages=messages, max_tokens=room, stop=[stop, "\0"])
    assert cut.choices[0].message.content == text[:at]
    assert cut.choices[0].finish_reason == "stop"
    # the usage counts what was generated up to the cut, and the prompt (told with the first token)
    assert cut.usage.prompt_tokens == full.usage.prompt_tokens > 0
    assert 0 < cut.usage.completion_tokens < 40
    # the generation was cancelled, not run to its 40 tokens
    after = wait_for(lambda: (m := facert_metrics(ep))["cancelled"] > before["cancelled"] and m, 120,
                     "the stop string cancelled the generation")
    assert after["length"] == before["length"]

    stream = client.chat.completions.create(model="faceinsight", messages=messages, max_tokens=40, stop=stop,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_stop_cutter_holds_back_what_could_begin_a_stop_string():
    from runtime.serving.openai_frontend import StopCutter

    cut = StopCutter(["END", "\n\n"])
    assert [cut.push(p) for p in ("Hello E", "N", "ough; E", "ND and more")] == ["Hello ", "", "ENough; ", ""]
    assert cut.stopped  # "END" spanned two pieces; the text stops before it
    cut = StopCutter(["xyz", "yz"])
    assert cut.push("abxy") == "ab" and cut.push("z!") == "" and cut.stopped  # at "xyz", the earliest: not "abx"
    cut = StopCutter(["<stop>"])
    assert cut.push("a <st") == "a " and not cut.stopped and cut.flush() == "<st"  # ended by itself: all of it
    assert StopCutter([]).push("anything") == "anything"


# ------------------------------------------------------------------------------------ errors

def _error(call) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as e:
        call()
    body = e.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= body.keys(), body
    return e.value


FACE = DEMO_IMAGE.read_bytes()
SMALL_PNG = _png_header(16, 16)  # a header is all the count check reads
BAD_REQUESTS = {
    # case: (changes to a good request, status, words of the message)
    "unknown model": ({"model": "gpt-4o"}, 400, "model 'gpt-4o' does not exist; this server serves 'faceinsight'"),
    "http image URL": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest/meta-data"}},
        {"type": "text", "text": QUESTION}]}]}, 400, "image URLs are not fetched by this server"),
    "https image URL": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/face.jpg"}},
        {"type": "text", "text": QUESTION}]}]}, 400, "image URLs are not fetched by this server"),
    "not an image data URL": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGk="}},
        {"type": "text", "text": QUESTION}]}]}, 400, "expected a data:image/<type>;base64,<data> URL"),
    "invalid base64": ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,not*base64"}},
        {"type": "text", "text": QUESTION}]}]}, 400, "the image's base64 data is invalid"),
    "undecodable image": ({"messages": [user_turn([b"GIF89a but not really"])]}, 400, "cannot decode image"),
    "image over the pixel bound": ({"messages": [user_turn([_png_header(8000, 6000)])]}, 400,
                                   "8000x6000 = 48000000 pixels, over the 40000000-pixel bound"),
    "prompt over the context": ({"messages": [user_turn([FACE], "x" * 600)]}, 400, "over the model's"),
    "no messages": ({"messages": []}, 400, "messages"),
    "too many images": ({"messages": [user_turn([SMALL_PNG] * 9)]}, 400, "the request holds 9 images, over the "
                                                                          "8-image bound"),
    "no image": ({"messages": [{"role": "user", "content": QUESTION}]}, 400, "the request holds no image"),
    "max_tokens zero": ({"max_tokens": 0}, 400, "max_tokens must be in [1, 4096], got 0"),
    "max_tokens over the context": ({"max_tokens": 5000}, 400, "max_tokens must be in [1, 4096]"),
    "temperature out of range": ({"temperature": 11}, 400, "temperature must be in [0, 10]"),
    "top_p zero": ({"top_p": 0}, 400, "top_p must be in (0, 1]"),
    "two answers": ({"n": 2}, 400, "n must be 1"),
    "five stop strings": ({"stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    "unsupported parameter": ({"logprobs": True}, 400, "unsupported parameter 'logprobs'"),
    "tools": ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported parameter 'tools'"),
    "image in an assistant turn": ({"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGk="}}]},
        user_turn([b"x"])]}, 400, "only user messages may hold images"),
    "body over the bound": ({"messages": [user_turn([b"\0" * (MAX_BODY_MB * 1024 * 1024)])]}, 413,
                            f"over this server's {MAX_BODY_MB * 1024 * 1024}-byte bound"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_openai_error_json(ep, face_png, case):
    change, status, words = BAD_REQUESTS[case]
    request = {"model": "faceinsight", "messages": [user_turn([face_png])], "max_tokens": 4, **change}
    error = _error(lambda: ep.client().chat.completions.create(**request))
    assert error.status_code == status, f"{case}: {error.status_code} {error.message}"
    assert words in error.body["message"], f"{case}: {error.body['message']!r}"
    if status == 400:
        assert error.body["type"] == "invalid_request_error"
    # streamed, the same refusal is an HTTP error too, not a stream
    error = _error(lambda: ep.client().chat.completions.create(**request, stream=True))
    assert error.status_code == status and words in error.body["message"], case


def test_unknown_route_is_openai_error_json(ep):
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(ep.base_url + "/completions", data=b"{}", timeout=30)
    assert e.value.code == 404
    assert "POST /v1/completions: Not Found" in json.loads(e.value.read())["error"]["message"]


def test_malformed_json_is_refused(ep):
    req = urllib.request.Request(ep.base_url + "/chat/completions", data=b'{"model": "faceinsight", ',
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert "not valid JSON" in json.loads(e.value.read())["error"]["message"]


def test_overload_is_refused_with_429_and_the_endpoint_keeps_serving(ep, face_png):
    messages = [user_turn([face_png])]

    async def one(client):
        try:  # a short answer: the admitted ones run to their end (the queues refuse the others at once)
            stream = await client.chat.completions.create(model="faceinsight", messages=messages, max_tokens=24,
                                                          stream=True)
        except openai.APIStatusError as e:
            return e
        async with stream:
            async for _chunk in stream:
                pass
        return None

    async def burst():
        async with ep.async_client(timeout=300) as client:
            return await asyncio.gather(*[one(client) for _ in range(12)])

    results = asyncio.run(burst())
    refused = [r for r in results if r is not None]
    # two queue slots per step and two requests per execution: most of a burst of 12 cannot wait
    assert len(refused) >= 4 and len(refused) < 12, results
    for e in refused:
        assert e.status_code == 429 and "Exceeds maximum queue size" in e.body["message"], (e.status_code, e.body)
        assert e.response.headers.get("retry-after") == "1"
    expected = ask_remote(ep.server.grpc_url, face_png, QUESTION, SamplingParams(max_new_tokens=MAX_TOKENS))
    got = ep.client().chat.completions.create(model="faceinsight", messages=messages, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == expected["text"]


def test_unavailable_server_is_503(ep, tmp_path):
    """A gateway whose tritonserver is not there (down, or being restarted): /health and requests say 503,
    with the reason, and a request's place under the ensemble's bound is given back. (And a request over
    what the gateway sends tritonserver, --max-request-mb, is refused with 413 before it is sent.)"""
    from runtime.serving.gateway import KEY_ENV
    from runtime.serving.server import free_ports

    dead_grpc, dead_http, grpc_port, http_port, openai_port = free_ports(5)
    cmd = [sys.executable, "-m", "runtime.serving.gateway", "--model-repository", str(ep.server.repository),
           "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--openai-port", str(openai_port),
           "--upstream-grpc", f"127.0.0.1:{dead_grpc}", "--upstream-http", f"127.0.0.1:{dead_http}",
           "--max-request-mb", "1"]
    lonely = subprocess.Popen(cmd, env={**os.environ, KEY_ENV: "k"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    try:
        assert "listening" in lonely.stdout.readline()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused", max_retries=0)
        for _ in range(MAX_BATCH + MAX_QUEUE + 1):  # more than the bound: each failed request left its place
            error = _error(lambda: client.chat.completions.create(model="faceinsight", messages=[user_turn([b"x"])]))
            assert error.status_code == 503 and "not available" in error.body["message"], error.body
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://127.0.0.1:{openai_port}/health", timeout=30)
        assert e.value.code == 503
        error = _error(lambda: client.chat.completions.create(model="faceinsight",
                                                              messages=[user_turn([b"\0" * 2**20])]))
        assert error.status_code == 413 and "over this server's 1048576-byte bound" in error.body["message"]
    finally:
        lonely.terminate()
        lonely.wait(timeout=30)


# ------------------------------------------------------------------------- a client that leaves

def test_client_that_disconnects_mid_stream_stops_generation(ep, face_png):
    before = facert_metrics(ep)
    stream = ep.client().chat.completions.create(model="faceinsight", messages=[user_turn([face_png])],
                                                 max_tokens=LONG, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received >= 5:
            break
    stream.close()  # the connection drops mid-stream
    generation_settles(ep, before, received)


def test_client_that_goes_away_from_a_whole_answer_stops_generation(ep, face_png, tmp_path):
    """Not streamed: a client process killed while the server generates its answer (its connection
    drops) stops the generation too."""
    image = tmp_path / "face.png"
    image.write_bytes(face_png)
    code = ("import base64, openai\n"
            f"client = openai.OpenAI(base_url={ep.base_url!r}, api_key='unused', max_retries=0)\n"
            f"url = 'data:image/png;base64,' + base64.b64encode(open({str(image)!r}, 'rb').read()).decode()\n"
            "client.chat.completions.create(model='faceinsight', max_tokens=%d, messages=[{'role': 'user', "
            "'content': [{'type': 'image_url', 'image_url': {'url': url}}, {'type': 'text', 'text': 'Hi'}]}])\n"
            % LONG)
    # The kill races the whole answer (LONG tokens at ~1-3 per ms; the drop takes tens to hundreds of ms to
    # reach the llm step, more on a loaded machine): an answer that ended whole before the drop arrived
    # (counted `length`, not `cancelled`) is a lost race, not the behaviour under test, and is tried again.
    for _ in range(3):
        before = facert_metrics(ep)
        client = subprocess.Popen([sys.executable, "-c", code])
        try:  # once the server is generating its answer
            wait_for(lambda: facert_metrics(ep)["tokens"] >= before["tokens"] + 5, 120, "the answer is being generated",
                     every_s=0.005)
        finally:
            client.kill()
            client.wait()
        at_kill = facert_metrics(ep)["tokens"] - before["tokens"]
        ended = wait_for(lambda: sum((m := facert_metrics(ep))[k] - before[k] for k in ("cancelled", "length", "stop"))
                         and m, 120, "the answer ended")
        if ended["cancelled"] > before["cancelled"]:
            generation_settles(ep, before, at_kill)
            return
    pytest.fail(f"three times the whole {LONG}-token answer ended before the client's dropped connection reached "
                "the llm step")


# ----------------------------------------------------------------------------- in the gateway

def test_endpoint_comes_back_with_a_restarted_gateway(ep, face_png):
    """The endpoint lives in the gateway: when the gateway dies, the server's supervisor starts it again,
    and the endpoint with it, on the same port."""
    gateway = ep.server.gateway
    gateway.kill()
    gateway.wait()
    wait_for(lambda: ep.server.gateway is not gateway and ep.server.gateway.poll() is None, 120,
             "the gateway was started again")

    def answers():
        try:
            got = ep.client(timeout=60).chat.completions.create(model="faceinsight", messages=[user_turn([face_png])],
                                                                max_tokens=3)
        except openai.APIConnectionError:
            return None
        return got.usage.completion_tokens == 3

    assert wait_for(answers, 120, "the OpenAI endpoint answers again")


def test_gateway_keeps_a_heap_pad_for_request_buffers(ep):
    """The gateway runs with glibc's heap top padded (see server.GATEWAY_MALLOC_ENV); tritonserver does not."""
    from runtime.serving.server import GATEWAY_MALLOC_ENV

    if any(k.startswith("MALLOC_") for k in os.environ):
        pytest.skip("this environment sets glibc's malloc itself: the gateway keeps those settings")

    def environ(pid: int) -> dict:
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(p.decode().split("=", 1) for p in pairs if b"=" in p)

    assert GATEWAY_MALLOC_ENV.items() <= environ(ep.server.gateway.pid).items()
    assert "MALLOC_TOP_PAD_" not in environ(ep.server.proc.pid)


# --------------------------------------------------------------------------- the load generator

def test_load_generator_drives_the_endpoint(ep, face_png):
    from benchmarks import loadgen

    url = ep.base_url.split("//")[1].split("/")[0]
    row = asyncio.run(loadgen.run_level(url, concurrency=2, max_requests=3, max_seconds=120, image=face_png,
                                        question=QUESTION, max_tokens=5, protocol="openai"))
    assert (row["requests"], row["errors"], row["timed_out"]) == (3, 0, 0), row.get("first_error")
    assert row["model"] == "faceinsight" and row["protocol"] == "openai"
    assert row["output_tokens_mean"] == 5  # from the usage chunk
    assert 0 < row["ttft_ms_p50"] <= row["latency_ms_p50"]
    assert row["server_prefill_ms"] > 0  # the server's timings ride on the last chunk's facert field


# ---------------------------------------------------------------------------- facert serve

@pytest.mark.slow
def test_facert_serve_starts_the_endpoint_beside_tritonserver(ep, face_png):
    """`facert serve --openai-port`: the endpoint is served on loopback, and stops with the server."""
    from runtime.serving.server import free_ports, port_is_free

    http_port, grpc_port, metrics_port, openai_port = free_ports(4)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--model-repository", str(ep.server.repository),
           "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--openai-port", str(openai_port), "--quiet", "--timeout", "600"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "ready:" in line:
                break
        assert any(f"OpenAI http://127.0.0.1:{openai_port}/v1" in ln for ln in lines), "".join(lines)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{openai_port}/v1", api_key="unused", max_retries=0)
        got = client.chat.completions.create(model="faceinsight", messages=[user_turn([face_png])], max_tokens=3)
        assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert proc.returncode == 0, "".join(lines)
    assert all(port_is_free("127.0.0.1", p) for p in (http_port, grpc_port, metrics_port, openai_port))


def test_facert_serve_refuses_a_taken_openai_port_before_starting(ep, capsys):
    from runtime.cli import main

    taken = ep.server.openai_port
    assert main(["serve", "--model-repository", str(ep.server.repository), "--openai-port", str(taken)]) == 2
    assert f"OpenAI port {taken} on 127.0.0.1 is taken" in capsys.readouterr().err
