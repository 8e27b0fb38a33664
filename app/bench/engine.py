"""`edgebatch bench engine`: the bare pipeline in one process, per batch size.

Decode + letterbox, batch, engine, boxes + NMS, one batch after another in one
thread: the reference the HTTP path is measured against (serving overhead =
HTTP images/s over this).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from app.detector import Detector


@dataclass
class EngineRun:
    batch_size: int
    images: int
    seconds: float
    batch_latencies_s: list[float]

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def run_pipeline(detector: Detector, jpegs: Sequence[bytes], batch_size: int, *, batches: int, warmup: int = 3) -> EngineRun:
    """Run ``batches`` full batches of ``batch_size`` JPEGs through every stage; time each batch."""
    detector.pool.ensure(detector.config.variant_for(batch_size))
    latencies: list[float] = []
    k = 0
    total_images = 0
    t_begin = 0.0
    for i in range(warmup + batches):
        if i == warmup:
            t_begin = time.perf_counter()
        t0 = time.perf_counter()
        items = []
        for _ in range(batch_size):
            items.append(detector.decode_request(jpegs[k % len(jpegs)]))
            k += 1
        results = detector.run_batch(items)
        if any(r.error for r in results):
            raise RuntimeError(f"pipeline failed: {results[0].error}")
        if i >= warmup:
            latencies.append(time.perf_counter() - t0)
            total_images += batch_size
    return EngineRun(batch_size, total_images, time.perf_counter() - t_begin, latencies)
