"""Segmentation-token projection step: label maps -> seg tokens (the custom kernel where the backend has it)."""

from runtime.serving.python_backend import ImageRowsStep, to_numpy


class TritonPythonModel(ImageRowsStep):
    parts = ("seg",)

    def compute(self, rows):
        # a request's images' seg tokens become one run of rows [1, N*S, D], image by image
        return {"SEG_TOKENS": (to_numpy(self.pipe.c.seg_tokens(rows["LABELS"])), True)}
