"""`edgebatch bench engine`: the detector's batch handler in one process, per batch size.

Each batch of JPEGs goes through ``Detector.handle_batch``, the same call the Serve
replica makes (decode + letterbox, engine, boxes + NMS). Sequentially, one batch after
another; or pipelined (``concurrency`` > 1): that many batches in flight from as many
threads, so batch k+1 decodes while the engine runs batch k, as the replica's batcher
overlaps them. The pipelined run is the bound the HTTP path is measured against: the
best this machine does with the stages overlapped and no serving layer.
"""

from __future__ import annotations

import threading
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


def run_pipeline(detector: Detector, jpegs: Sequence[bytes], batch_size: int, *, batches: int, warmup: int = 3,
                 concurrency: int = 1) -> EngineRun:
    """Run ``batches`` full batches of ``batch_size`` JPEGs through every stage, ``concurrency`` batches
    at a time (each from its own thread); time each batch and the whole run after the warm-up."""
    detector.pool.ensure(detector.variant_for(batch_size))
    lock = threading.Lock()
    latencies: list[float] = []
    counter = {"next": 0, "begin": 0.0}
    errors: list[BaseException] = []
    start_measuring = threading.Barrier(concurrency)

    def one_batch(i: int) -> None:
        items = [DetectRequest.encoded(jpegs[(i * batch_size + j) % len(jpegs)]) for j in range(batch_size)]
        t0 = time.perf_counter()
        for r in detector.handle_batch(items):
            r.unwrap()
        if i >= warmup:
            with lock:
                latencies.append(time.perf_counter() - t0)

    def worker() -> None:
        try:
            for i in range(warmup):  # every thread warms up, then all start the clock together
                one_batch(i)
            if start_measuring.wait() == 0:
                counter["begin"] = time.perf_counter()
            start_measuring.wait()
            while True:
                with lock:
                    i = counter["next"]
                    counter["next"] += 1
                if i >= batches:
                    return
                one_batch(warmup + i)
        except BaseException as exc:  # surfaced by the caller; a dead thread must not hang the barrier
            errors.append(exc)
            start_measuring.abort()

    threads = [threading.Thread(target=worker, name=f"bench-batch-{k}") for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failures = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if failures:  # the other threads only saw the barrier broken by the one that failed
        raise failures[0]
    return EngineRun(batch_size, batches * batch_size, time.perf_counter() - counter["begin"], latencies)
