"""`edgebatch bench engine`: the detector's batch handler in one process, per batch size.

Each batch of JPEGs goes through ``Detector.handle_batch``, the same call the Serve
replica makes (decode + letterbox, engine, boxes + NMS), one batch after another:
the reference the HTTP path is measured against (serving overhead = HTTP images/s
over this).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from app.detector import Detector, DetectRequest


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
    detector.pool.ensure(detector.variant_for(batch_size))
    latencies: list[float] = []
    k = 0
    total_images = 0
    t_begin = 0.0
    for i in range(warmup + batches):
        if i == warmup:
            t_begin = time.perf_counter()
        t0 = time.perf_counter()
        items = [DetectRequest.encoded(jpegs[(k + j) % len(jpegs)]) for j in range(batch_size)]
        k += batch_size
        for r in detector.handle_batch(items):
            r.unwrap()
        if i >= warmup:
            latencies.append(time.perf_counter() - t0)
            total_images += batch_size
    return EngineRun(batch_size, total_images, time.perf_counter() - t_begin, latencies)
