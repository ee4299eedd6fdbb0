"""Ask a running `facert serve` over gRPC or HTTP.

The served model is one Triton ensemble (`faceinsight` or `facellm`) whose LLM step is decoupled,
so Triton answers it only through its streaming entry points:
- gRPC: the bidirectional stream (ModelStreamInfer), for streamed and whole answers alike. Each
  response carries the next piece of TEXT; the last one also the finish reason, the attributes
  and the per-stage timings as JSON.
- HTTP: Triton's generate extension: `POST /v2/models/NAME/generate_stream` (server-sent events,
  one per piece) when streaming, `POST /v2/models/NAME/generate` for a whole answer. JSON cannot
  carry raw bytes, so the image travels base64-encoded as IMAGE_BASE64.
"""

from __future__ import annotations

import base64
import http.client
import json
import queue
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:  # runtime.generate imports torch, which a client (the OpenAI endpoint's process) does not need
    from runtime.generate import SamplingParams

ENSEMBLES = ("faceinsight", "facellm")


# What a failed request means, read from the server's message (Triton's own, or a facert step's):
# overloaded: a queue was full (back-pressure; retry later); timeout: the request's timeout passed
# (in a queue or while generating) or no answer came in time; cancelled: cancelled by the client;
# unavailable: the server, the model or one of its processes is not there (a model whose process died
# answers so until the server has reloaded it); internal: a step failed on its own (a bug or a fault:
# runtime.serving.python_backend.error_response); error: anything else, bad input included.
ERROR_KINDS = (
    ("internal", ("internal error",)),
    ("overloaded", ("Exceeds maximum queue size",)),
    ("timeout", ("Request timeout expired", "request timed out", "no response from")),
    ("cancelled", ("cancelled",)),
    ("unavailable", ("is not healthy", "cannot reach", "is not found", "failed to connect", "Socket closed",
                     "StatusCode.UNAVAILABLE")),
)


def error_kind(message: str) -> str:
    """overloaded, timeout, cancelled, unavailable, internal or error (see ERROR_KINDS)."""
    for kind, marks in ERROR_KINDS:
        if any(m in message for m in marks):
            return kind
    return "error"


class RemoteError(RuntimeError):
    """The server refused the request or could not be reached; the message says why, `kind` what it means."""

    def __init__(self, message: str):
        super().__init__(message)
        self.kind = error_kind(message)


def _split_url(url: str) -> str:
    url = url.strip()
    for scheme in ("grpc://", "http://", "https://"):
        if url.startswith(scheme):
            url = url[len(scheme):]
    return url.rstrip("/")


def _result(model: str) -> dict:
    return {"model": model, "text": "", "token_ids": [], "finish_reason": None, "timings": {},
            "attributes": None, "attributes_raw": None, "constraints_fired": [], "image_attributes": [],
            "prompt_tokens": None}


def _absorb(out: dict, text: str, token_ids, finish: str, attributes: str, timings: str,
            on_text: Callable[[str], None] | None) -> None:
    """Fold one response's outputs into the answer."""
    if text:
        out["text"] += text
        if on_text is not None:
            on_text(text)
    out["token_ids"].extend(int(t) for t in token_ids)
    if finish:
        out["finish_reason"] = finish
    if attributes and attributes != "null":
        a = json.loads(attributes)
        out["attributes"], out["attributes_raw"] = a["attributes"], a["attributes_raw"]
        out["constraints_fired"] = a["constraints_fired"]
        out["image_attributes"] = a.get("images", [])
    if timings:
        out["timings"] = json.loads(timings)
        out["prompt_tokens"] = out["timings"].pop("prompt_tokens", None)


# ------------------------------------------------------------------------------------------- gRPC

@dataclass
class Request:
    """One request: its images (in prompt order) and a question or a conversation (`messages`)."""

    images: list[bytes]
    question: str | None = None
    messages: list[dict] | None = None
    max_tiles: int | None = None

    def __post_init__(self):
        if isinstance(self.images, (bytes, bytearray, memoryview)):
            self.images = [self.images]
        self.images = [bytes(b) for b in self.images]
        if (self.question is None) == (self.messages is None):
            raise ValueError("send a question or messages (a conversation), exactly one of them")


def _grpc_inputs(req: Request, params: SamplingParams, stream: bool):
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    inputs = [tensor("IMAGE", np.array([req.images], dtype=np.object_), "BYTES"),
              tensor("MAX_TOKENS", np.array([[params.max_new_tokens]], np.int32), "INT32"),
              tensor("TEMPERATURE", np.array([[params.temperature]], np.float32), "FP32"),
              tensor("TOP_P", np.array([[params.top_p]], np.float32), "FP32"),
              tensor("STREAM", np.array([[stream]], np.bool_), "BOOL")]
    if req.question is not None:
        inputs.append(tensor("QUESTION", np.array([[req.question.encode("utf-8")]], dtype=np.object_), "BYTES"))
    else:
        inputs.append(tensor("MESSAGES", np.array([[json.dumps(req.messages).encode("utf-8")]], dtype=np.object_),
                             "BYTES"))
    if req.max_tiles is not None:
        inputs.append(tensor("MAX_TILES", np.array([[req.max_tiles]], np.int32), "INT32"))
    if params.seed is not None:
        inputs.append(tensor("SEED", np.array([[params.seed]], np.int64), "INT64"))
    return inputs


def find_model(url: str, protocol: str = "grpc") -> str:
    """The served ensemble's name (the repository holds one family's ensemble)."""
    url = _split_url(url)
    try:
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(url) as c:
                index = [(m.name, m.state) for m in c.get_model_repository_index().models]
        else:
            index = [(m["name"], m.get("state", "")) for m in _http_json(url, "POST", "/v2/repository/index", {})]
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001 (connection refused, DNS, ...)
        raise RemoteError(f"cannot reach a server at {url} over {protocol}: {e}") from None
    ready = [n for n, state in index if n in ENSEMBLES and state == "READY"]
    if not ready:
        raise RemoteError(f"{url} serves no ready facert ensemble ({' or '.join(ENSEMBLES)}); it has "
                          f"{sorted(n for n, _ in index) or 'no models'}")
    return ready[0]


def _ask_grpc(url, req: Request, params, stream, on_text, model, timeout_s, request_timeout_s=None) -> dict:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    responses: queue.Queue = queue.Queue()
    out = _result(model)
    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, _grpc_inputs(req, params, stream),
                                  request_id=uuid.uuid4().hex, enable_empty_final_response=True,
                                  timeout=None if request_timeout_s is None else max(1, int(request_timeout_s * 1e6)))
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise RemoteError(f"no response from {url} within {timeout_s:.0f} s") from None
            if error is not None:
                raise RemoteError(error.message() if isinstance(error, InferenceServerException) else str(error))
            if result.as_numpy("TEXT") is not None:
                _absorb(out, _str(result.as_numpy("TEXT")), result.as_numpy("TOKEN_IDS").reshape(-1),
                        _str(result.as_numpy("FINISH_REASON")), _str(result.as_numpy("ATTRIBUTES")),
                        _str(result.as_numpy("TIMINGS")), on_text)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                if out["finish_reason"] is None:
                    raise RemoteError(f"{url} closed the request without an answer (see the server log)")
                break
    except InferenceServerException as e:
        raise RemoteError(e.message()) from None
    finally:
        try:
            client.stop_stream()
        finally:
            client.close()
    return out


def _str(array) -> str:
    return bytes(array.reshape(-1)[0]).decode("utf-8") if array is not None and array.size else ""


# ------------------------------------------------------------------------------------------- HTTP

def _http_json(url: str, method: str, path: str, body: dict | None, timeout_s: float = 30.0):
    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.status != 200:
        raise RemoteError(_http_error(r.status, data))
    return json.loads(data) if data else {}


def _http_error(status: int, body: bytes) -> str:
    """The server's message from an error body: JSON, or a server-sent event ("data: {json}")."""
    text = body.decode("utf-8", "replace").strip()
    if text.startswith("data:"):
        text = text[5:].strip()
    try:
        return json.loads(text).get("error") or f"HTTP {status}"
    except (ValueError, AttributeError):
        return f"HTTP {status}: {text[:500]}"


def _ask_http(url, req: Request, params, stream, on_text, model, timeout_s) -> dict:
    body = {"IMAGE_BASE64": [base64.b64encode(b).decode("ascii") for b in req.images],
            "MAX_TOKENS": params.max_new_tokens, "TEMPERATURE": params.temperature, "TOP_P": params.top_p,
            "STREAM": bool(stream)}
    if req.question is not None:
        body["QUESTION"] = req.question
    else:
        body["MESSAGES"] = json.dumps(req.messages)
    if req.max_tiles is not None:
        body["MAX_TILES"] = req.max_tiles
    if params.seed is not None:
        body["SEED"] = params.seed
    out = _result(model)

    def absorb(event: dict) -> None:
        if "error" in event:
            raise RemoteError(event["error"])
        ids = event.get("TOKEN_IDS", [])
        _absorb(out, event.get("TEXT", ""), ids if isinstance(ids, list) else [ids], event.get("FINISH_REASON", ""),
                event.get("ATTRIBUTES", ""), event.get("TIMINGS", ""), on_text)

    if not stream:
        absorb(_http_json(url, "POST", f"/v2/models/{model}/generate", body, timeout_s))
        return out
    host, _, port = url.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout_s)
    try:
        conn.request("POST", f"/v2/models/{model}/generate_stream", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        r = conn.getresponse()
        if r.status != 200:
            raise RemoteError(_http_error(r.status, r.read()))
        for raw in r:  # server-sent events: "data: {json}" lines separated by blank lines
            line = raw.decode("utf-8").strip()
            if line.startswith("data:"):
                absorb(json.loads(line[5:]))
    except (OSError, http.client.HTTPException) as e:
        raise RemoteError(f"HTTP stream from {url} failed: {e}") from None
    finally:
        conn.close()
    if out["finish_reason"] is None:
        raise RemoteError(f"{url} closed the stream without an answer (see the server log)")
    return out


# -------------------------------------------------------------------------------------------- API

def ask_remote(url: str, images, question: str | None = None, params: SamplingParams | None = None,
               protocol: str = "grpc", stream: bool = False, on_text: Callable[[str], None] | None = None,
               model: str | None = None, timeout_s: float = 300.0, request_timeout_s: float | None = None,
               messages: list[dict] | None = None, max_tiles: int | None = None) -> dict:
    """Ask the served model; returns text, token_ids, finish_reason, attributes (image 1's, and
    image_attributes for each), timings, prompt_tokens (and model).

    images: one encoded image (bytes) or a list of them, in prompt order; with `question` (the user
    turn after the images) or `messages` (a conversation in transformers' typed-content form whose
    {"type": "image"} parts take the images in order). max_tiles caps an InternVL image's tiles.

    on_text(piece) is called for each piece of text as it arrives (one piece when not streaming).
    timeout_s bounds the wait for each response here; request_timeout_s (gRPC) is the request's own
    timeout on the server (Triton's `timeout`): past it the request is refused in any queue and its
    generation stops. Raises RemoteError with the server's message when the request is refused.
    """
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be grpc or http, got {protocol!r}")
    if request_timeout_s is not None and protocol != "grpc":
        raise ValueError("request_timeout_s is sent over gRPC only")
    from runtime.generate import SamplingParams

    params = (params or SamplingParams()).validate()
    req = Request(images, question, messages, max_tiles)
    url = _split_url(url)
    model = model or find_model(url, protocol)
    try:
        if protocol == "grpc":
            return _ask_grpc(url, req, params, stream, on_text, model, timeout_s, request_timeout_s)
        return _ask_http(url, req, params, stream, on_text, model, timeout_s)
    except RemoteError:
        raise
    except Exception as e:  # noqa: BLE001 (transport failures: say where and what)
        raise RemoteError(f"request to {url} over {protocol} failed: {e}") from None


def model_card(url: str, model: str, protocol: str = "grpc") -> dict:
    """random_parts / real_parts of the served model (from its ensemble config), for printing."""
    url = _split_url(url)
    try:
        if protocol == "grpc":
            import tritonclient.grpc as grpcclient

            with grpcclient.InferenceServerClient(url) as c:
                params = c.get_model_config(model).config.parameters
                card = params["model_card"].string_value if "model_card" in params else ""
        else:
            cfg = _http_json(url, "GET", f"/v2/models/{model}/config", None)
            card = cfg.get("parameters", {}).get("model_card", {}).get("string_value", "")
        return json.loads(card) if card else {}
    except Exception:  # noqa: BLE001 (the card is only for printing)
        return {}
