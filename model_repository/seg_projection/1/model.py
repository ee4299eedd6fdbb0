"""Segmentation-token projection step: label maps -> seg tokens (the custom kernel where the backend has it)."""

from runtime.serving.python_backend import BatchedStep, to_numpy


class TritonPythonModel(BatchedStep):
    parts = ("seg",)

    def compute(self, batch):
        return {"SEG_TOKENS": to_numpy(self.pipe.c.seg_tokens(batch["LABELS"]))}
