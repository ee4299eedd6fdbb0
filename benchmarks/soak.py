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
import base64
import functools
import io
import json
import queue
import random
import struct
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

QUESTIONS = ("What can you tell about this face?", "Is this person smiling?", "Describe the hair.",
             "Does this person wear glasses? Answer briefly.")


# ------------------------------------------------------------------------- the malformed corpus

def _b(x) -> np.ndarray:
    """A [1, 1] BYTES tensor."""
    return np.array([[x]], dtype=np.object_)


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 90, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A few bytes of PNG that declare width x height pixels (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@dataclass(frozen=True)
class Malformed:
    """One malformed or hostile request: changes to a good request and a piece of the error it must get.

    gRPC (streamed): `grpc` tensors to set on the good request, (name, array, Triton dtype), array None
    removing the input; `parameters` request parameters to add, (name, value). HTTP: `http` keys to
    set on the good generate body (None removes the key), `endpoint` another path (under
    /v2/models/<model>/, or absolute when it starts with "/"), `raw` a body to send instead of the
    JSON one, `headers` extra headers. `admin`: a call outside inference (ADMIN_CALLS, over gRPC).
    `model`: send to this model instead of the ensemble.
    """

    name: str
    expect: str
    grpc: tuple = ()
    http: dict | None = None
    model: str | None = None
    parameters: tuple = ()
    endpoint: str = ""
    raw: bytes | None = None
    headers: tuple = ()
    admin: str = ""

    @property
    def protocol(self) -> str:
        return "http" if self.http is not None or self.endpoint or self.raw is not None else "grpc"


# Calls outside inference a hostile client may try (tritonclient.grpc); each must be refused.
ADMIN_CALLS = {
    "unload": lambda c: c.unload_model("llm"),
    "load": lambda c: c.load_model("evil", config='{"backend": "python"}', files={"file:1/model.py": b"import os"}),
    "shared memory": lambda c: c.register_system_shared_memory("evil", "/facert_evil", 1024),
    "statistics": lambda c: c.get_inference_statistics(),
    "trace": lambda c: c.update_trace_settings(settings={"trace_file": "/tmp/evil"}),
    "log": lambda c: c.update_log_settings({"log_file": "/tmp/evil"}),
}


@functools.lru_cache(maxsize=1)
def _gzip_bomb(inflated: int = 100 * 2**20) -> bytes:
    """About 100 KB of gzip that inflates to `inflated` bytes of JSON-looking padding."""
    import gzip

    return gzip.compress(b"{" + b" " * (inflated - 2) + b"}", compresslevel=9)


def malformed_corpus(image: bytes) -> list[Malformed]:
    """The corpus: every case is refused with a message naming its problem."""
    i32 = lambda v: np.array([[v]], np.int32)  # noqa: E731
    f32 = lambda v: np.array([[v]], np.float32)  # noqa: E731
    dtype = "data-type is"
    shape = "unexpected shape for input"
    half = image[: len(image) // 2]

    def batch(n: int) -> tuple:  # n copies of a good request (a small image: the batch size is the fault) in one
        return tuple((name, np.repeat(a, n, axis=0), d) for name, (a, d) in good_grpc_tensors(small, "hi", 4).items())

    small = _png(16, 16)

    return [
        # images
        Malformed("image: zero bytes", "image is empty", (("IMAGE", _b(b""), "BYTES"),)),
        Malformed("image: random bytes", "cannot decode image", (("IMAGE", _b(bytes(range(256)) * 4), "BYTES"),)),
        Malformed("image: truncated PNG", "cannot decode image", (("IMAGE", _b(image[:200]), "BYTES"),)),
        Malformed("image: half a PNG", "cannot decode image", (("IMAGE", _b(half), "BYTES"),)),
        Malformed("image: JPEG magic then junk", "cannot decode image",
                  (("IMAGE", _b(b"\xff\xd8\xff\xe0" + b"\x00" * 64), "BYTES"),)),
        Malformed("image: GIF magic then junk", "cannot decode image", (("IMAGE", _b(b"GIF89a not really"), "BYTES"),)),
        Malformed("image: text", "cannot decode image", (("IMAGE", _b(b"a face, trust me"), "BYTES"),)),
        Malformed("image: 48 Mpx PNG header (bomb)", "over the 40000000-pixel bound",
                  (("IMAGE", _b(_png_header(8000, 6000)), "BYTES"),)),
        Malformed("image: 100000 x 100000 PNG header", "over the 40000000-pixel bound",
                  (("IMAGE", _b(_png_header(100_000, 100_000)), "BYTES"),)),
        Malformed("image: missing", "the image is missing", (("IMAGE", None, None),)),
        Malformed("image: both IMAGE and IMAGE_BASE64", "send the images once",
                  (("IMAGE_BASE64", _b(base64.b64encode(image)), "BYTES"),)),
        Malformed("image: IMAGE_BASE64 not base64", "IMAGE_BASE64 item 1 is not valid base64",
                  (("IMAGE", None, None), ("IMAGE_BASE64", _b(b"not base64!"), "BYTES"))),
        Malformed("image: IMAGE_BASE64 of junk", "cannot decode image",
                  (("IMAGE", None, None), ("IMAGE_BASE64", _b(base64.b64encode(b"junk" * 10)), "BYTES"))),
        Malformed("image: shape [1, 1, 1]", "unexpected shape for input 'IMAGE'",
                  (("IMAGE", np.array([[[image]]], dtype=np.object_), "BYTES"),)),
        Malformed("image: none in the list", "the request holds no image",
                  (("IMAGE", np.empty((1, 0), dtype=np.object_), "BYTES"),)),
        Malformed("image: 9 images, over the bound", "over the 8-image bound",
                  (("IMAGE", np.array([[small] * 9], dtype=np.object_), "BYTES"),)),
        Malformed("image: second of two empty", "image 2 of 2: image is empty",
                  (("IMAGE", np.array([[small, b""]], dtype=np.object_), "BYTES"),)),
        Malformed("image: 100000 x 1 PNG header (extreme aspect)", "aspect ratio",
                  (("IMAGE", _b(_png_header(100_000, 1)), "BYTES"),)),
        Malformed("image: two requests in one (batch of 2)", "IMAGE must be [1, N]", batch(2)),
        # text
        Malformed("question: missing", "the question is missing", (("QUESTION", None, None),)),
        Malformed("question: empty", "question is empty", (("QUESTION", _b(b""), "BYTES"),)),
        Malformed("question: whitespace", "question is empty", (("QUESTION", _b(b" \n\t "), "BYTES"),)),
        Malformed("question: not UTF-8", "QUESTION is not UTF-8 text", (("QUESTION", _b(b"\xff\xfe\xfa"), "BYTES"),)),
        Malformed("question: over the prompt bound", "over the model's",
                  (("QUESTION", _b(b"why " * 600), "BYTES"),)),
        Malformed("question: over the character bound", "over the 16384-character bound",
                  (("QUESTION", _b(b"x" * 20_000), "BYTES"),)),
        Malformed("messages: not JSON", "MESSAGES is not valid JSON",
                  (("QUESTION", None, None), ("MESSAGES", _b(b"[{role: user"), "BYTES"))),
        Malformed("messages: two image parts for one image", "2 image parts but the request carries 1",
                  (("QUESTION", None, None), ("MESSAGES", _b(json.dumps([{"role": "user", "content": [
                      {"type": "image"}, {"type": "image"}, {"type": "text", "text": "hi"}]}]).encode()), "BYTES"))),
        Malformed("messages: with QUESTION too", "exactly one of them",
                  (("MESSAGES", _b(json.dumps([{"role": "user", "content": "hi"}]).encode()), "BYTES"),)),
        Malformed("question: shape [1, 2]", "unexpected shape for input 'QUESTION'",
                  (("QUESTION", np.array([[b"a", b"b"]], dtype=np.object_), "BYTES"),)),
        # tensor types and shapes
        Malformed("MAX_TOKENS as FP32", f"'MAX_TOKENS' {dtype} 'FP32'", (("MAX_TOKENS", f32(5.0), "FP32"),)),
        Malformed("MAX_TOKENS as INT64", f"'MAX_TOKENS' {dtype} 'INT64'",
                  (("MAX_TOKENS", np.array([[5]], np.int64), "INT64"),)),
        Malformed("MAX_TOKENS shape [1, 2]", f"{shape} 'MAX_TOKENS'",
                  (("MAX_TOKENS", np.array([[5, 6]], np.int32), "INT32"),)),
        Malformed("MAX_TOKENS shape [1, 1, 1]", f"{shape} 'MAX_TOKENS'",
                  (("MAX_TOKENS", np.array([[[5]]], np.int32), "INT32"),)),
        Malformed("TEMPERATURE as INT32", f"'TEMPERATURE' {dtype} 'INT32'", (("TEMPERATURE", i32(1), "INT32"),)),
        Malformed("TOP_P as FP64", f"'TOP_P' {dtype} 'FP64'", (("TOP_P", np.array([[0.5]], np.float64), "FP64"),)),
        Malformed("SEED as FP32", f"'SEED' {dtype} 'FP32'", (("SEED", f32(1.0), "FP32"),)),
        Malformed("STREAM as INT32", f"'STREAM' {dtype} 'INT32'", (("STREAM", i32(1), "INT32"),)),
        Malformed("QUESTION as INT32", f"'QUESTION' {dtype} 'INT32'", (("QUESTION", i32(7), "INT32"),)),
        Malformed("IMAGE as UINT8", f"'IMAGE' {dtype} 'UINT8'",
                  (("IMAGE", np.frombuffer(image[:64], np.uint8).reshape(1, -1).copy(), "UINT8"),)),
        Malformed("unknown input PROMPT", "unexpected inference input 'PROMPT'", (("PROMPT", _b(b"hi"), "BYTES"),)),
        Malformed("batch of 300, over max_batch_size", "batch-size must be <=", batch(300)),
        Malformed("unknown model", "unknown model", (), model="faceinsight_v9"),
        # parameters
        Malformed("max_tokens 0", "max_tokens must be in [1, 4096], got 0", (("MAX_TOKENS", i32(0), "INT32"),)),
        Malformed("max_tokens negative", "max_tokens must be in [1, 4096], got -5",
                  (("MAX_TOKENS", i32(-5), "INT32"),)),
        Malformed("max_tokens over the limit", "max_tokens must be in [1, 4096], got 5000",
                  (("MAX_TOKENS", i32(5000), "INT32"),)),
        Malformed("max_tokens past the context", "leaves no room for a prompt", (("MAX_TOKENS", i32(4096), "INT32"),)),
        Malformed("temperature negative", "temperature must be in [0, 10]", (("TEMPERATURE", f32(-0.5), "FP32"),)),
        Malformed("temperature 100", "temperature must be in [0, 10]", (("TEMPERATURE", f32(100.0), "FP32"),)),
        Malformed("temperature NaN", "temperature must be in [0, 10]", (("TEMPERATURE", f32(float("nan")), "FP32"),)),
        Malformed("top_p 0", "top_p must be in (0, 1]", (("TOP_P", f32(0.0), "FP32"),)),
        Malformed("top_p 1.5", "top_p must be in (0, 1]", (("TOP_P", f32(1.5), "FP32"),)),
        # over HTTP (generate extension, JSON)
        Malformed("http: MAX_TOKENS not a number", "input 'MAX_TOKENS' (INT32) must be an integer",
                  http={"MAX_TOKENS": "ten"}),
        Malformed("http: IMAGE_BASE64 not base64", "IMAGE_BASE64 item 1 is not valid base64", http={"IMAGE_BASE64": "@@@"}),
        Malformed("http: missing question", "the question is missing", http={"QUESTION": None}),
        Malformed("http: top_p out of range", "top_p must be in (0, 1]", http={"TOP_P": 2.0}),
        Malformed("http: 81 Mpx PNG header", "over the 40000000-pixel bound",
                  http={"IMAGE_BASE64": base64.b64encode(_png_header(9000, 9000)).decode()}),
        Malformed("http: unknown model", "unknown model", http={}, model="faceinsight_v9"),
        # over HTTP: JSON of the wrong type, misspelt and unknown inputs (named in the answer)
        Malformed("http: TEMPERATURE a string", "input 'TEMPERATURE'", http={"TEMPERATURE": "hot"}),
        Malformed("http: STREAM a string", "input 'STREAM' (BOOL) must be true or false", http={"STREAM": "yes"}),
        Malformed("http: QUESTION a number", "input 'QUESTION' (BYTES) must be a string", http={"QUESTION": 7}),
        Malformed("http: SEED a float", "input 'SEED'", http={"SEED": 1.5}),
        Malformed("http: MAX_TOKENS true", "input 'MAX_TOKENS'", http={"MAX_TOKENS": True}),
        Malformed("http: QUESTION a list of 2", "input 'QUESTION' takes one value", http={"QUESTION": ["a", "b"]}),
        Malformed("http: misspelt input QESTION", "unknown input 'QESTION'", http={"QESTION": "Is he smiling?"}),
        Malformed("http: the cancel key from a client", "unknown input 'facert_cancel_key'",
                  http={"facert_cancel_key": "0" * 32}),
        Malformed("http: body not JSON", "not JSON", raw=b"IMAGE=1&QUESTION=2"),
        Malformed("http: body a JSON list", "must be a JSON object", raw=b"[1, 2]"),
        # SEED the sampler cannot honour
        Malformed("SEED over 32 bits", "seed must be in [0, 4294967295]",
                  (("SEED", np.array([[2**40 + 7]], np.int64), "INT64"),)),
        Malformed("SEED negative", "seed must be in [0, 4294967295]", (("SEED", np.array([[-1]], np.int64), "INT64"),)),
        Malformed("http: SEED over 64 bits", "input 'SEED' (INT64) must be an integer", http={"SEED": 2**70}),
        # misspelt input and unknown request parameters over gRPC; shared memory
        Malformed("misspelt input QUESTON", "unexpected inference input 'QUESTON'",
                  (("QUESTION", None, None), ("QUESTON", _b(b"hi"), "BYTES"))),
        Malformed("unknown request parameter", "unknown request parameter 'temperature'",
                  parameters=(("temperature", 0.5),)),
        Malformed("the cancel key from a client", "unknown request parameter 'facert_cancel_key'",
                  parameters=(("facert_cancel_key", "0" * 32),)),
        # the internal steps, by name: not reachable
        *[Malformed(f"internal step {m}", "unknown model", model=m)
          for m in ("preprocessing", "vision_encoder", "llm", "postprocessing")],
        *[Malformed(f"http: internal step {m} /infer", "unknown model", model=m, endpoint="infer", raw=b"{}")
          for m in ("preprocessing", "face_parser", "llm")],
        Malformed("http: internal step llm generate", "unknown model", http={}, model="llm"),
        Malformed("http: ensemble /infer", "streams its answers", endpoint="infer", raw=b'{"inputs": []}'),
        # compressed bodies: refused before anything is inflated
        *[Malformed(f"http: gzip body to {m} {e}", "compressed request bodies", model=m, endpoint=e,
                    raw=_gzip_bomb(), headers=(("Content-Encoding", "gzip"),))
          for m, e in (("faceinsight", "generate"), ("faceinsight", "generate_stream"), ("faceinsight", "infer"),
                       ("preprocessing", "infer"), ("vision_encoder", "infer"), ("postprocessing", "infer"))],
        # APIs outside inference
        Malformed("http: unload a model", "not available on this server", endpoint="/v2/repository/models/llm/unload",
                  raw=b"{}"),
        Malformed("http: register shared memory", "not available on this server",
                  endpoint="/v2/systemsharedmemory/region/evil/register", raw=b'{"key": "/evil", "byte_size": 64}'),
        Malformed("http: log settings", "not available on this server", endpoint="/v2/logging",
                  raw=b'{"log_file": "/tmp/evil"}'),
        *[Malformed(f"grpc: {name}", "not available on this server", admin=name) for name in ADMIN_CALLS],
    ]


def good_grpc_tensors(image: bytes, question: str, max_tokens: int, stream: bool = True,
                      temperature: float = 0.0, seed: int | None = None) -> dict[str, tuple[np.ndarray, str]]:
    t = {"IMAGE": (_b(image), "BYTES"), "QUESTION": (_b(question.encode()), "BYTES"),
         "MAX_TOKENS": (np.array([[max_tokens]], np.int32), "INT32"), "STREAM": (np.array([[stream]]), "BOOL")}
    if temperature:
        t["TEMPERATURE"] = (np.array([[temperature]], np.float32), "FP32")
    if seed is not None:
        t["SEED"] = (np.array([[seed]], np.int64), "INT64")
    return t


def apply_changes(tensors: dict, case: Malformed) -> list:
    """The gRPC InferInputs of a good request with the case's changes applied."""
    import tritonclient.grpc as grpcclient

    tensors = dict(tensors)
    for name, array, dtype in case.grpc:
        if array is None:
            tensors.pop(name, None)
        else:
            tensors[name] = (array, dtype)
    inputs = []
    for name, (array, dtype) in tensors.items():
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


def malformed_inputs(case: Malformed, image: bytes) -> list:
    """The gRPC inputs of a corpus case: the good request (4 tokens, streamed) with the case's changes."""
    return apply_changes(good_grpc_tensors(image, QUESTIONS[0], 4), case)


def _http_error_text(e: urllib.error.HTTPError) -> str:
    text = e.read().decode(errors="replace")
    try:
        return json.loads(text).get("error") or text
    except (ValueError, AttributeError):
        return text


def send_malformed(case: Malformed, grpc_url: str, http_url: str, image: bytes,
                   model: str = "faceinsight", timeout_s: float = 60.0) -> str | None:
    """Send one corpus case; the server's error message, or None if it was accepted."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    model = case.model or model
    if case.admin:
        with grpcclient.InferenceServerClient(grpc_url) as client:
            try:
                ADMIN_CALLS[case.admin](client)
                return None
            except InferenceServerException as e:
                return e.message()
    if case.protocol == "http":
        if case.raw is not None:
            data = case.raw
        else:
            body = {"IMAGE_BASE64": base64.b64encode(image).decode(), "QUESTION": QUESTIONS[0], "MAX_TOKENS": 4,
                    **(case.http or {})}
            data = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
        endpoint = case.endpoint or "generate"
        path = endpoint if endpoint.startswith("/") else f"/v2/models/{model}/{endpoint}"
        req = urllib.request.Request(f"http://{http_url}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **dict(case.headers)})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                r.read()
            return None
        except urllib.error.HTTPError as e:
            return _http_error_text(e)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, malformed_inputs(case, image), enable_empty_final_response=True,
                                  parameters=dict(case.parameters) or None)
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                return error.message() if hasattr(error, "message") else str(error)
            if result.get_response().parameters["triton_final_response"].bool_param:
                return None
    finally:
        client.stop_stream()
        client.close()


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
                  p_cancel: float, n_images: int) -> list[tuple[Record, dict]]:
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
            # long enough that the server is still generating when the cancellation reaches it; half of
            # them cancelled at once, 0-50 ms after sending (while the request is in the first steps)
            rec = Record(i, "cancel", max_tokens=max(64, 4 * max_tokens), cancel_after=rng.randint(1, 3))
            if rng.random() < 0.5:
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


async def run_one(stream: Stream, rec: Record, inputs: list, case: Malformed | None = None) -> None:
    """Send one request on the worker's stream; fill in its record (cancelling it after cancel_after tokens,
    or cancel_at_s seconds after sending)."""
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
    judge(rec)


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


# ------------------------------------------------------------------------------------- the memory

def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def children(pid: int) -> list[int]:
    from runtime.serving.server import process_stat

    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = process_stat(int(entry.name))
            if st is not None and st[1] == pid and st[0] not in ("Z", "X"):
                out.append(int(entry.name))
    return out


def gateway_of(server_pid: int) -> int | None:
    """The gateway beside a tritonserver (both children of the `facert serve` that runs them)."""
    from runtime.serving.server import process_stat

    st = process_stat(server_pid)
    for pid in children(st[1]) if st else []:
        try:
            if b"runtime.serving.gateway" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            pass
    return None


class MemorySampler(threading.Thread):
    """Every interval: RSS of the server, its gateway and each of its stub processes, and their
    shared-memory regions."""

    def __init__(self, server_pid: int, interval_s: float = 1.0, done_count=lambda: 0,
                 gateway_pid: int | None = None):
        super().__init__(daemon=True, name="soak-memory")
        self.server_pid, self.interval_s, self.done_count = server_pid, interval_s, done_count
        self.gateway_pid = gateway_pid if gateway_pid is not None else gateway_of(server_pid)
        self.samples: list[dict] = []
        self.t0 = time.perf_counter()
        self._halt = threading.Event()

    def sample(self) -> dict:
        procs = {"tritonserver": rss_mb(self.server_pid) or 0.0}
        if self.gateway_pid is not None:
            procs["gateway"] = rss_mb(self.gateway_pid) or 0.0
        shm = 0.0
        for pid in children(self.server_pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
                name = Path(argv[1].decode(errors="replace")).parts[-3]  # <repository>/<model>/<version>/model.py
                region = Path("/dev/shm") / argv[2].decode(errors="replace")  # the stub's shared-memory region
                try:
                    shm += region.stat().st_blocks * 512 / 2**20
                except OSError:
                    pass
            else:
                name = f"pid {pid}"
            procs[name] = procs.get(name, 0.0) + (rss_mb(pid) or 0.0)
        return {"t": round(time.perf_counter() - self.t0, 2), "done": self.done_count(),
                "rss_mb": {k: round(v, 1) for k, v in procs.items()}, "total_rss_mb": round(sum(procs.values()), 1),
                "shm_mb": round(shm, 1)}

    def run(self) -> None:
        while True:
            self.samples.append(self.sample())
            if self._halt.wait(self.interval_s):
                self.samples.append(self.sample())
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def _total(s: dict) -> float:
    return s["total_rss_mb"] + s["shm_mb"]


def at_rest(samples: list[dict], window: tuple[float, float]) -> dict:
    """Memory at rest in a window (sampler seconds): the median of its second half, once frees have settled."""
    inside = [s for s in samples if window[0] <= s["t"] <= window[1]]
    settled = inside[len(inside) // 2:] or inside or samples[-1:]
    names = sorted({k for s in settled for k in s["rss_mb"]})
    return {"total_mb": round(float(np.median([_total(s) for s in settled])), 1),
            "shm_mb": round(float(np.median([s["shm_mb"] for s in settled])), 1),
            "by_process_mb": {k: round(float(np.median([s["rss_mb"].get(k, 0.0) for s in settled])), 1)
                              for k in names}}


def memory_verdict(samples: list[dict], rests: dict[str, tuple[float, float]]) -> dict:
    """Memory at rest at the start, after the warm-up and at the end (the windows in `rests`), the peak
    under load, and the verdict: flat when the end exceeds the after-warm-up rest by less than
    max(2 %, 64 MB). Each process's own change is kept, so that a rise can be placed."""
    rest = {name: at_rest(samples, w) for name, w in rests.items()}
    warm, end = rest["after_warmup"], rest["end"]
    growth = end["total_mb"] - warm["total_mb"]
    bound = max(0.02 * warm["total_mb"], 64.0)
    loaded = [s for s in samples if rests["after_warmup"][1] < s["t"] < rests["end"][0]] or samples
    per_process = {k: round(end["by_process_mb"].get(k, 0.0) - warm["by_process_mb"].get(k, 0.0), 1)
                   for k in sorted(set(end["by_process_mb"]) | set(warm["by_process_mb"]))}
    return {"rests": {k: list(v) for k, v in rests.items()},
            "start_mb": rest["start"]["total_mb"], "after_warmup_mb": warm["total_mb"], "end_mb": end["total_mb"],
            "peak_under_load_mb": round(max(_total(s) for s in loaded), 1),
            "growth_mb": round(growth, 1), "growth_pct": round(100 * growth / warm["total_mb"], 2),
            "growth_by_process_mb": per_process, "rest_by_process_mb": {k: v["by_process_mb"] for k, v in rest.items()},
            "flat_bound_mb": round(bound, 1), "flat": growth < bound}


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
             f"client after 1-3 tokens; seed {st['seed']}",
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
                             len(images))
        settings = {"requests": args.requests, "concurrency": args.concurrency, "max_seconds": args.max_seconds,
                    "max_tokens": args.max_tokens, "malformed_share": args.malformed, "cancel_share": args.cancel,
                    "warmup": args.warmup, "rest_seconds": args.rest_seconds, "seed": args.seed,
                    "max_batch": args.max_batch,
                    "stream_per_request": args.stream_per_request,
                    "max_queue_size": args.max_queue_size, "queue_timeout_ms": args.queue_timeout_ms,
                    "corpus_grpc_cases": sum(c.protocol == "grpc" and c.model is None for c in corpus),
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
