"""Image files: pixels to bytes in png/jpeg/webp, and the stable file name of each image row."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, H, W, C) to uint8 pixels, rounding to the nearest level."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:  # pixels: (H, W, 3 or 1) uint8
    buffer = io.BytesIO()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels  # one channel: a grey image (H, W)
    options = {"optimize": False} if image_format == "png" else {"quality": quality}
    if image_format == "webp" and quality == 100:
        options = {"lossless": True}
    Image.fromarray(pixels).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:  # (H, W, 3) uint8; grey images too
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def image_path(row_id: str, image_index: int, image_format: str) -> str:
    """Where image `image_index` of row `row_id` lives, relative to the output root; same row, same name.

    `images/<first two hex digits>/<16 hex digits of BLAKE2b(id)>_<image index>.<extension>`: ids may hold any
    characters, so the name is derived from a digest of the id instead of the id itself.
    """
    digest = hashlib.blake2b(row_id.encode("utf-8", errors="surrogatepass"), digest_size=8).hexdigest()
    return f"images/{digest[:2]}/{digest}_{image_index}.{EXTENSIONS[image_format]}"
