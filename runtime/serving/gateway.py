"""The front of `facert serve`: what clients reach instead of tritonserver itself.

Triton 2.51 cannot be opened to untrusted clients as it stands (all measured on the server facert
runs; see model_repository/README.md):
- every model is reachable by name, the internal steps too, and there is no way to hide one;
- its own request checks (wrong dtype, shape, input name, batch size) leave memory behind in
  tritonserver for every request they refuse (20-45 KB each, never given back);
- a gzip body sent to a non-decoupled model's HTTP /infer is inflated before anything is checked,
  and kept whenever the request then fails (100 MB for 102 KB sent);
- it takes requests up to 2 GB, has no size bound of its own, and lets any client load and unload
  models, register shared memory, and change trace and log settings;
- its gRPC frontend crashes (SIGSEGV) on some cancellation races.

So `facert serve` runs tritonserver on loopback ports that answer only requests carrying a key drawn
at every start (Triton's restricted-API headers, all nine categories), and this gateway on the
public ports. It forwards, with the key:
- gRPC: ModelStreamInfer and ModelInfer for the public models (the ensembles) only; ServerLive,
  ServerReady, ServerMetadata; ModelReady, ModelMetadata and ModelConfig of the public models; the
  repository index, listing the public models only. Everything else is refused (PERMISSION_DENIED).
- HTTP: /v2/health/{live,ready}, /v2, and per public model its metadata, ready, config, generate and
  generate_stream (and /infer, which Triton refuses for the decoupled ensembles). Everything else:
  403. Request bodies larger than --max-request-mb are refused (413), compressed ones too (415).
- with --openai-port, the OpenAI-compatible chat endpoint (runtime/serving/openai_frontend.py, on
  uvicorn in this process's event loop): each chat request becomes one ensemble request, forwarded
  as a gRPC stream's (ClientStream.send_one).
Every inference request is checked against its model's config before it is forwarded: input names,
data types, shapes and batch size, the byte size of every tensor, request parameters, no shared
memory; a generate body must be a JSON object whose keys are the model's inputs, each of the JSON
type its data type takes. What fails is answered here, with a message naming the input, and never
reaches tritonserver.

Cancellation. The gateway never cancels a request inside tritonserver. It gives every request it
forwards a cancel key (request parameter `facert_cancel_key`, runtime/serving/cancel.py); when a
client cancels its gRPC stream, disconnects, or closes an HTTP connection mid-answer, the gateway
marks the keys of its requests (the llm step then stops within a token, preprocessing refuses the
request if it has not started) and reads their remaining responses itself until each has ended,
then closes its stream to tritonserver normally.

Run by TritonServer (runtime/serving/server.py) as `python -m runtime.serving.gateway`; the key
comes in the environment (FACERT_GATEWAY_KEY), never on the command line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import re
import signal
import struct
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

# Triton's restricted-API categories; tritonserver runs with all of them behind the key
RESTRICTED_CATEGORIES = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
                         "statistics", "trace", "logging")
KEY_HEADER = "facert-key"  # HTTP header; gRPC metadata: triton-grpc-protocol-facert-key
GRPC_KEY_METADATA = "triton-grpc-protocol-" + KEY_HEADER
KEY_ENV = "FACERT_GATEWAY_KEY"
DEFAULT_MAX_REQUEST_MB = 64
# request parameters a client may send (Triton's own); everything else is refused by name
CLIENT_PARAMETERS = ("priority", "timeout", "sequence_id", "sequence_start", "sequence_end",
                     "triton_enable_empty_final_response")
ELEMENT_BYTES = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2, "UINT32": 4,
                 "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
CONTENTS_FIELD = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
                  "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
                  "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
                  "FP64": "fp64_contents", "BYTES": "bytes_contents"}
INT_RANGES = {"INT8": 2**7, "INT16": 2**15, "INT32": 2**31, "INT64": 2**63}
UINT_RANGES = {"UINT8": 2**8, "UINT16": 2**16, "UINT32": 2**32, "UINT64": 2**64}
MAX_ID_CHARS = 256


# ----------------------------------------------------------------------------- the public models

@dataclass
class PublicModel:
    """What the gateway checks requests against: one ensemble's config."""

    name: str
    versions: tuple[str, ...]
    max_batch_size: int
    decoupled: bool
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # name -> (wire data type, dims without the batch axis)
    outputs: tuple[str, ...]
    steps: tuple[str, ...] = ()  # the models it runs
    capacity: int = 0  # requests in flight at once: its first step's max_queue_size + max_batch_size (0: no bound)

    @classmethod
    def from_config(cls, cfg, versions, decoupled: bool) -> "PublicModel":
        from tritonclient.grpc import model_config_pb2

        def wire(t) -> str:
            name = model_config_pb2.DataType.Name(t)[len("TYPE_"):]
            return "BYTES" if name == "STRING" else name

        return cls(cfg.name, tuple(versions), cfg.max_batch_size, decoupled,
                   {t.name: (wire(t.data_type), tuple(t.dims)) for t in cfg.input},
                   tuple(t.name for t in cfg.output), tuple(s.model_name for s in cfg.ensemble_scheduling.step))

    def input_list(self) -> str:
        return ", ".join(self.inputs)


def load_public_models(repository: str | Path) -> dict[str, PublicModel]:
    """The repository's ensembles, from their config.pbtxt (facert repo wrote and checked them)."""
    from runtime.serving.repo import validate_repository

    repository = Path(repository)
    models = {}
    configs = validate_repository(repository)
    for name, cfg in configs.items():
        if cfg.platform == "ensemble":
            versions = sorted(p.name for p in (repository / name).iterdir() if p.is_dir() and p.name.isdigit())
            # an ensemble with a decoupled step is decoupled itself (Triton answers it by streaming only)
            decoupled = any(configs[s.model_name].model_transaction_policy.decoupled
                            for s in cfg.ensemble_scheduling.step)
            model = PublicModel.from_config(cfg, versions, decoupled)
            first = configs[cfg.ensemble_scheduling.step[0].model_name]
            queue = first.dynamic_batching.default_queue_policy.max_queue_size
            model.capacity = queue + max(first.max_batch_size, 1) if queue else 0
            models[name] = model
    return models


def unknown_model(name: str, version: str = "") -> str:
    # Triton's own words, so that clients read it as they read Triton's
    return f"Request for unknown model: '{name}'{f' version {version}' if version else ''} is not found"


def _bytes_elements(data: bytes) -> int | None:
    """Elements in a BYTES tensor's raw data (each a 4-byte little-endian length, then the bytes);
    None when the lengths do not add up to the data."""
    count, at = 0, 0
    while at < len(data):
        if at + 4 > len(data):
            return None
        (n,) = struct.unpack_from("<I", data, at)
        at += 4 + n
        count += 1
    return count if at == len(data) else None


def _shape_error(model: PublicModel, name: str, shape: list[int]) -> str | None:
    dims = model.inputs[name][1]
    expected = ([-1] if model.max_batch_size else []) + list(dims)
    body = shape[1:] if model.max_batch_size else shape
    ok = len(shape) == len(expected) and all(d >= 0 for d in shape) and all(
        want in (-1, got) for want, got in zip(dims, body))
    if not ok:
        return (f"unexpected shape for input '{name}' for model '{model.name}'. Expected "
                f"[{','.join(map(str, expected))}], got [{','.join(map(str, shape))}]")
    return None


def check_infer_request(req, models: dict[str, PublicModel]) -> str | None:
    """Why a gRPC ModelInferRequest cannot be forwarded (None: it can), in the words Triton would use
    where it has them, naming the input."""
    model = models.get(req.model_name)
    if model is None:
        return unknown_model(req.model_name)
    if req.model_version and req.model_version not in model.versions:
        return unknown_model(req.model_name, req.model_version)
    if len(req.id) > MAX_ID_CHARS:
        return f"the request id has {len(req.id)} characters, over the bound of {MAX_ID_CHARS}"
    for key in req.parameters:
        if key not in CLIENT_PARAMETERS:
            return f"unknown request parameter '{key}' (this server takes {', '.join(CLIENT_PARAMETERS)})"
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        return f"{len(raw)} raw input contents for {len(req.inputs)} inputs"
    seen: set[str] = set()
    batch = None
    for i, t in enumerate(req.inputs):
        if t.name not in model.inputs:
            return (f"unexpected inference input '{t.name}' for model '{model.name}' (its inputs are "
                    f"{model.input_list()})")
        if t.name in seen:
            return f"input '{t.name}' is given twice"
        seen.add(t.name)
        if t.parameters:
            return f"input '{t.name}' carries parameters ({', '.join(t.parameters)}): shared memory is not " \
                   f"available on this server, send the data in the request"
        wanted = model.inputs[t.name][0]
        if t.datatype != wanted:
            return (f"inference input '{t.name}' data-type is '{t.datatype}', but model '{model.name}' expects "
                    f"'{wanted}'")
        shape = list(t.shape)
        error = _shape_error(model, t.name, shape)
        if error:
            return error
        if model.max_batch_size:
            if not 1 <= shape[0] <= model.max_batch_size:
                return (f"inference request batch-size must be <= {model.max_batch_size} for '{model.name}', "
                        f"got {shape[0]} (input '{t.name}')")
            if batch is not None and shape[0] != batch:
                return f"input '{t.name}' has batch size {shape[0]}, the other inputs {batch}"
            batch = shape[0]
        elements = 1
        for d in shape:
            elements *= d
        error = _data_error(t, raw[i] if raw else None, elements)
        if error:
            return error
    for out in req.outputs:
        if out.name not in model.outputs:
            return f"unexpected inference output '{out.name}' for model '{model.name}'"
        if out.parameters:
            return f"output '{out.name}' carries parameters: shared memory is not available on this server"
    return None


def _data_error(t, raw: bytes | None, elements: int) -> str | None:
    if raw is not None:
        if t.HasField("contents"):
            return f"input '{t.name}' has both raw and typed contents"
        if t.datatype == "BYTES":
            count = _bytes_elements(raw)
            if count is None:
                return f"input '{t.name}': its {len(raw)} bytes are not a sequence of length-prefixed strings"
            if count != elements:
                return f"input '{t.name}' holds {count} strings, its shape {list(t.shape)} needs {elements}"
        elif len(raw) != elements * ELEMENT_BYTES[t.datatype]:
            return (f"input '{t.name}' has {len(raw)} bytes of data, its shape {list(t.shape)} of {t.datatype} "
                    f"needs {elements * ELEMENT_BYTES[t.datatype]}")
        return None
    field = CONTENTS_FIELD.get(t.datatype)
    if field is None:
        return f"input '{t.name}' of {t.datatype} must come as raw contents"
    count = len(getattr(t.contents, field))
    if count != elements:
        return f"input '{t.name}' holds {count} values, its shape {list(t.shape)} needs {elements}"
    return None


def _json_type_error(model: PublicModel, name: str, value) -> str | None:
    """Why a generate body's value cannot be input `name` (a value, or a list of values)."""
    dtype, dims = model.inputs[name]
    fixed = all(d != -1 for d in dims)
    size = 1
    for d in dims:
        size *= d if d != -1 else 1
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and (not value or (fixed and len(value) != size)):
        return f"input '{name}' takes {'one value' if size == 1 else f'{size} values'}, got a list of {len(value)}"
    for v in values:
        if dtype == "BYTES":
            ok, kind = isinstance(v, str), "a string"
        elif dtype == "BOOL":
            ok, kind = isinstance(v, bool), "true or false"
        elif dtype in INT_RANGES or dtype in UINT_RANGES:
            lo, hi = (-INT_RANGES[dtype], INT_RANGES[dtype]) if dtype in INT_RANGES else (0, UINT_RANGES[dtype])
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi
            kind = f"an integer in [{lo}, {hi - 1}]"
        else:
            ok, kind = isinstance(v, (int, float)) and not isinstance(v, bool), "a number"
        if not ok:
            return f"input '{name}' ({dtype}) must be {kind}, got {json.dumps(v)[:60]}"
    return None


def check_generate_body(body, model: PublicModel) -> str | None:
    """Why an HTTP generate / generate_stream body cannot be forwarded (None: it can)."""
    if not isinstance(body, dict):
        return f"the request body must be a JSON object of the model's inputs ({model.input_list()})"
    for name, value in body.items():
        if name not in model.inputs:
            return f"unknown input '{name}' for model '{model.name}' (its inputs are {model.input_list()})"
        error = _json_type_error(model, name, value)
        if error:
            return error
    return None


# ---------------------------------------------------------------------------------- the gateway

class Gateway:
    """The gRPC and HTTP servers and what they share: the public models, the key, the cancel marks
    and the requests still being read after their client left."""

    def __init__(self, repository: str | Path, upstream_grpc: str, upstream_http: str, key: str,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_MB * 2**20, drain_timeout_s: float = 600.0,
                 log=lambda msg: print(f"[facert gateway] {msg}", file=sys.stderr, flush=True)):
        from runtime.serving.cancel import CancelFlags

        self.models = load_public_models(repository)
        # their steps: only their configs are read from outside (without parameters), by tools that
        # look into an ensemble (perf_analyzer); nothing else of theirs is reachable
        self.steps = {step for m in self.models.values() for step in m.steps} - set(self.models)
        self.upstream_grpc, self.upstream_http = upstream_grpc, upstream_http
        self.key = key
        self.upstream_metadata = ((GRPC_KEY_METADATA, key),)  # what tritonserver's gRPC port asks of a caller
        self.max_request_bytes = max_request_bytes
        self.drain_timeout_s = drain_timeout_s
        self.log = log
        self.cancel_flags = CancelFlags()
        self.background: set[asyncio.Task] = set()  # requests read to their end after the client left
        self._ids = itertools.count()
        self.counts = {"refused": 0, "overloaded": 0, "forwarded": 0, "drained": 0}
        self.in_flight = collections.Counter()  # model -> requests forwarded and not ended (see admit)
        self.openai = None  # the OpenAI-compatible endpoint, when it is served (see start)

    def admit(self, model: str) -> str | None:
        """Take a place for one more request of `model`, or say why there is none: a model holds at most
        its capacity in flight (its first step's queue and batch), requests of clients that left
        included until they have ended. One more is refused here, at once, as Triton's full queue would
        refuse it, but before tritonserver allocates for it (2.51 keeps memory for every request its
        full queue refuses), and a client cannot pile up requests by cancelling and sending again."""
        capacity = self.models[model].capacity
        if capacity and self.in_flight[model] >= capacity:
            self.counts["overloaded"] += 1
            return (f"Exceeds maximum queue size: model '{model}' has {capacity} requests in flight, its bound "
                    f"(its first step's max_queue_size + max_batch_size)")
        self.in_flight[model] += 1
        return None

    def release(self, model: str) -> None:
        self.in_flight[model] -= 1

    def new_request_id(self) -> str:
        return f"facert-{next(self._ids)}"

    def keep(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def send_one(self, request) -> "ClientStream":
        """A request of the gateway's own (the OpenAI endpoint's), forwarded as a client's stream that
        sends it and closes its side (ClientStream.send_one)."""
        stream = ClientStream(self)
        stream.send_one(request)
        return stream

    async def start(self, host: str, grpc_port: int, http_port: int, openai_port: int | None = None,
                    openai_max_body_mb: float | None = None) -> None:
        """Listen on the public ports (and, with openai_port, serve the OpenAI-compatible endpoint there:
        runtime/serving/openai_frontend.py); OSError if one is taken."""
        import aiohttp
        import grpc
        from aiohttp import web
        from tritonclient.grpc import service_pb2_grpc

        # compressed messages are refused before anything is inflated: only the identity "algorithm" is on
        options = [("grpc.max_receive_message_length", self.max_request_bytes), ("grpc.max_send_message_length", -1),
                   ("grpc.compression_enabled_algorithms_bitset", 1)]
        self.channel = grpc.aio.insecure_channel(
            self.upstream_grpc, options=[("grpc.max_send_message_length", self.max_request_bytes),
                                         ("grpc.max_receive_message_length", -1)])
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.grpc_server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(GrpcFront(self), self.grpc_server)
        address = f"[{host}]:{grpc_port}" if ":" in host else f"{host}:{grpc_port}"
        bound = self.grpc_server.add_insecure_port(address)
        if not bound:
            raise OSError(f"gRPC port {grpc_port} on {host} is taken")
        await self.grpc_server.start()
        self.session = aiohttp.ClientSession(
            f"http://{self.upstream_http}", headers={KEY_HEADER: self.key},
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10), auto_decompress=False)
        app = web.Application(client_max_size=self.max_request_bytes)
        app.router.add_route("*", "/{path:.*}", HttpFront(self).handle)
        # handler_cancellation: a client that goes away cancels its handler (its request is then drained);
        # auto_decompress off: a compressed body is refused, never inflated
        self.runner = web.AppRunner(app, handler_cancellation=True, auto_decompress=False, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, http_port).start()
        if openai_port is not None:
            from runtime.serving.openai_frontend import DEFAULT_MAX_BODY_MB, OpenAIEndpoint

            self.openai = OpenAIEndpoint(self, host, openai_port, openai_max_body_mb or DEFAULT_MAX_BODY_MB)
            try:
                await self.openai.start()
            except OSError as e:
                raise OSError(f"OpenAI port {openai_port} on {host} is taken ({e.strerror})") from None

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.grpc_server.stop(grace_s)
        await self.runner.cleanup()
        if self.openai is not None:
            await self.openai.stop()
        if self.background:
            await asyncio.wait(self.background, timeout=grace_s)
        await self.session.close()
        await self.channel.close()


def _error_response(model: str, request_id: str, message: str):
    from tritonclient.grpc import service_pb2

    r = service_pb2.ModelStreamInferResponse(error_message=message)
    r.infer_response.model_name = model
    r.infer_response.id = request_id
    r.infer_response.parameters["triton_final_response"].bool_param = True
    return r


@dataclass
class _Pending:
    client_id: str
    key: str
    model: str
    empty_final: bool  # the client asked for the empty final response


class ClientStream:
    """One client's gRPC stream and the stream the gateway keeps to tritonserver for it."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.out: asyncio.Queue = asyncio.Queue()  # responses for the client; None: the stream is done
        self.up: asyncio.Queue | None = None  # requests for tritonserver; None closes the stream there
        self.inflight: dict[str, _Pending] = {}
        self.client_done = False  # the client closed its side
        self.gone = False  # the client cancelled or went away: responses are read and dropped
        self.reader: asyncio.Task | None = None
        self.deadline = None  # bounds the reading of a stream whose client left

    async def read_client(self, request_iterator) -> None:
        try:
            async for req in request_iterator:
                self.take_request(req)
        except Exception:  # noqa: BLE001 (the client's side broke: it cancelled or went away)
            self.client_done = True
            self.client_left()
            return
        self.client_done = True  # it closed its side: its requests are answered, then the stream ends
        self.maybe_done()

    def take_request(self, req) -> None:
        """One request of the client: checked, admitted, and forwarded, or answered with why it is not."""
        error = check_infer_request(req, self.gw.models)
        if error:
            self.gw.counts["refused"] += 1
        error = error or self.gw.admit(req.model_name)
        if error:
            self.out.put_nowait(_error_response(req.model_name, req.id, error))
        else:
            self.forward(req)

    def send_one(self, req) -> None:
        """A request of the gateway's own (the OpenAI endpoint's), as a client's stream that sends it and
        closes its side: its responses come in `out`, then None; `client_left()` cancels it."""
        self.take_request(req)
        self.client_done = True
        self.maybe_done()

    def forward(self, req) -> None:
        from runtime.serving.cancel import CANCEL_KEY_PARAMETER

        iid, key = self.gw.new_request_id(), uuid.uuid4().hex
        empty = req.parameters["triton_enable_empty_final_response"].bool_param \
            if "triton_enable_empty_final_response" in req.parameters else False
        self.inflight[iid] = _Pending(req.id, key, req.model_name, empty)
        req.id = iid
        req.parameters[CANCEL_KEY_PARAMETER].string_param = key
        req.parameters["triton_enable_empty_final_response"].bool_param = True  # to know when it ended
        if self.up is None:
            self.up = asyncio.Queue()
            self.reader = self.gw.keep(self.read_upstream(self.up))
        self.gw.counts["forwarded"] += 1
        self.up.put_nowait(req)

    async def read_upstream(self, up: asyncio.Queue) -> None:
        import grpc

        async def requests():
            while (item := await up.get()) is not None:
                yield item

        call = self.gw.stub.ModelStreamInfer(requests(), metadata=self.gw.upstream_metadata)
        try:
            async with asyncio.timeout(None) as deadline:
                self.deadline = deadline
                async for resp in call:
                    self.take(resp)
        except grpc.aio.AioRpcError as e:
            # tritonserver went away (the supervisor restarts it): every request still open fails
            message = f"{e.code()}: {e.details()} (the model server stopped while serving this request)"
            for iid in list(self.inflight):
                pending = self.ended(iid)
                if not self.gone:
                    self.out.put_nowait(_error_response(pending.model, pending.client_id, message))
        except TimeoutError:
            self.gw.log(f"{len(self.inflight)} requests of a client that left did not end within "
                        f"{self.gw.drain_timeout_s:.0f} s; their stream to tritonserver is cancelled")
            call.cancel()
            for iid in list(self.inflight):
                self.ended(iid)
        finally:
            if self.up is up:
                self.up = None
            self.maybe_done()

    def take(self, resp) -> None:
        """One response from tritonserver: back to its client (with the client's id), unless the client left."""
        iid = resp.infer_response.id
        pending = self.inflight.get(iid)
        if pending is None:
            return
        params = resp.infer_response.parameters
        final = bool(resp.error_message) or ("triton_final_response" in params
                                             and params["triton_final_response"].bool_param)
        if final:
            self.ended(iid)
            if self.gone:
                self.gw.counts["drained"] += 1
                self.gw.cancel_flags.clear(pending.key)  # it ended: its mark has done its work
        if self.gone:
            if not self.inflight and self.up is not None:
                self.up.put_nowait(None)  # close the stream to tritonserver normally
            return
        resp.infer_response.id = pending.client_id
        if resp.error_message:
            resp.error_message = resp.error_message.replace(
                f"[request id: {iid}]", f"[request id: {pending.client_id or '<id_unknown>'}]")
        empty = not resp.error_message and not resp.infer_response.outputs
        if not (final and empty and not pending.empty_final):
            self.out.put_nowait(resp)
        self.maybe_done()

    def ended(self, iid: str) -> _Pending:
        """Request `iid` has had its last response: its place is free again."""
        pending = self.inflight.pop(iid)
        self.gw.release(pending.model)
        return pending

    def maybe_done(self) -> None:
        if self.client_done and not self.inflight:
            if self.up is not None:
                self.up.put_nowait(None)
            self.out.put_nowait(None)

    def client_left(self) -> None:
        """The client cancelled or went away: mark its requests' keys and read them to their end."""
        if self.gone:
            return
        self.gone = True
        for pending in self.inflight.values():
            self.gw.cancel_flags.mark(pending.key)
        if self.inflight and self.deadline is not None:
            self.deadline.reschedule(asyncio.get_running_loop().time() + self.gw.drain_timeout_s)
        elif self.up is not None:
            self.up.put_nowait(None)


class GrpcFront:
    """The gRPC service (inference.GRPCInferenceService) clients call."""

    def __init__(self, gw: Gateway):
        self.gw = gw
        self.md = gw.upstream_metadata

    def __getattr__(self, method: str):
        # every method not defined below: refused
        async def refuse(request, context):
            import grpc

            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"{method} is not available on this server (it answers inference, health and "
                                f"metadata requests for {', '.join(self.gw.models)} only)")
        return refuse

    async def _forward(self, method: str, request, context):
        import grpc

        try:
            return await getattr(self.gw.stub, method)(request, metadata=self.md, timeout=30)
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details())

    async def _public(self, name: str, version: str, context) -> None:
        import grpc

        model = self.gw.models.get(name)
        if model is None or (version and version not in model.versions):
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_model(name, version))

    async def ServerLive(self, request, context):
        return await self._forward("ServerLive", request, context)

    async def ServerReady(self, request, context):
        return await self._forward("ServerReady", request, context)

    async def ServerMetadata(self, request, context):
        return await self._forward("ServerMetadata", request, context)

    async def ModelReady(self, request, context):
        await self._public(request.name, request.version, context)
        return await self._forward("ModelReady", request, context)

    async def ModelMetadata(self, request, context):
        await self._public(request.name, request.version, context)
        return await self._forward("ModelMetadata", request, context)

    async def ModelConfig(self, request, context):
        if request.name in self.gw.steps:  # a step's, without its parameters (see Gateway.steps)
            response = await self._forward("ModelConfig", request, context)
            response.config.parameters.clear()
            return response
        await self._public(request.name, request.version, context)
        return await self._forward("ModelConfig", request, context)

    async def ModelStatistics(self, request, context):
        """Counts and times of the ensembles and their steps (perf_analyzer reads them)."""
        import grpc

        if request.name and request.name not in self.gw.models and request.name not in self.gw.steps:
            await context.abort(grpc.StatusCode.NOT_FOUND, unknown_model(request.name, request.version))
        return await self._forward("ModelStatistics", request, context)

    async def RepositoryIndex(self, request, context):
        index = await self._forward("RepositoryIndex", request, context)
        kept = [m for m in index.models if m.name in self.gw.models]
        del index.models[:]
        index.models.extend(kept)
        return index

    async def ModelInfer(self, request, context):
        import grpc

        error = check_infer_request(request, self.gw.models)
        if error is None and self.gw.models[request.model_name].decoupled:
            error = (f"model '{request.model_name}' streams its answers: call it with ModelStreamInfer (gRPC "
                     f"streaming) or HTTP generate / generate_stream")
        if error:
            self.gw.counts["refused"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        overloaded = self.gw.admit(request.model_name)
        if overloaded:
            await context.abort(grpc.StatusCode.UNAVAILABLE, overloaded)
        try:
            return await self._forward("ModelInfer", request, context)
        finally:
            self.gw.release(request.model_name)

    async def ModelStreamInfer(self, request_iterator, context):
        stream = ClientStream(self.gw)
        # a client that cancels or goes away ends the call at once, whatever this handler is waiting on
        context.add_done_callback(lambda ctx: stream.client_left() if ctx.cancelled() else None)
        reader = asyncio.ensure_future(stream.read_client(request_iterator))
        try:
            while (resp := await stream.out.get()) is not None:
                yield resp
        finally:
            reader.cancel()
            if stream.inflight or not stream.client_done:
                stream.client_left()


class HttpFront:
    """The HTTP API (KServe v2 + Triton's generate extension) clients call."""

    ROUTE = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?"
                       r"(?:/(?P<action>ready|config|stats|infer|generate|generate_stream))?")

    def __init__(self, gw: Gateway):
        self.gw = gw

    @staticmethod
    def error(status: int, message: str):
        from aiohttp import web

        return web.json_response({"error": message}, status=status)

    async def forward(self, request, body: bytes | None = None):
        from aiohttp import web

        async with self.gw.session.request(request.method, request.path, data=body) as r:
            data = await r.read()
            return web.Response(status=r.status, body=data, content_type=r.content_type)

    async def handle(self, request):
        import aiohttp

        try:
            return await self._handle(request)
        except aiohttp.ClientError as e:
            return self.error(503, f"StatusCode.UNAVAILABLE: the model server is not reachable ({e}); it is being "
                                   f"restarted")

    async def _handle(self, request):
        path = request.path.rstrip("/")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            self.gw.counts["refused"] += 1
            return self.error(415, f"compressed request bodies (Content-Encoding: {encoding}) are not accepted")
        if request.content_length is not None and request.content_length > self.gw.max_request_bytes:
            self.gw.counts["refused"] += 1
            return self.error(413, f"the request body is {request.content_length} bytes, over the bound of "
                                   f"{self.gw.max_request_bytes}")
        if path in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/stats") and request.method == "GET":
            return await self.forward(request)
        if path == "/v2/repository/index" and request.method == "POST":
            async with self.gw.session.post(path, json={}) as r:
                index = await r.json(content_type=None)
            if r.status != 200:
                return self.error(r.status, index.get("error", "") if isinstance(index, dict) else str(index))
            from aiohttp import web

            return web.json_response([m for m in index if m.get("name") in self.gw.models])
        m = self.ROUTE.fullmatch(path)
        if m is not None and m["action"] == "stats" and request.method == "GET" and (
                m["model"] in self.gw.models or m["model"] in self.gw.steps):
            return await self.forward(request)  # counts and times (perf_analyzer reads them)
        if m is not None and m["model"] in self.gw.steps and m["action"] == "config" and request.method == "GET":
            from aiohttp import web

            async with self.gw.session.get(path) as r:  # a step's, without its parameters (see Gateway.steps)
                config = await r.json(content_type=None)
            if isinstance(config, dict):
                config.pop("parameters", None)
            return web.json_response(config, status=r.status)
        if m is None:
            return self.error(403, f"{request.method} {path} is not available on this server (it answers inference, "
                                   f"health and metadata requests for {', '.join(self.gw.models)} only)")
        name, version, action = m["model"], m["version"] or "", m["action"] or ""
        model = self.gw.models.get(name)
        if model is None or (version and version not in model.versions):
            return self.error(404, unknown_model(name, version))
        if action in ("", "ready", "config"):
            if request.method != "GET":
                return self.error(405, "Method Not Allowed")
            return await self.forward(request)
        if request.method != "POST":
            return self.error(405, "Method Not Allowed")
        from aiohttp import web

        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.gw.counts["refused"] += 1
            return self.error(413, f"the request body is over the bound of {self.gw.max_request_bytes} bytes")
        if action == "infer":
            if model.decoupled:
                self.gw.counts["refused"] += 1
                return self.error(400, f"model '{name}' streams its answers: use POST /v2/models/{name}/generate "
                                       f"or /generate_stream (or gRPC streaming)")
            overloaded = self.gw.admit(name)
            if overloaded:
                return self.error(503, overloaded)
            try:
                return await self.forward(request, raw)
            finally:
                self.gw.release(name)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            self.gw.counts["refused"] += 1
            return self.error(400, f"the request body is not JSON ({e.__class__.__name__} at character "
                                   f"{getattr(e, 'pos', 0)})")
        error = check_generate_body(body, model)
        if error:
            self.gw.counts["refused"] += 1
            return self.error(400, error)
        return await self.generate(request, path, body, stream=action == "generate_stream")

    async def generate(self, request, path: str, body: dict, stream: bool):
        """Forward a generate body with the request's cancel key; if the client goes away before the
        answer ends, mark the key and read the rest of the answer here."""
        from aiohttp import web

        from runtime.serving.cancel import CANCEL_KEY_PARAMETER

        name = path.split("/")[3]
        overloaded = self.gw.admit(name)
        if overloaded:
            return self.error(503, overloaded)
        key = uuid.uuid4().hex
        self.gw.counts["forwarded"] += 1
        chunks: asyncio.Queue = asyncio.Queue()  # (status, content type) first, then bytes; None at the end
        left = asyncio.Event()

        async def upstream():
            try:
                async with self.gw.session.post(path, json={**body, CANCEL_KEY_PARAMETER: key}) as r:
                    chunks.put_nowait((r.status, r.content_type))
                    async with asyncio.timeout(None) as deadline:
                        async for chunk in r.content.iter_any():
                            if not left.is_set():
                                chunks.put_nowait(chunk)
                            elif deadline.when() is None:  # the client left: read the rest, for a while at most
                                deadline.reschedule(asyncio.get_running_loop().time() + self.gw.drain_timeout_s)
            finally:
                self.gw.release(name)
                chunks.put_nowait(None)
                if left.is_set():
                    self.gw.counts["drained"] += 1
                    self.gw.cancel_flags.clear(key)

        task = self.gw.keep(upstream())
        response = None
        try:
            head = await chunks.get()
            if head is None:
                await task  # raises what failed upstream
                return self.error(502, "the model server closed the answer before it began")
            status, content_type = head
            if not stream or status != 200:
                data = b""
                while (chunk := await chunks.get()) is not None:
                    data += chunk
                return web.Response(status=status, body=data, content_type=content_type)
            response = web.StreamResponse(status=status, headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            while (chunk := await chunks.get()) is not None:
                await response.write(chunk)
            await response.write_eof()
            return response
        except (asyncio.CancelledError, ConnectionError):
            left.set()
            self.gw.cancel_flags.mark(key)
            raise


# ------------------------------------------------------------------------------------- the process

async def serve(args) -> int:
    key = os.environ.get(KEY_ENV, "")
    if not key:
        print(f"facert gateway: error: {KEY_ENV} is not set (TritonServer sets it)", file=sys.stderr)
        return 2
    gw = Gateway(args.model_repository, args.upstream_grpc, args.upstream_http, key,
                 max_request_bytes=int(args.max_request_mb * 2**20))
    try:
        await gw.start(args.host, args.grpc_port, args.http_port, args.openai_port, args.openai_max_body_mb)
    except OSError as e:
        print(f"facert gateway: error: {e}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    openai = f", OpenAI {args.host}:{args.openai_port}" if args.openai_port is not None else ""
    print(f"facert gateway: listening on gRPC {args.host}:{args.grpc_port}, HTTP {args.host}:{args.http_port}"
          f"{openai} for {', '.join(gw.models)}", flush=True)
    t0 = time.monotonic()
    parent = os.getppid()
    while not stop.is_set():  # ends with the process that runs it, should that one die without stopping it
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except asyncio.TimeoutError:
            if os.getppid() != parent:
                gw.log("the process that started the gateway is gone; stopping")
                break
    await gw.stop()
    gw.log(f"stopped after {time.monotonic() - t0:.0f} s: {gw.counts}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-repository", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--grpc-port", type=int, required=True)
    ap.add_argument("--http-port", type=int, required=True)
    ap.add_argument("--upstream-grpc", required=True, help="tritonserver's gRPC HOST:PORT (loopback)")
    ap.add_argument("--upstream-http", required=True, help="tritonserver's HTTP HOST:PORT (loopback)")
    ap.add_argument("--max-request-mb", type=float, default=DEFAULT_MAX_REQUEST_MB)
    ap.add_argument("--openai-port", type=int, help="also serve the OpenAI-compatible endpoint on this port")
    ap.add_argument("--openai-max-body-mb", type=float, help="its largest request body, in MiB")
    return asyncio.run(serve(ap.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
