"""Image bytes -> model inputs. Shared by every backend and by the server's preprocessing step.

Decoding applies EXIF orientation and refuses, before decoding pixels, anything that is not an
image, is empty, is larger than `MAX_IMAGE_BYTES`, declares more than `max_pixels` pixels
(decompression bombs: a few KiB of PNG can declare gigapixels), has an aspect ratio beyond
`MAX_ASPECT_RATIO`, or would need a padded canvas over `MAX_CANVAS_PIXELS` (LLaVA pads to a square
of the longest side: a 376-byte 100000x1 PNG would ask for 10^10 pixels).

Pixels then go through the checkpoint's own image processor, transformers' class built from the
settings the checkpoint directory carries (processor_config.json / preprocessor_config.json), so
that a real checkpoint sees exactly the pixels transformers' processor gives it:
- LLaVA-1.5 (facert's FaceInsight format): pad to a square of the mean colour truncated to integers,
  resize, normalise with CLIP statistics; llava-hf directories: whatever their config says
  (usually resize the shortest edge and centre-crop);
- InternVL: GotOcr2ImageProcessor's dynamic tiling (`crop_to_patches`, 1..max_patches tiles of 448
  chosen by aspect ratio, plus a thumbnail when there is more than one), as InternVLProcessor runs it.
The face parser (FaceInsight with trained seg weights) gets the whole image at 512 px, ImageNet-normalised.

Per-request memory in preprocessing is bounded: the decoded image (<= 3 bytes x MAX_IMAGE_PIXELS =
120 MB), a padded canvas (<= 3 bytes x MAX_CANVAS_PIXELS = 192 MB, pad-to-square processors only) and
the processed tiles (<= max_tiles x 3 x 448 x 448 x 4 bytes = 29 MB per image), per image in turn.
"""

from __future__ import annotations

import functools
import io
import json
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 40_000_000  # a 40 MP photo; anything larger is refused, not resized
MAX_ASPECT_RATIO = 32  # longest side / shortest side; a face photo, a crowd or a panorama is well inside
MAX_CANVAS_PIXELS = 64_000_000  # a pad-to-square canvas (LLaVA): an 8000 px side
MAX_IMAGES = 8  # images per request, unless the pipeline or the server is configured otherwise


class ImageError(ValueError):
    """An image that cannot be used: empty, undecodable, or over a size bound."""


def decode_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES,
                 pad_to_square: bool = False) -> Image.Image:
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
            _check_geometry(w, h, max_pixels, pad_to_square)
            img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image is over the {max_pixels}-pixel bound (decompression bomb: {e})") from None
    except Exception as e:  # PIL raises many types for garbage input
        # PIL's message names its BytesIO object ("<_io.BytesIO object at 0x...>"): say what it means instead
        reason = "not a known image format" if "cannot identify image file" in str(e) else str(e)
        raise ImageError(f"cannot decode image ({len(data)} bytes): {reason}") from None
    img = ImageOps.exif_transpose(img)
    return img.convert("RGB")


def _check_geometry(w: int, h: int, max_pixels: int, pad_to_square: bool) -> None:
    if w < 1 or h < 1:
        raise ImageError(f"image is {w}x{h}: no pixels")
    if w * h > max_pixels:
        raise ImageError(f"image is {w}x{h} = {w * h} pixels, over the {max_pixels}-pixel bound")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise ImageError(f"image is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is over the "
                         f"{MAX_ASPECT_RATIO}:1 bound")
    if pad_to_square and max(w, h) ** 2 > MAX_CANVAS_PIXELS:
        raise ImageError(f"image is {w}x{h}: padded to a square it would be {max(w, h)}x{max(w, h)}, over the "
                         f"{MAX_CANVAS_PIXELS}-pixel canvas bound (this model pads images to a square)")


def _normalise(img: Image.Image, size: int, mean, std, resample=Image.BICUBIC) -> np.ndarray:
    arr = np.asarray(img.resize((size, size), resample), dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


# ------------------------------------------------------------------------------ image processors

def image_processor_config(spec: dict) -> dict:
    """The transformers image processor (class name and settings) that prepares this model's pixels.

    Real checkpoints carry theirs (read by the loader into spec["image_processor"]); facert's own
    specs get the one their family's reference model uses."""
    if spec.get("image_processor"):
        return spec["image_processor"]
    size = int(spec["image_size"])
    common = {"image_mean": list(spec["image_mean"]), "image_std": list(spec["image_std"]), "resample": 3,
              "do_convert_rgb": True}
    if spec["family"] == "facellm":
        return {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": size, "width": size},
                "crop_to_patches": True, "min_patches": 1, "max_patches": 12, **common}
    return {"image_processor_type": "LlavaImageProcessor", "do_pad": bool(spec.get("pad_to_square", True)),
            "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
            "do_center_crop": True, **common}


@functools.lru_cache(maxsize=16)
def _build_processor(config_json: str):
    import transformers

    config = json.loads(config_json)
    name = config.pop("image_processor_type", None)
    config.pop("processor_class", None)
    if name and not _has_torchvision():
        # transformers 5 would fall back to its PIL backend itself, with a warning on every build
        name = name + "Pil" if hasattr(transformers, name + "Pil") else name
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ImageError(f"image processor {name!r} is not one transformers {transformers.__version__} has")
    return cls(**config)


def _has_torchvision() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchvision") is not None


def image_processor(spec: dict):
    return _build_processor(json.dumps(image_processor_config(spec), sort_keys=True))


def tiles_image(spec: dict) -> bool:
    """True where the processor tiles images (InternVL's crop_to_patches)."""
    return "max_patches" in image_processor_config(spec)


def max_tiles_for(spec: dict) -> int:
    cfg = image_processor_config(spec)
    return int(cfg.get("max_patches", 12)) if tiles_image(spec) else 1


def pads_to_square(spec: dict) -> bool:
    return bool(image_processor_config(spec).get("do_pad"))


# ------------------------------------------------------------------------------------- requests

@dataclass
class ImageInputs:
    """Every image of one request, processed."""

    pixel_values: np.ndarray  # [R, 3, S, S] float32: every tile of every image, in prompt order
    tiles: list[int]  # tiles per image (1 unless the processor tiles)
    parser_pixels: np.ndarray | None = None  # [N, 3, P, P] float32 for the face parser (FaceInsight with seg)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height) per image

    @property
    def num_images(self) -> int:
        return len(self.tiles)


def check_image_count(n: int, max_images: int = MAX_IMAGES) -> None:
    if n < 1:
        raise ImageError("the request holds no image: send 1 to "
                         f"{max_images} images")
    if n > max_images:
        raise ImageError(f"the request holds {n} images, over the {max_images}-image bound")


def check_max_tiles(max_tiles: int | None, spec: dict) -> int | None:
    if max_tiles is None:
        return None
    limit = max_tiles_for(spec)
    if not isinstance(max_tiles, (int, np.integer)) or isinstance(max_tiles, bool):
        raise ImageError(f"max_tiles must be an integer, got {type(max_tiles).__name__}")
    if not 1 <= int(max_tiles) <= limit:
        raise ImageError(f"max_tiles must be in [1, {limit}] (this model's processor allows up to {limit} "
                         f"tiles per image), got {max_tiles}")
    return int(max_tiles)


def preprocess_images(images: Sequence[bytes], spec: dict, max_pixels: int = MAX_IMAGE_PIXELS,
                      max_tiles: int | None = None, max_images: int = MAX_IMAGES,
                      with_parser: bool | None = None) -> ImageInputs:
    """Decode and process 1..max_images images; an error names the image it is about."""
    if isinstance(images, (bytes, bytearray, memoryview)):
        images = [images]
    images = list(images)
    check_image_count(len(images), max_images)
    max_tiles = check_max_tiles(max_tiles, spec)
    proc = image_processor(spec)
    kwargs = {}
    if tiles_image(spec):
        kwargs = {"crop_to_patches": True}  # InternVLProcessor's default for images
        if max_tiles is not None:
            kwargs["max_patches"] = max_tiles
    if with_parser is None:
        with_parser = "seg" in spec and "parser" in spec
    pad = pads_to_square(spec)
    pixels, tiles, parser, sizes = [], [], [], []
    for i, data in enumerate(images):
        try:
            img = decode_image(data, max_pixels, pad_to_square=pad)
        except ImageError as e:
            raise ImageError(f"image {i + 1} of {len(images)}: {e}" if len(images) > 1 else str(e)) from None
        out = proc(images=[img], return_tensors="np", **kwargs)
        pv = np.asarray(out["pixel_values"], dtype=np.float32)
        pixels.append(pv)
        tiles.append(int(pv.shape[0]))
        sizes.append(img.size)
        if with_parser:
            p = spec["parser"]
            parser.append(_normalise(img, p["input_size"], p["mean"], p["std"], Image.BILINEAR))
    return ImageInputs(np.ascontiguousarray(np.concatenate(pixels)), tiles,
                       np.stack(parser) if with_parser else None, sizes)


def preprocess(data: bytes, spec: dict, max_pixels: int = MAX_IMAGE_PIXELS, max_tiles: int | None = None) -> ImageInputs:
    """One image."""
    return preprocess_images([data], spec, max_pixels, max_tiles)
