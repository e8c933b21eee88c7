"""Image files read safely: one function for every image the project opens (dataset images and eval.py's photos).

Every failure is one error naming the file; 16-bit images are scaled, not clipped; an image over the pixel limit
is refused from its header, before its pixels are decoded; photos can be turned upright by their EXIF orientation.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
from PIL import Image, ImageOps


# Pillow refuses images over 2 * Image.MAX_IMAGE_PIXELS (about 179 megapixels) as possible decompression bombs;
# this environment variable lifts that limit for every image read here, in DataLoader workers too (they inherit it)
MAX_PIXELS_ENV = "PROMPT_RIS_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The largest image (width x height) opened: $PROMPT_RIS_MAX_IMAGE_PIXELS, else Pillow's own limit."""
    text = os.environ.get(MAX_PIXELS_ENV)
    if text is None:
        return 2 * Image.MAX_IMAGE_PIXELS
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{MAX_PIXELS_ENV}={text!r}: must be a whole number of pixels >= 1")
    return int(text)


def open_rgb(path, orient: bool = False, max_pixels: Optional[int] = None) -> Image.Image:
    """Read an image file as 8-bit RGB; every failure is one OSError or ValueError naming the file.

    Pillow's convert("RGB") clips 16-bit pixels at 255 (a 0..65535 ramp turns almost white) and truncates floats,
    so such images are scaled here instead: 16-bit modes (I;16*, and mode I holding 0..65535, as 16-bit TIFFs and
    PNGs open) by 255 / 65535. Floating-point images (mode F) have no range to scale by (0..1? 0..255? a depth
    map?) and are refused, as are 32-bit integer images beyond 16 bits.
    orient: apply the EXIF orientation (photos as a viewer shows them; dataset images are not turned, their
    annotations are drawn on the stored pixels). max_pixels: the size limit, default max_image_pixels().
    """
    limit = max_pixels or max_image_pixels()
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # our limit below replaces Pillow's
    try:
        image = Image.open(path)  # reads the header only: the size is known before any pixel is decoded
    except Exception as e:
        raise OSError(f"cannot open image {path}: {type(e).__name__}: {e}") from e
    finally:
        Image.MAX_IMAGE_PIXELS = guard
    with image:
        if image.width * image.height > limit:
            raise ValueError(f"{path}: {image.width}x{image.height} is {image.width * image.height} pixels, over "
                             f"the limit of {limit} (Pillow's guard against decompression bombs); if the file is "
                             f"trusted, raise it with eval.py --max-image-pixels N or the environment variable "
                             f"{MAX_PIXELS_ENV}=N")
        try:  # a truncated or corrupt file fails here, when its pixels are decoded
            pixels = ImageOps.exif_transpose(image) if orient else image
            pixels.load()
        except Exception as e:
            raise OSError(f"cannot open image {path}: {type(e).__name__}: {e}") from e
        return _to_8bit(pixels, path).convert("RGB")


def _to_8bit(image: Image.Image, path) -> Image.Image:
    """Images whose pixels are not 8-bit, scaled to mode L; others as they are."""
    if image.mode == "F":
        raise ValueError(f"{path}: a 32-bit floating-point image (mode F) has no fixed range to map to 0..255; "
                         "save it as an 8- or 16-bit image")
    if not image.mode.startswith("I"):  # "I" and "I;16", "I;16B", ... (16-bit PNG / TIFF)
        return image
    pixels = np.asarray(image)
    if pixels.min() < 0 or pixels.max() > 65535:
        raise ValueError(f"{path}: a 32-bit integer image (mode {image.mode}) with values {pixels.min()}.."
                         f"{pixels.max()}, beyond 16 bits; save it as an 8- or 16-bit image")
    return Image.fromarray(np.rint(pixels / 257.0).astype(np.uint8))  # 65535 / 257 = 255
