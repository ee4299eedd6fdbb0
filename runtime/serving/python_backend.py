"""Glue between Triton's python backend and facert's runtime, shared by every step's `1/model.py`.

Imported only inside a python-backend stub (it needs `triton_python_backend_utils`). Each step's
model.py subclasses one of:

- `ImageRowsStep`: each request holds its images (or tiles) as [1, N, ...]; the dynamic batcher
  hands it several requests (ragged: each its own N); every row of every request goes through
  `compute()` as one batch, and the results are handed back per request. With an IMAGE_KEY input
  (preprocessing's hash of the request's image bytes) and the parameter `encoder_cache_bytes` > 0,
  a request whose key was computed before takes its outputs from the step's encoder cache (a
  bytes-bounded LRU) and only the others are computed; counted in
  `facert_encoder_cache_hits_total` / `facert_encoder_cache_misses_total` by model.
- `PerRequestStep`: `compute_one()` runs per request, so a bad request fails alone.

A step's model reaches the checkpoint or engines named in its config.pbtxt parameters
(`checkpoint` or `engines` + `backend`, and `device`) as a `FacePipeline` (`self.pipe`): the
components, tokenizer and limits the in-process runtime uses. From a checkpoint, a step loads only
the components it runs (its class's `parts`, e.g. ("vision",)), so each model process holds only its
own weights; an engines folder opens whole (its backends open every session up front). Compute time goes to the output
named by the `timing_output` parameter when the config declares one.
"""

from __future__ import annotations

import json
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.serving.cancel import CANCEL_KEY_PARAMETER, CancelFlags

_PIPELINES: dict[tuple, object] = {}


def _stub_mmap_threshold() -> None:
    """Undo, in this stub, the fixed mmap threshold facert gives tritonserver (runtime/serving/server.py):
    glibc's largest threshold, so numpy arrays come from the heap as they do by default."""
    import ctypes
    import os

    from runtime.serving.server import GLIBC_MALLOC_MARK

    m_mmap_threshold, default_mmap_threshold_max = -3, 32 * 2**20  # glibc's malloc.h, 64-bit
    if os.environ.get(GLIBC_MALLOC_MARK) == "1":
        try:
            ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, default_mmap_threshold_max)
        except OSError:  # not glibc
            pass


_stub_mmap_threshold()
INTERNAL_ERROR = "internal error"  # how a failure that is not the request's fault begins


def to_numpy(x) -> np.ndarray:
    """torch or numpy -> numpy; floating point travels as FP32 between steps."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    return np.ascontiguousarray(x)


def open_pipeline(params: dict, device: str, parts: tuple[str, ...] | None = None):
    """The FacePipeline for this model's source (engines preferred when given); one per process.

    parts: the checkpoint components to load (runtime.checkpoint.PARTS); None loads them all."""
    key = (params.get("engines") or "", params.get("backend") or "", params.get("checkpoint") or "", device, parts)
    if key not in _PIPELINES:
        if params.get("engines"):
            from runtime.engines import open_pipeline as open_engines  # the engines backends (export issue)

            backend = params.get("backend") or "onnxruntime"
            # onnxruntime: every worker sleeps between ops here (in-process, the decode graph's spin). The
            # served steps share the cores with each other's processes, and spinning decode workers took them
            # from the image steps and prefills of new requests: in-flight at 1 request/s, TTFT p50 2.6-3.2 s
            # spinning against 1.3-1.6 s sleeping (benchmarks/results/2026-11-30-quant-spin/NOTES.md).
            # FACERT_ORT_SPIN=1 spins anyway.
            options = {"spin_decode": False} if backend == "onnxruntime" else {}
            _PIPELINES[key] = open_engines(params["engines"], backend=backend, device=device, **options)
        elif params.get("checkpoint"):
            from runtime.pipeline import FacePipeline

            _PIPELINES[key] = FacePipeline.from_checkpoint(params["checkpoint"], device=device, parts=parts)
        else:
            raise pb_utils.TritonModelException("config.pbtxt names neither an `engines` nor a `checkpoint` parameter")
    return _PIPELINES[key]


class RequestInfo:
    """What preprocessing needs, without loading any weights: the spec, the tokenizer, the prompt layout.

    Requests are checked and built exactly as the in-process FacePipeline builds them
    (runtime.pipeline.RequestBuilder: the same pixels, prompt ids and refusals).
    """

    def __init__(self, params: dict):
        from runtime.pipeline import RequestBuilder
        from runtime.serving.repo import describe_checkpoint, describe_engines
        from runtime.tokenizer import load_tokenizer

        source = params.get("engines") or params.get("checkpoint")
        if not source:
            raise pb_utils.TritonModelException("config.pbtxt names neither an `engines` nor a `checkpoint` parameter")
        info = describe_engines(source) if params.get("engines") else describe_checkpoint(source)
        self.spec = info["spec"]
        max_images = int(params.get("max_images") or 0) or None
        self.requests = RequestBuilder(self.spec, load_tokenizer(source), info["vocab_size"],
                                       info["num_image_tokens"], info["num_seg_tokens"], max_images=max_images)


def client_errors() -> tuple[type, ...]:
    """The exceptions whose message is for the client: facert's own request errors."""
    from runtime.errors import RequestError
    from runtime.preprocess import ImageError
    from runtime.prompt import PromptError

    return RequestError, ImageError, PromptError


def error_response(e: BaseException, step: str = "") -> "pb_utils.InferenceResponse":
    """The response for a failed request: a request error's own message (INVALID_ARG); for anything
    else (a fault here, or a library's exception text) a message without internals, the traceback
    going to the server's log."""
    if isinstance(e, client_errors()):
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG))
    pb_utils.Logger.log_error(f"{step or 'a step'} failed on a request:\n" + "".join(traceback.format_exception(e)))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(
        f"{INTERNAL_ERROR} in the {step or 'model'} step (the server's log has the details)"))


def request_cancel_key(request) -> str:
    """The cancel key the gateway gave the request; "" without one (runtime/serving/cancel.py)."""
    try:
        key = json.loads(request.parameters() or "{}").get(CANCEL_KEY_PARAMETER, "")
    except (ValueError, AttributeError):
        return ""
    return key if isinstance(key, str) and CancelFlags.is_key(key) else ""


def cancelled_response() -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError("request cancelled by the client", pb_utils.TritonError.CANCELLED))


def read_inputs(request, names) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is not None:
            out[name] = t.as_numpy()
    return out


def image_key(inputs: dict[str, np.ndarray]) -> str | None:
    """The request's IMAGE_KEY (preprocessing's content hash of its images), or None if not sent."""
    x = inputs.get("IMAGE_KEY")
    if x is None or not x.size:
        return None
    value = x.reshape(-1)[0]
    return (bytes(value) if not isinstance(value, str) else value.encode()).decode("ascii", "replace") or None


def make_response(outputs: dict[str, np.ndarray]) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])


def bytes_tensor(values) -> np.ndarray:
    """[B, 1] TYPE_STRING tensor from a list of str/bytes."""
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)


class Step:
    """What every step shares: its config, parameters, pipeline and timing output."""

    uses_pipeline = True  # False: the step needs no weights (postprocessing)
    parts: tuple[str, ...] | None = None  # the checkpoint components this step runs (None: all)
    # A request whose client left (its cancel key marked) is refused instead of run. Not after the llm:
    # while it generates, the llm's own check of the mark is what stops the request (see cancel.py).
    skips_cancelled = True

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        # AFTER_MS only orders the step inside the ensemble (see the face parser's config); never read
        self.input_names = [i["name"] for i in self.model_config.get("input", []) if i["name"] != "AFTER_MS"]
        self.output_names = [o["name"] for o in self.model_config.get("output", [])]
        self.timing_output = self.params.get("timing_output") or None
        kind = args.get("model_instance_kind", "CPU")
        device = self.params.get("device") or "cpu"
        if kind == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.device = device
        self.pipe = open_pipeline(self.params, device, self.parts) if self.wants_pipeline() else None
        self.cancel_flags = CancelFlags()
        self.setup()

    def client_left(self, request) -> bool:
        """The request's client cancelled or went away before this step ran it (the gateway marked it):
        its mark is cleared, the request ends here."""
        key = request_cancel_key(request) if self.skips_cancelled else ""
        if key and self.cancel_flags.is_marked(key):
            self.cancel_flags.clear(key)
            return True
        return False

    def wants_pipeline(self) -> bool:
        return self.uses_pipeline

    def setup(self) -> None:
        """Per-step set-up after the pipeline is open."""

    def finalize(self):
        pass


class PerRequestStep(Step):
    def compute_one(self, inputs: dict[str, np.ndarray], request) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def execute(self, requests):
        responses = []
        for r in requests:
            if self.client_left(r):
                responses.append(cancelled_response())
                continue
            try:
                t0 = time.perf_counter()
                out = self.compute_one(read_inputs(r, self.input_names), r)
                if self.timing_output:
                    out[self.timing_output] = np.array([[(time.perf_counter() - t0) * 1e3]], np.float32)
                responses.append(make_response(out))
            except Exception as e:  # noqa: BLE001 (the request gets the message)
                responses.append(error_response(e, self.name))
        return responses


class ImageRowsStep(Step):
    """A step over images: each request holds [1, N, ...] (its N images or tiles); the rows of every
    request in the batch are computed as one batch, then handed back per request. A request found in
    the encoder cache (by its IMAGE_KEY) is not computed: it gets the outputs kept from before."""

    def compute(self, rows: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, bool]]:
        """rows: each input [sum N, ...] -> each output (rows [sum N, ...], merge), where `merge` joins a
        request's rows into one sequence ([1, N*k, D]) instead of keeping them apart ([1, N, ...])."""
        raise NotImplementedError

    def setup(self) -> None:
        from runtime.serving.caches import BytesLRU

        self.encoder_cache = BytesLRU(int(self.params.get("encoder_cache_bytes") or 0))
        self.cache_metrics = None
        if self.encoder_cache.enabled and "IMAGE_KEY" in self.input_names:
            labels = {"model": self.name}
            self.metric_families = [
                pb_utils.MetricFamily(name="facert_encoder_cache_hits_total", kind=pb_utils.MetricFamily.COUNTER,
                                      description=ENCODER_CACHE_HELP["hits"]),
                pb_utils.MetricFamily(name="facert_encoder_cache_misses_total", kind=pb_utils.MetricFamily.COUNTER,
                                      description=ENCODER_CACHE_HELP["misses"])]
            self.cache_metrics = [f.Metric(labels=labels) for f in self.metric_families]

    def _compute_requests(self, inputs: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        """Each request's outputs, its rows computed with all the others' as one batch."""
        sizes = []
        for x in inputs:
            shapes = {k: v.shape for k, v in x.items()}
            if any(len(s) < 2 or s[0] != 1 for s in shapes.values()):
                raise ValueError(f"{self.name}: every input must be [1, N, ...] (one request's images), got {shapes}")
            sizes.append(next(iter(x.values())).shape[1])
        out = self.compute({k: np.concatenate([x[k][0] for x in inputs]) for k in inputs[0]})
        pieces, start = [], 0
        for n in sizes:
            piece = {}
            for k, (v, merge) in out.items():
                part = v[start:start + n]
                piece[k] = part.reshape(1, n * part.shape[1], *part.shape[2:]) if merge else part[None]
            pieces.append(piece)
            start += n
        return pieces

    def execute(self, requests):
        left = [self.client_left(r) for r in requests]  # answered at once, never computed
        inputs = [read_inputs(r, self.input_names) if not gone else {} for r, gone in zip(requests, left)]
        keys = [image_key(x) if self.cache_metrics and not gone else None for x, gone in zip(inputs, left)]
        for x in inputs:
            x.pop("IMAGE_KEY", None)
        t0 = time.perf_counter()
        found = [self.encoder_cache.get(k) if k is not None else None for k in keys]
        if self.cache_metrics:
            hits = sum(f is not None for f in found)
            for metric, n in zip(self.cache_metrics, (hits, sum(k is not None for k in keys) - hits)):
                if n:
                    metric.increment(n)
        lookup_ms = (time.perf_counter() - t0) * 1e3
        todo = [i for i, f in enumerate(found) if f is None and not left[i]]
        computed, error = {}, None
        if todo:
            try:
                computed = dict(zip(todo, self._compute_requests([inputs[i] for i in todo])))
            except Exception as e:  # noqa: BLE001 (every computed request of the batch gets the error)
                error = e
        ms = (time.perf_counter() - t0) * 1e3
        responses = []
        for i in range(len(requests)):
            if left[i]:
                responses.append(cancelled_response())
                continue
            if found[i] is not None:
                piece, spent = dict(found[i]), lookup_ms
            elif error is not None:
                responses.append(error_response(error, self.name))
                continue
            else:
                piece, spent = computed[i], ms
                if keys[i] is not None:
                    kept = {k: np.array(v, copy=True) for k, v in piece.items()}
                    self.encoder_cache.put(keys[i], kept, sum(v.nbytes for v in kept.values()))
            if self.timing_output:
                piece[self.timing_output] = np.full((1, 1), spent, np.float32)
            responses.append(make_response(piece))
        return responses


ENCODER_CACHE_HELP = {"hits": "Requests whose outputs of this image step came from its encoder cache",
                      "misses": "Requests with an IMAGE_KEY whose outputs of this image step were computed"}
