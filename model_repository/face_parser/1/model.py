"""Face parser step: BiSeNet label maps for every image of the batch's requests."""

import numpy as np

from runtime.serving.python_backend import ImageRowsStep, to_numpy


class TritonPythonModel(ImageRowsStep):
    parts = ("parser",)

    def compute(self, rows):
        labels = self.pipe.c.parse_face(rows["PARSER_PIXELS"])
        return {"LABELS": (to_numpy(labels).astype(np.uint8, copy=False), False)}
