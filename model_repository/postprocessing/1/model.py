"""Postprocessing step: runs once per LLM response and shapes what the client receives.

Text and token ids pass through as they stream. On a request's last response (the one with a
finish reason) it applies the attributes' logical constraints (runtime.models.attributes) and
writes the attributes and the per-stage timings, with the end-to-end time, as JSON.

A request that arrives cancelled (its client cancelled or went away while the llm was streaming)
is not computed: its CANCEL_KEY is marked for the llm step, which stops generating for it.
"""

import json
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from runtime.models.attributes import CELEBA_ATTRIBUTES
from runtime.pipeline import attributes_by_image
from runtime.serving.python_backend import PerRequestStep, bytes_tensor, read_inputs


def attributes_json(probs: np.ndarray) -> str:
    """Image 1's attributes at the top level (as a one-image request has them), every image's under "images"."""
    raw = torch.from_numpy(np.ascontiguousarray(probs.reshape(-1, len(CELEBA_ATTRIBUTES)), dtype=np.float32))
    images = attributes_by_image(raw)
    return json.dumps({**images[0], "images": images})


class TritonPythonModel(PerRequestStep):
    uses_pipeline = False
    skips_cancelled = False  # the llm, still generating, stops the request on its mark

    def execute(self, requests):
        live, responses = [], {}
        for i, r in enumerate(requests):
            if r.is_cancelled():
                key = read_inputs(r, ["CANCEL_KEY"]).get("CANCEL_KEY")
                if key is not None and key.size:
                    self.cancel_flags.mark(bytes(key.reshape(-1)[0]).decode("ascii", "replace"))
                responses[i] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError("request cancelled by the client", pb_utils.TritonError.CANCELLED))
            else:
                live.append(i)
        for i, response in zip(live, super().execute([requests[i] for i in live])):
            responses[i] = response
        return [responses[i] for i in range(len(requests))]

    def compute_one(self, x, request):
        finish = bytes(x["FINISH_REASON"].reshape(-1)[0]).decode()
        attributes, timings = "", ""
        if finish:
            probs = x.get("ATTRIBUTE_PROBS")
            attributes = attributes_json(probs) if probs is not None and probs.size else "null"
            t = json.loads(bytes(x["TIMINGS"].reshape(-1)[0]))
            received_at = t.pop("received_at", None)
            if received_at is not None:
                t["total_ms"] = (time.time() - received_at) * 1e3
            timings = json.dumps(t)
        else:  # a token's: empty, or the prompt's length on the first
            timings = bytes(x["TIMINGS"].reshape(-1)[0]).decode()
        return {"TEXT_OUT": x["TEXT"], "TOKEN_IDS_OUT": x["TOKEN_IDS"], "FINISH_REASON_OUT": x["FINISH_REASON"],
                "ATTRIBUTES": bytes_tensor([attributes]), "TIMINGS_OUT": bytes_tensor([timings])}
