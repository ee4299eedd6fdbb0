"""Glue between Triton's python backend and facert's runtime, shared by every step's `1/model.py`.

Imported only inside a python-backend stub (it needs `triton_python_backend_utils`). Each step's
model.py subclasses one of:

- `BatchedStep`: the dynamic batcher hands it several requests; their tensors are concatenated on
  the batch axis, `compute()` runs once, and the results are split back per request.
- `PerRequestStep`: `compute_one()` runs per request, so a bad request fails alone.

A step's model reaches the checkpoint or engines named in its config.pbtxt parameters
(`checkpoint` or `engines` + `backend`, and `device`) as a `FacePipeline` (`self.pipe`): the
components, tokenizer and limits the in-process runtime uses. Compute time goes to the output
named by the `timing_output` parameter when the config declares one.
"""

from __future__ import annotations

import json
import time
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

_PIPELINES: dict[tuple, object] = {}


def to_numpy(x) -> np.ndarray:
    """torch or numpy -> numpy; floating point travels as FP32 between steps."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        x = (x.float() if x.is_floating_point() else x).numpy()
    return np.ascontiguousarray(x)


def open_pipeline(params: dict, device: str):
    """The FacePipeline for this model's source (engines preferred when given); one per process."""
    key = (params.get("engines") or "", params.get("backend") or "", params.get("checkpoint") or "", device)
    if key not in _PIPELINES:
        if params.get("engines"):
            from runtime.engines import open_pipeline as open_engines  # the engines backends (export issue)

            _PIPELINES[key] = open_engines(params["engines"], backend=params.get("backend") or "onnxruntime",
                                           device=device)
        elif params.get("checkpoint"):
            from runtime.pipeline import FacePipeline

            _PIPELINES[key] = FacePipeline.from_checkpoint(params["checkpoint"], device=device)
        else:
            raise pb_utils.TritonModelException("config.pbtxt names neither an `engines` nor a `checkpoint` parameter")
    return _PIPELINES[key]


class RequestInfo:
    """What preprocessing needs, without loading any weights: the spec, the tokenizer, the prompt layout.

    Prompts are built exactly as FacePipeline.prompt_ids builds them (runtime.prompt.build_prompt_ids,
    bounded by the LLM's context less the tokens asked for).
    """

    def __init__(self, params: dict):
        from runtime.serving.repo import describe_checkpoint, describe_engines
        from runtime.tokenizer import load_tokenizer

        source = params.get("engines") or params.get("checkpoint")
        if not source:
            raise pb_utils.TritonModelException("config.pbtxt names neither an `engines` nor a `checkpoint` parameter")
        info = describe_engines(source) if params.get("engines") else describe_checkpoint(source)
        self.spec = info["spec"]
        self.vocab_size, self.num_image_tokens, self.num_seg_tokens = (
            info["vocab_size"], info["num_image_tokens"], info["num_seg_tokens"])
        self.max_context = int(self.spec["llm"].get("max_position_embeddings", 4096))
        self.tokenizer = load_tokenizer(source)

    def prompt_ids(self, question: str, max_new_tokens: int) -> list[int]:
        from runtime.prompt import build_prompt_ids

        return build_prompt_ids(self.tokenizer, question, self.vocab_size, self.num_image_tokens,
                                self.num_seg_tokens, max_prompt_tokens=self.max_context - max_new_tokens)


def error_response(e: BaseException) -> "pb_utils.InferenceResponse":
    if not isinstance(e, ValueError):  # ours are ValueErrors with a message for the caller; others get a trace
        pb_utils.Logger.log_error(traceback.format_exc())
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e) or type(e).__name__))


def read_inputs(request, names) -> dict[str, np.ndarray]:
    out = {}
    for name in names:
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is not None:
            out[name] = t.as_numpy()
    return out


def make_response(outputs: dict[str, np.ndarray]) -> "pb_utils.InferenceResponse":
    return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items()])


def bytes_tensor(values) -> np.ndarray:
    """[B, 1] TYPE_STRING tensor from a list of str/bytes."""
    return np.array([[v.encode() if isinstance(v, str) else v] for v in values], dtype=np.object_)


class Step:
    """What every step shares: its config, parameters, pipeline and timing output."""

    uses_pipeline = True  # False: the step needs no weights (postprocessing)

    def initialize(self, args):
        self.model_config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        self.input_names = [i["name"] for i in self.model_config.get("input", [])]
        self.output_names = [o["name"] for o in self.model_config.get("output", [])]
        self.timing_output = self.params.get("timing_output") or None
        kind = args.get("model_instance_kind", "CPU")
        device = self.params.get("device") or "cpu"
        if kind == "GPU":
            device = f"cuda:{args.get('model_instance_device_id', '0')}"
        self.device = device
        self.pipe = open_pipeline(self.params, device) if self.wants_pipeline() else None
        self.setup()

    def wants_pipeline(self) -> bool:
        return self.uses_pipeline

    def setup(self) -> None:
        """Per-step set-up after the pipeline is open."""

    def finalize(self):
        pass


class BatchedStep(Step):
    def compute(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def execute(self, requests):
        inputs = [read_inputs(r, self.input_names) for r in requests]
        sizes = [next(iter(x.values())).shape[0] for x in inputs]
        try:
            t0 = time.perf_counter()
            batch = {k: np.concatenate([x[k] for x in inputs]) for k in inputs[0]}
            out = self.compute(batch)
            ms = (time.perf_counter() - t0) * 1e3
        except Exception as e:  # noqa: BLE001 (every request of the batch gets the error)
            return [error_response(e) for _ in requests]
        responses, start = [], 0
        for n in sizes:
            piece = {k: v[start:start + n] for k, v in out.items()}
            if self.timing_output:
                piece[self.timing_output] = np.full((n, 1), ms, np.float32)
            responses.append(make_response(piece))
            start += n
        return responses


class PerRequestStep(Step):
    def compute_one(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def execute(self, requests):
        responses = []
        for r in requests:
            try:
                t0 = time.perf_counter()
                out = self.compute_one(read_inputs(r, self.input_names))
                if self.timing_output:
                    out[self.timing_output] = np.array([[(time.perf_counter() - t0) * 1e3]], np.float32)
                responses.append(make_response(out))
            except Exception as e:  # noqa: BLE001 (the request gets the message)
                responses.append(error_response(e))
        return responses
