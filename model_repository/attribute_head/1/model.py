"""Attribute head step: CelebA attribute probabilities from every image's pooled vision features."""

from runtime.serving.python_backend import ImageRowsStep, to_numpy


class TritonPythonModel(ImageRowsStep):
    parts = ("attributes",)

    def compute(self, rows):
        return {"ATTRIBUTE_PROBS": (to_numpy(self.pipe.c.attributes(rows["POOLED"])), False)}
