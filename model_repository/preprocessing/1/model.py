"""Preprocessing step: validate the request, decode the images, build the prompt ids, hash the images.

Every check the in-process pipeline makes runs here, first, with the same code
(runtime.pipeline.RequestBuilder, SamplingParams.validate), so a bad request fails with a message
naming its problem before any model runs.
"""

import base64
import binascii
import json
import time

import numpy as np

from runtime.errors import RequestError
from runtime.generate import SamplingParams
from runtime.preprocess import ImageError
from runtime.prompt import PromptError
from runtime.serving.caches import content_key
from runtime.serving.python_backend import PerRequestStep, RequestInfo, bytes_tensor, request_cancel_key

DEFAULTS = SamplingParams()


def _one(inputs, name, default=None):
    """The single value of a [1, 1] input."""
    if name not in inputs:
        return default
    x = inputs[name]
    if x.size != 1:
        raise RequestError(f"{name} must hold exactly one value per request, got shape {list(x.shape)}")
    return x.reshape(-1)[0]


def _text(inputs, name) -> str | None:
    value = _one(inputs, name)
    if value is None:
        return None
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(f"{name} is not UTF-8 text: {e}") from None


def _images(inputs) -> list[bytes]:
    if "IMAGE" not in inputs and "IMAGE_BASE64" not in inputs:
        raise ImageError("the image is missing: send IMAGE (encoded bytes, one or more) or IMAGE_BASE64 (base64 text)")
    if "IMAGE" in inputs and "IMAGE_BASE64" in inputs:
        raise ImageError("send the images once: IMAGE or IMAGE_BASE64, not both")
    name = "IMAGE" if "IMAGE" in inputs else "IMAGE_BASE64"
    x = inputs[name]
    if x.ndim != 2 or x.shape[0] != 1:
        raise ImageError(f"{name} must be [1, N] (one request's N images), got shape {list(x.shape)}")
    items = [bytes(v) for v in x.reshape(-1)]
    if name == "IMAGE":
        return items
    out = []
    for i, item in enumerate(items):
        try:
            out.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError) as e:
            raise ImageError(f"IMAGE_BASE64 item {i + 1} is not valid base64: {e}") from None
    return out


class TritonPythonModel(PerRequestStep):
    uses_pipeline = False  # the tokenizer and the spec are all it needs

    def setup(self):
        self.info = RequestInfo(self.params)

    def compute_one(self, inputs, request):
        received_at = time.time()
        images = _images(inputs)
        question, messages = _text(inputs, "QUESTION"), _text(inputs, "MESSAGES")
        if question is None and messages is None:
            raise PromptError("the question is missing: send QUESTION (UTF-8 text) or MESSAGES (a JSON conversation)")
        if messages is not None:
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise PromptError(f"MESSAGES is not valid JSON: {e}") from None
        max_tiles = _one(inputs, "MAX_TILES")
        params = SamplingParams(
            max_new_tokens=int(_one(inputs, "MAX_TOKENS", DEFAULTS.max_new_tokens)),
            temperature=float(_one(inputs, "TEMPERATURE", DEFAULTS.temperature)),
            top_p=float(_one(inputs, "TOP_P", DEFAULTS.top_p)),
            seed=None if "SEED" not in inputs else int(_one(inputs, "SEED")),
        ).validate()
        x, ids = self.info.requests.build(images, question, messages, params.max_new_tokens,
                                          None if max_tiles is None else int(max_tiles))
        out = {"PIXEL_VALUES": x.pixel_values[None], "INPUT_IDS": np.array([ids], np.int64)}
        if x.parser_pixels is not None and "PARSER_PIXELS" in self.output_names:
            out["PARSER_PIXELS"] = x.parser_pixels[None]
        generation = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                      "top_p": params.top_p, "seed": params.seed, "stream": bool(_one(inputs, "STREAM", False)),
                      "received_at": received_at, "prompt_tokens": len(ids),
                      "cancel_key": request_cancel_key(request)}  # the llm stops on its mark (serving/cancel.py)
        out["GENERATION"] = bytes_tensor([json.dumps(generation)])
        # the encoder caches' and the prefix cache's key: what the image steps' outputs depend on (the
        # images' bytes in order and the tiles asked for; the spec and the pixel bound are the server's own)
        out["IMAGE_KEY"] = bytes_tensor([content_key("images", str(max_tiles), *images)])
        return out
