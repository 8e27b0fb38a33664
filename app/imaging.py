"""Bounded image decoding: the pixel count is checked before OpenCV allocates anything.

A 96 KB JPEG whose header claims 30000 x 30000 pixels made ``cv2.imdecode`` allocate
5.6 GB. Only PNG and JPEG are decoded, and their header is read first (a 400 naming the size and
the ``max_image_pixels`` setting). OpenCV's own ``OPENCV_IO_MAX_IMAGE_PIXELS`` is a
backstop; OpenCV 5 reads it when ``cv2`` is imported, so it must be in the environment
before that: the Serve config's runtime_env sets it for replicas, and this module sets a
default at import for processes that import it before ``cv2``.
"""

from __future__ import annotations

import os
import struct

#: Default pixel limit per image (also OpenCV's process-wide backstop, see above).
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
OPENCV_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"

os.environ.setdefault(OPENCV_PIXELS_ENV, str(DEFAULT_MAX_IMAGE_PIXELS))

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])


def _png_size(data: bytes) -> tuple[int, int] | None:
    if len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _SOF_MARKERS:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a size we can read
            return None
        i += 2 + length
    return None


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding; ``None`` for other formats."""
    head = bytes(data[:2])
    if bytes(data[:8]) == _PNG_SIGNATURE:
        return _png_size(bytes(data[:24]))
    if head == b"\xff\xd8":
        return _jpeg_size(bytes(data[: 1 << 20]))  # SOF sits in the first segments
    return None


def check_declared_size(data: bytes, max_pixels: int) -> None:
    """BadRequest unless ``data`` is a PNG or JPEG whose header declares at most ``max_pixels`` pixels.

    Only these two formats are decoded: for them the size is known before OpenCV allocates.
    """
    from app.errors import BadRequest

    size = declared_size(data)
    if size is None:
        raise BadRequest(
            f"body is not a decodable image ({len(data)} bytes, starts with {bytes(data[:8])!r}): "
            "send JPEG or PNG bytes with Content-Type image/jpeg or image/png"
        )
    if size[0] * size[1] > max_pixels:
        raise BadRequest(f"image of {size[0]}x{size[1]} pixels exceeds max_image_pixels ({max_pixels}); "
                         "send a smaller image or raise max_image_pixels in the deployment's user_config")
