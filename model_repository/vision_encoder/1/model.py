"""Vision encoder step: vision tower + projector over every tile of every image of the batch's requests."""

from runtime.serving.python_backend import ImageRowsStep, to_numpy


class TritonPythonModel(ImageRowsStep):
    parts = ("vision",)

    def compute(self, rows):
        image_tokens, pooled = self.pipe.c.encode_image(rows["PIXEL_VALUES"])
        # a request's tiles become one run of image rows [1, R*T, D]; pooled features stay per tile [1, R, D_vis]
        return {"IMAGE_TOKENS": (to_numpy(image_tokens), True), "POOLED": (to_numpy(pooled), False)}
