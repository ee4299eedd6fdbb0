"""Vision encoder step: vision tower + projector on a dynamic batch of images."""

from runtime.serving.python_backend import BatchedStep, to_numpy


class TritonPythonModel(BatchedStep):
    parts = ("vision",)

    def compute(self, batch):
        image_tokens, pooled = self.pipe.c.encode_image(batch["PIXEL_VALUES"])
        return {"IMAGE_TOKENS": to_numpy(image_tokens), "POOLED": to_numpy(pooled)}
