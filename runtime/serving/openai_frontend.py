"""An OpenAI-compatible chat endpoint, with images, in front of the served Triton ensemble.

    facert serve --model-repository repo --openai-port 9000          (on --host, loopback by default)

An ASGI app (FastAPI on uvicorn) served by facert's gateway (runtime/serving/gateway.py), the
process in front of tritonserver, in its event loop: a chat request becomes one ensemble request
that the gateway forwards to tritonserver over gRPC streaming (ModelStreamInfer) exactly as it
forwards a gRPC client's, on its own stream: checked against the ensemble's config, admitted under
the ensemble's bound, given a cancel key. Serving it there rather than in a process of its own
spares the image a second trip through gRPC and a Python process (benchmarks/results/
2026-11-30-openai-overhead-in-gateway/NOTES.md).

- `POST /v1/chat/completions`: `messages` with text and `image_url` parts, images only as
  `data:image/...;base64,` URLs (an http(s) URL is refused: this server never fetches a URL a
  client sends). The conversation goes to the ensemble as MESSAGES, transformers' typed-content
  form (`image_url` parts become `{"type": "image"}` parts, their decoded bytes go in IMAGE in
  order), and the model's own chat template renders it. `stream: true` answers with server-sent
  events in OpenAI's chunk format, ending with `data: [DONE]`; `stream_options.include_usage` adds
  the usage chunk. `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`.
  Parameters a client leaves out take the server's defaults (greedy, 64 tokens), not OpenAI's.
  facert's extras (attributes after the constraint step, per-stage timings) come in the `facert`
  field of the response (of the last chunk when streaming).
- `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (200 once the ensemble is ready, else 503).

The ensemble always streams to the endpoint (STREAM=true), whether or not the client streams: the
endpoint counts the completion tokens, cuts the text at a `stop` string (and then cancels the
generation), and notices a client that goes away. Cancelling is the gateway's: it marks the
request's cancel key (the llm step stops within a token) and reads the rest of the answer itself;
it never cancels a request inside tritonserver (see the gateway's docstring).

Errors are OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for bad
input (the request's own shape here, the image, the prompt and the parameters' ranges as the
ensemble's preprocessing step says), 413 for a body over --openai-max-body-mb, 429 when the
ensemble's bound or a queue of the server is full (retry later), 503 when the server or the model
is not available, 504 for a request timeout, 500 for a failure inside a step; a client that goes
away has its generation cancelled (499 in the access log).
An error after the first streamed token can only travel in the stream: a `data: {"error": ...}`
event, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

import numpy as np
import pybase64
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

DEFAULT_MAX_BODY_MB = 64
MAX_STOP_STRINGS = 4  # as OpenAI's API
INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1
# data:image/<subtype>[;param=value...];base64,<payload>
DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+(?:;[A-Za-z0-9_.+-]+=[^;,]*)*;base64,", re.ASCII)
OWNED_BY = "facert"


# ------------------------------------------------------------------------------ request schema

class _Strict(BaseModel):
    # a parameter this server does not know or support is refused, not silently ignored
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=-INT32_MAX, le=INT32_MAX)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=-INT64_MAX - 1, le=INT64_MAX)
    stop: str | list[str] | None = None
    n: int | None = None
    user: str | None = None  # the caller's end-user id in OpenAI's API; not used here
    max_tiles: int | None = Field(default=None, ge=1, le=INT32_MAX)  # facert: InternVL tiles per image


# ------------------------------------------------------------------------------------- errors

class APIError(Exception):
    """A request the endpoint answers with OpenAI's error JSON and this HTTP status."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "overloaded_error", 499: "client_closed_request", 500: "server_error",
             503: "service_unavailable_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


# What the ensemble's error message means for the client, by runtime.client's error kinds. A plain
# "error" is the ensemble's verdict on the request (preprocessing: the image, the prompt, the
# parameters' ranges; Triton: the tensors' shapes): 400.
STATUS_BY_KIND = {"overloaded": 429, "unavailable": 503, "timeout": 504, "cancelled": 499, "internal": 500,
                  "error": 400}
ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")  # Triton's, before a step's message


def upstream_error(message: str) -> APIError:
    """The server's message for a request it refused, with the status its kind calls for."""
    from runtime.client import error_kind

    kind = error_kind(message)
    message = ENSEMBLE_PREFIX.sub("", message)
    if kind == "unavailable":
        message = f"the inference server or the model is not available: {message}"
    return APIError(STATUS_BY_KIND[kind], message, code=None if kind == "error" else kind)


def validation_error(e: ValidationError) -> APIError:
    """pydantic's first complaint, in words that name the parameter."""
    err = e.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p in ("text", "image_url")
                                                         and err["type"] == "union_tag_invalid"))
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unsupported parameter {where!r}: this server does not accept it", param=where,
                        code="unsupported_parameter")
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err['msg']}")
    if err["type"] == "model_type" and not err["loc"]:
        return APIError(400, "the request body must be a JSON object")
    return APIError(400, f"{where or 'request'}: {err['msg']}", param=where or None)


# ---------------------------------------------------------------------------- the conversation

@dataclass
class EnsembleRequest:
    """What goes to the ensemble for one chat request."""

    messages: list[dict]  # transformers' typed-content conversation
    images: list[bytes]  # the decoded images, in the order of the {"type": "image"} parts
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    max_tiles: int | None
    stops: list[str] = field(default_factory=list)


def decode_data_url(url: str, where: str) -> bytes:
    """The image bytes of a `data:image/...;base64,` URL; APIError for anything else."""
    head = url[:64].lower()
    if head.startswith(("http://", "https://")):
        raise APIError(400, f"{where}: image URLs are not fetched by this server; send the image inline as a "
                            f"data:image/...;base64,... URL", param=where, code="image_url_not_supported")
    m = DATA_URL.match(url)
    if m is None:
        raise APIError(400, f"{where}: expected a data:image/<type>;base64,<data> URL, got {url[:40]!r}"
                            f"{'...' if len(url) > 40 else ''}", param=where, code="invalid_image_url")
    try:  # pybase64 (SIMD): 2.4 ms -> 0.05 ms for a 1 MB image here, most of what the endpoint adds
        data = pybase64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{where}: the image's base64 data is invalid: {e}", param=where,
                       code="invalid_image_url") from None
    if not data:
        raise APIError(400, f"{where}: the image is empty (0 bytes)", param=where, code="invalid_image_url")
    return data


def to_ensemble(req: ChatRequest) -> EnsembleRequest:
    """The chat request as the ensemble's MESSAGES + IMAGE, with its sampling parameters."""
    if req.n not in (None, 1):
        raise APIError(400, f"n must be 1 (one answer per request), got {req.n}", param="n")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if req.max_tokens is not None and req.max_completion_tokens is not None \
            and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, f"max_tokens ({req.max_tokens}) and max_completion_tokens ({req.max_completion_tokens}) "
                            "differ; send one of them", param="max_completion_tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop holds {len(stops)} strings, at most {MAX_STOP_STRINGS} are allowed", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    messages, images = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        if isinstance(m.content, str):
            messages.append({"role": role, "content": m.content})
            continue
        parts = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            if role != "user":
                raise APIError(400, f"{where}: only user messages may hold images, not {m.role} messages",
                               param=where)
            images.append(decode_data_url(part.image_url.url, f"{where}.image_url.url"))
            parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    if messages[-1]["role"] != "user":
        raise APIError(400, f"the last message must be the user's, got {req.messages[-1].role!r}", param="messages")
    return EnsembleRequest(messages, images, req.max_completion_tokens if req.max_completion_tokens is not None
                           else req.max_tokens, req.temperature, req.top_p, req.seed, req.max_tiles, stops)


def infer_request(e: EnsembleRequest, model: str, request_id: str):
    """The ensemble's gRPC request (CONTRACT: IMAGE [1, N], MESSAGES [1, 1]), its tensors as raw
    contents, as tritonclient would send them; parameters the client left out are not sent, so the
    server's defaults apply."""
    from tritonclient.grpc import service_pb2

    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)

    def add(name: str, datatype: str, shape: list[int], raw: bytes) -> None:
        t = req.inputs.add(name=name, datatype=datatype)
        t.shape.extend(shape)
        req.raw_input_contents.append(raw)

    def strings(items: list[bytes]) -> bytes:  # BYTES: each element's 4-byte little-endian length, then it
        return b"".join(piece for item in items for piece in (struct.pack("<I", len(item)), item))

    add("IMAGE", "BYTES", [1, len(e.images)], strings(e.images))
    add("MESSAGES", "BYTES", [1, 1], strings([json.dumps(e.messages).encode()]))
    add("STREAM", "BOOL", [1, 1], b"\x01")
    for name, value, datatype, np_dtype in (("MAX_TOKENS", e.max_tokens, "INT32", np.int32),
                                            ("TEMPERATURE", e.temperature, "FP32", np.float32),
                                            ("TOP_P", e.top_p, "FP32", np.float32),
                                            ("SEED", e.seed, "INT64", np.int64),
                                            ("MAX_TILES", e.max_tiles, "INT32", np.int32)):
        if value is not None:
            add(name, datatype, [1, 1], np.array([value], np_dtype).tobytes())
    return req


# ------------------------------------------------------------------------------ stop strings


class StopCutter:
    """Cuts the answer at the first `stop` string: text that could still begin one is held back."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.text = ""
        self.sent = 0  # characters of `text` released
        self.stopped = False

    def push(self, piece: str) -> str:
        """The text that can be released after `piece`; sets `stopped` once a stop string appeared."""
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.sent, self.stopped = self.text[self.sent:cut], cut, True
            return out
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.text) - self.sent), 0, -1)
                    if self.text.endswith(s[:k])), default=0)
        out = self.text[self.sent:len(self.text) - keep]
        self.sent += len(out)
        return out

    def flush(self) -> str:
        """The held-back rest, once the answer has ended by itself."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


# ----------------------------------------------------------------------- one ensemble request

@dataclass
class Piece:
    text: str  # what the client may see now (stop strings applied)
    finish: str = ""  # stop / length on the last piece
    extras: dict | None = None  # the last piece's attributes and timings


class Outputs:
    """One streamed response's outputs, read from their raw contents (Triton's gRPC responses carry every
    output so) without building arrays: the endpoint reads a few short strings of every token's."""

    def __init__(self, response):  # a ModelInferResponse
        self.tensors = {o.name: (o, raw) for o, raw in zip(response.outputs, response.raw_output_contents)}

    def elements(self, name: str) -> int:
        if name not in self.tensors:
            return 0
        count = 1
        for d in self.tensors[name][0].shape:
            count *= d
        return count

    def string(self, name: str) -> str:
        """The first element of a BYTES output ('' when absent or empty): a 4-byte length, then the bytes."""
        raw = self.tensors[name][1] if name in self.tensors else b""
        if len(raw) < 4:
            return ""
        (size,) = struct.unpack_from("<I", raw)
        return raw[4:4 + size].decode("utf-8")


class EnsembleCall:
    """One chat request, forwarded by the gateway to tritonserver as it forwards a gRPC client's stream
    that holds one request (runtime.serving.gateway.ClientStream): checked against the ensemble's
    config, admitted under its bound (refused as overloaded beyond it), given a cancel key, on a stream
    of its own to tritonserver. `cancel()` is the client leaving: the gateway marks the key (the llm
    step stops within a token) and reads the rest of the answer itself."""

    def __init__(self, gw, request, stops: list[str]):
        self.stream = gw.send_one(request)
        self.cutter = StopCutter(stops)
        self.done = False  # the server finished the request (answer or error), or it was cancelled
        self.prompt_tokens: int | None = None
        self.completion_tokens = 0

    async def next(self) -> Piece | None:
        """The next piece of the answer; None after the last. APIError if the server refused it."""
        if self.done:
            return None
        resp = await self.stream.out.get()
        if resp is None:
            self.done = True
            raise APIError(503, "the server closed the request without an answer (see its log)", code="unavailable")
        if resp.error_message:
            self.done = True
            raise upstream_error(resp.error_message)
        result = Outputs(resp.infer_response)
        self.completion_tokens += result.elements("TOKEN_IDS")
        timings = json.loads(result.string("TIMINGS") or "{}")  # the first token's and the last response's
        self.prompt_tokens = timings.pop("prompt_tokens", self.prompt_tokens)
        text = self.cutter.push(result.string("TEXT"))
        if self.cutter.stopped:  # the answer ends here: stop generating
            self.cancel()
            return Piece(text, "stop")
        finish = result.string("FINISH_REASON")
        if not finish:
            return Piece(text)
        self.done = True
        text += self.cutter.flush()
        attributes = result.string("ATTRIBUTES")
        extras = {"attributes": None, "attributes_raw": None, "constraints_fired": [], "timings": timings}
        if attributes and attributes != "null":
            extras.update(json.loads(attributes))
        return Piece(text, finish, extras)

    def cancel(self) -> None:
        """The client went away or the answer reached a stop string: stop the generation if it still runs."""
        if not self.done:
            self.done = True
            if self.stream.inflight:
                self.stream.client_left()

    def usage(self) -> dict:
        prompt = self.prompt_tokens
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": None if prompt is None else prompt + self.completion_tokens}


# ------------------------------------------------------------------------------------ the app

def _chunk(cid: str, created: int, model: str, delta: dict | None, finish: str | None = None, **extra) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
            **extra}
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


async def _read_body(request, max_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"the request body is {int(declared)} bytes, over this server's {max_bytes}-byte bound")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"the request body is over this server's {max_bytes}-byte bound")
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnected(receive) -> None:
    """Returns once the client has gone away (after the body was read, ASGI's receive() waits for that)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request, work):
    """Await `work` (a coroutine); if the client goes away first, cancel it and raise APIError(499)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise APIError(499, "the client closed the connection")


def create_app(gw, max_body_mb: float = DEFAULT_MAX_BODY_MB):
    """The ASGI app, serving the gateway's public ensembles (`gw`: runtime.serving.gateway.Gateway)."""
    from tritonclient.grpc import service_pb2

    max_body = int(max_body_mb * 1024 * 1024)
    served = list(gw.models)
    created = int(time.time())

    app = FastAPI(title="facert OpenAI-compatible endpoint", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e: StarletteHTTPException):  # no such route, wrong method
        message = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, message).body(), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _bug(_request, e: Exception):  # uvicorn logs the trace; the client gets OpenAI's error JSON
        return JSONResponse(APIError(500, f"internal error in the OpenAI endpoint ({type(e).__name__}): {e}").body(),
                            status_code=500)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": OWNED_BY}

    def unknown(name: str, status: int) -> APIError:
        return APIError(status, f"model {name!r} does not exist; this server serves "
                                f"{' or '.join(repr(m) for m in served)}", param="model", code="model_not_found")

    @app.get("/health")
    async def health():
        for name in served:
            try:
                ready = (await gw.stub.ModelReady(service_pb2.ModelReadyRequest(name=name), timeout=10,
                                                  metadata=gw.upstream_metadata)).ready
            except Exception as e:  # noqa: BLE001 (tritonserver down or restarting)
                raise APIError(503, f"the inference server is not available: {e}") from None
            if not ready:
                raise APIError(503, f"model {name!r} is not ready")
        return {"status": "ok", "models": served}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(name) for name in served]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str):
        if name not in served:
            raise unknown(name, 404)
        return model_card(name)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, max_body)
        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        del body
        if req.model not in served:
            raise unknown(req.model, 400)
        ens = to_ensemble(req)
        cid, created_at, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model
        upstream = infer_request(ens, model, cid)
        if upstream.ByteSize() > gw.max_request_bytes:  # what the gateway sends tritonserver at most
            raise APIError(413, f"the request's images and messages come to {upstream.ByteSize()} bytes, over this "
                                f"server's {gw.max_request_bytes}-byte bound")
        call = EnsembleCall(gw, upstream, ens.stops)
        del ens, upstream
        try:
            # the first piece decides the status: a refused request is an error response, not a stream
            first = await _unless_disconnected(request, call.next())
        except BaseException:
            call.cancel()
            raise
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            usage_field = {"usage": None} if include_usage else {}

            async def events():
                # what is ready at once goes out in one write: the role chunk with the first piece, the
                # last piece with the finish, the usage and [DONE]
                out = [_chunk(cid, created_at, model, {"role": "assistant", "content": ""}, **usage_field)]
                try:
                    piece = first
                    while piece is not None:
                        if piece.text:
                            out.append(_chunk(cid, created_at, model, {"content": piece.text}, **usage_field))
                        if piece.finish:
                            extra = {"facert": piece.extras} if piece.extras is not None else {}
                            out.append(_chunk(cid, created_at, model, {}, piece.finish, **usage_field, **extra))
                            break
                        if out:
                            yield b"".join(out)
                            out = []
                        try:
                            piece = await call.next()
                        except APIError as e:
                            out.append(b"data: " + json.dumps(e.body()).encode() + b"\n\n")
                            break
                    if include_usage:
                        out.append(_chunk(cid, created_at, model, None, usage=call.usage()))
                    out.append(b"data: [DONE]\n\n")
                    yield b"".join(out)
                finally:  # the client went away (or the stream ended): stop the generation if it still runs
                    call.cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def whole() -> Piece:
            text, piece = [first.text], first
            while not piece.finish:
                piece = await call.next()
                text.append(piece.text)
            return Piece("".join(text), piece.finish, piece.extras)

        try:
            answer = await _unless_disconnected(request, whole())
        finally:
            call.cancel()
        completion = {"id": cid, "object": "chat.completion", "created": created_at, "model": model,
                      "choices": [{"index": 0, "logprobs": None, "finish_reason": answer.finish,
                                   "message": {"role": "assistant", "content": answer.text, "refusal": None}}],
                      "usage": call.usage()}
        if answer.extras is not None:
            completion["facert"] = answer.extras
        return Response(json.dumps(completion, separators=(",", ":")), media_type="application/json")

    return app


# ---------------------------------------------------------------------------- in the gateway

class OpenAIEndpoint:
    """The app on uvicorn, in the gateway's event loop (Gateway.start starts it, Gateway.stop stops it)."""

    def __init__(self, gw, host: str, port: int, max_body_mb: float = DEFAULT_MAX_BODY_MB, access_log: bool = False):
        self.gw, self.host, self.port, self.max_body_mb, self.access_log = gw, host, port, max_body_mb, access_log
        self.server = self.ticker = self.socket = None

    async def start(self) -> None:
        """Listen; OSError if the port is taken."""
        import socket

        import uvicorn

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self.socket = socket.create_server((self.host, self.port), family=family)
        config = uvicorn.Config(create_app(self.gw, self.max_body_mb), lifespan="off", log_level="warning",
                                access_log=self.access_log, timeout_graceful_shutdown=5)
        config.load()
        self.server = uvicorn.Server(config)
        self.server.lifespan = config.lifespan_class(config)
        await self.server.startup(sockets=[self.socket])
        # uvicorn's own loop (its Date header, its exit flag); not Server.serve(), which would take the
        # gateway's signal handlers
        self.ticker = asyncio.ensure_future(self.server.main_loop())

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.should_exit = True
        await self.ticker
        await self.server.shutdown(sockets=[self.socket])
