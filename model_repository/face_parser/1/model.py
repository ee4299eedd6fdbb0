"""Face parser step: BiSeNet label maps on a dynamic batch of images."""

import numpy as np

from runtime.serving.python_backend import BatchedStep, to_numpy


class TritonPythonModel(BatchedStep):
    parts = ("parser",)

    def compute(self, batch):
        labels = self.pipe.c.parse_face(batch["PARSER_PIXELS"])
        return {"LABELS": to_numpy(labels).astype(np.uint8, copy=False)}
