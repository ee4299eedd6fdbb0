"""Preprocessing step: validate the request, decode the image, build the prompt ids.

Every check the in-process pipeline makes runs here, first, with the same functions
(runtime.preprocess, runtime.prompt, SamplingParams.validate), so a bad request fails with a
message naming its problem before any model runs.
"""

import base64
import binascii
import json
import time

import numpy as np

from runtime.generate import SamplingParams
from runtime.preprocess import MAX_IMAGE_PIXELS, ImageError, preprocess
from runtime.serving.python_backend import PerRequestStep, RequestInfo, bytes_tensor

DEFAULTS = SamplingParams()


def _one(inputs, name, default=None):
    """The single value of a [1, 1] input (one request carries one image and one question)."""
    if name not in inputs:
        return default
    x = inputs[name]
    if x.size != 1:
        raise ValueError(f"{name} must hold exactly one value per request, got shape {list(x.shape)}")
    return x.reshape(-1)[0]


class TritonPythonModel(PerRequestStep):
    uses_pipeline = False  # the tokenizer and the spec are all it needs

    def setup(self):
        self.info = RequestInfo(self.params)

    def compute_one(self, inputs):
        received_at = time.time()
        if "IMAGE" not in inputs and "IMAGE_BASE64" not in inputs:
            raise ValueError("the image is missing: send IMAGE (encoded bytes) or IMAGE_BASE64 (base64 text)")
        if "IMAGE" in inputs and "IMAGE_BASE64" in inputs:
            raise ValueError("send the image once: IMAGE or IMAGE_BASE64, not both")
        if "QUESTION" not in inputs:
            raise ValueError("the question is missing: send QUESTION (UTF-8 text)")
        if "IMAGE" in inputs:
            image = bytes(_one(inputs, "IMAGE"))
        else:
            try:
                image = base64.b64decode(_one(inputs, "IMAGE_BASE64"), validate=True)
            except (binascii.Error, ValueError) as e:
                raise ImageError(f"IMAGE_BASE64 is not valid base64: {e}") from None
        question = _one(inputs, "QUESTION")
        try:
            question = bytes(question).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"QUESTION is not UTF-8 text: {e}") from None
        params = SamplingParams(
            max_new_tokens=int(_one(inputs, "MAX_TOKENS", DEFAULTS.max_new_tokens)),
            temperature=float(_one(inputs, "TEMPERATURE", DEFAULTS.temperature)),
            top_p=float(_one(inputs, "TOP_P", DEFAULTS.top_p)),
            seed=None if "SEED" not in inputs else int(_one(inputs, "SEED")),
        ).validate()
        ids = self.info.prompt_ids(question, params.max_new_tokens)
        x = preprocess(image, self.info.spec, MAX_IMAGE_PIXELS)
        out = {"PIXEL_VALUES": x.pixel_values[None], "INPUT_IDS": np.array([ids], np.int64)}
        if x.parser_pixels is not None and "PARSER_PIXELS" in self.output_names:
            out["PARSER_PIXELS"] = x.parser_pixels[None]
        generation = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                      "top_p": params.top_p, "seed": params.seed, "stream": bool(_one(inputs, "STREAM", False)),
                      "received_at": received_at}
        out["GENERATION"] = bytes_tensor([json.dumps(generation)])
        return out
