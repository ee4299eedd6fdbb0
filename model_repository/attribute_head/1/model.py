"""Attribute head step: CelebA attribute probabilities from pooled vision features."""

from runtime.serving.python_backend import BatchedStep, to_numpy


class TritonPythonModel(BatchedStep):
    parts = ("attributes",)

    def compute(self, batch):
        return {"ATTRIBUTE_PROBS": to_numpy(self.pipe.c.attributes(batch["POOLED"]))}
