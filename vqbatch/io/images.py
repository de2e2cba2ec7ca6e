"""Image files: pixels to bytes in png/jpeg/webp and back (their names: `vqbatch.keys.image_name`).

PNG is written by `png_bytes` (numpy and zlib): one filter for every scanline instead of PIL's per-row choice, so a
256x256 image encodes in about half PIL's time for a few percent more bytes, and a tiny image costs a fifth of PIL's
per-call overhead. JPEG and WebP go through PIL; every format is read back by PIL.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {1: 0, 3: 2, 4: 6}  # channels -> PNG colour type: grey, RGB, RGBA
PNG_UP_FILTER = 2  # each byte stored as its difference to the byte above it (PNG spec, section 9.2)
PNG_ZLIB_LEVEL = 6


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] (N, H, W, C) to uint8 pixels, rounding to the nearest level."""
    return (np.clip(images, 0.0, 1.0) * 255).round().astype(np.uint8)


def encode_image(pixels: np.ndarray, image_format: str, quality: int) -> bytes:  # pixels: (H, W, 3 or 1) uint8
    if image_format == "png":
        return png_bytes(pixels)
    buffer = io.BytesIO()
    pixels = pixels[..., 0] if pixels.shape[-1] == 1 else pixels  # one channel: a grey image (H, W)
    options = {"lossless": True} if image_format == "webp" and quality == 100 else {"quality": quality}
    Image.fromarray(pixels).save(buffer, format=image_format.upper(), **options)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:  # pixels: (H, W, 1, 3 or 4) uint8
    """A PNG file of 8-bit pixels: every scanline "Up"-filtered (the first one against a row of zeros)."""
    height, width, channels = pixels.shape
    if channels not in PNG_COLOR_TYPES or pixels.dtype != np.uint8:
        raise ValueError(f"PNG pixels must be uint8 with 1, 3 or 4 channels; got {pixels.dtype} with {channels}")
    rows = pixels.reshape(height, width * channels)  # (H, W * C)
    scanlines = np.empty((height, 1 + width * channels), np.uint8)  # (H, 1 + W * C): filter byte, then data
    scanlines[:, 0] = PNG_UP_FILTER
    scanlines[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=scanlines[1:, 1:])  # wraps modulo 256, as the filter wants
    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join((PNG_SIGNATURE, png_chunk(b"IHDR", header),
                     png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), PNG_ZLIB_LEVEL)), png_chunk(b"IEND", b"")))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """Length, type, data and the CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def decode_image(data: bytes) -> np.ndarray:  # (H, W, 3) uint8; grey images too
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
