"""Camera-like JPEG frames for benchmarks: the project's own synthetic scenes, encoded once."""

from __future__ import annotations

import cv2
import numpy as np


def sample_jpegs(n: int = 16, width: int = 1280, height: int = 720, seed: int = 7, quality: int = 90) -> list[bytes]:
    from app.demo.synthetic import render_scene

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        img, _ = render_scene(rng, width, height, 12)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        frames.append(buf.tobytes())
    return frames
