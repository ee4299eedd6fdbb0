"""The malformed-request corpus: requests a hostile or broken client sends, each with the error it must
get, and how to send one (gRPC streaming, raw protobufs, HTTP). The soak harness (benchmarks/soak.py)
and the tests (tests/test_reliability.py, tests/test_hostile.py, ...) both use it.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import queue
import struct
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np

QUESTIONS = ("What can you tell about this face?", "Is this person smiling?", "Describe the hair.",
             "Does this person wear glasses? Answer briefly.")


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


# Calls outside inference a hostile client may try (tritonclient.grpc); each must be refused. (Inference
# statistics are readable through the gateway, for perf_analyzer, since its admission bound.)
ADMIN_CALLS = {
    "unload": lambda c: c.unload_model("llm"),
    "load": lambda c: c.load_model("evil", config='{"backend": "python"}', files={"file:1/model.py": b"import os"}),
    "shared memory": lambda c: c.register_system_shared_memory("evil", "/facert_evil", 1024),
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
        Malformed("question: over the prompt bound", "over the model's",  # 4,400 tokens: over a 4,096 context too
                  (("QUESTION", _b(b"why " * 1100), "BYTES"),)),
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
