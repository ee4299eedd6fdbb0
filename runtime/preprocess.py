"""Image bytes -> model inputs. Shared by every backend and by the server's preprocessing step.

Decoding applies EXIF orientation and refuses, before decoding pixels, anything that is not an
image, is empty, is larger than `MAX_IMAGE_BYTES`, or declares more than `max_pixels` pixels
(decompression bombs: a few KiB of PNG can declare gigapixels).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # a 40 MP photo; anything larger is refused, not resized


class ImageError(ValueError):
    """An image that cannot be used: empty, undecodable, or over a size bound."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image must be encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the {max_bytes}-byte bound")
    try:
        with warnings.catch_warnings():
            # Our own bound below is the one that counts; PIL's warning would only duplicate it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(bytes(data)))
            w, h = img.size  # from the header: nothing decoded yet
            if w * h > max_pixels:
                raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel bound")
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is over the {max_pixels}-pixel bound (decompression bomb: {e})") from None
    except Exception as e:  # PIL raises many types for garbage input
        raise ImageError(f"cannot decode image ({len(data)} bytes): {e}") from None
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def _normalise(img: Image.Image, size: int, mean, std, resample=Image.BICUBIC) -> np.ndarray:
    arr = np.asarray(img.resize((size, size), resample), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's pad-to-square: centre the image on a square of the normalisation mean."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


@dataclass
class ModelInputs:
    pixel_values: np.ndarray  # [3, S, S] float32 for the vision tower
    parser_pixels: np.ndarray | None  # [3, P, P] float32 for the face parser (FaceInsight only)
    original_size: tuple[int, int]


def preprocess(data: bytes, spec: dict, max_pixels: int = MAX_IMAGE_PIXELS) -> ModelInputs:
    img = decode_image(data, max_pixels)
    mean, std = spec["image_mean"], spec["image_std"]
    vis = img
    if spec.get("pad_to_square"):
        vis = expand_to_square(img, tuple(int(round(m * 255)) for m in mean))
    pixel_values = _normalise(vis, spec["image_size"], mean, std)
    parser_pixels = None
    if "parser" in spec:
        p = spec["parser"]
        parser_pixels = _normalise(img, p["input_size"], p["mean"], p["std"], Image.BILINEAR)
    return ModelInputs(pixel_values, parser_pixels, img.size)
