"""The detector as named hooks (in the manner of LitServe's LitAPI).

``decode_request`` (pre-process) -> ``batch`` -> ``predict`` (engine) ->
``unbatch`` (decode boxes + NMS) -> ``encode_response``. The Ray Serve
deployment only schedules these hooks; everything here runs without Ray.

Variants: one engine per fixed batch size. ``VariantPool`` keeps a few
resident, picks the smallest loaded one that holds a formed batch, and swaps
atomically: a new variant is loaded and warmed beside the old one before any
batch is routed to it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from app.config import DetectorConfig
from app.engines.base import Engine, ModelVariant, run_padded
from app.errors import EdgebatchError, PayloadTooLarge, Unavailable
from app.pipeline import Detection, PreparedImage, postprocess, prepare, stack

log = logging.getLogger(__name__)

VariantLoader = Callable[[int], tuple[Engine, ModelVariant]]


class VariantRetired(Exception):
    """A batch reached a variant that a swap had just retired; it is re-routed, never failed."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(f"batch-{batch_size} variant was retired")


@dataclass
class LoadedVariant:
    """One batch size's engine instances (Triton's instance group): concurrent batches each take one."""

    engine: Engine
    variant: ModelVariant
    loaded_at: float = field(default_factory=time.time)
    load_s: float = 0.0
    output_shape: tuple[int, ...] = ()
    instances: list[Engine] = field(default_factory=list)
    _free: "queue.SimpleQueue[Engine]" = field(default_factory=queue.SimpleQueue, repr=False)

    run_s: float = 0.0  # seconds per run, warm-up then a moving average: what padding would cost
    _state: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _inflight: int = field(default=0, repr=False)
    _closed: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        if not self.instances:
            self.instances = [self.engine]
        for e in self.instances:
            self._free.put(e)

    @property
    def batch_size(self) -> int:
        return self.engine.batch_size

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run on a free instance; blocks while all instances are busy. Raises ``VariantRetired`` when
        the variant was closed between ``pick`` and here (the caller picks again)."""
        with self._state:
            if self._closed:
                raise VariantRetired(self.batch_size)
            self._inflight += 1
        try:
            engine = self._free.get()
            try:
                t0 = time.perf_counter()
                out = run_padded(engine, batch)
                dt = time.perf_counter() - t0
                self.run_s = 0.8 * self.run_s + 0.2 * dt if self.run_s else dt
                return out
            finally:
                self._free.put(engine)
        finally:
            with self._state:
                self._inflight -= 1
                self._state.notify_all()

    def close(self) -> None:
        """Refuse new batches, wait for the in-flight ones to finish, then release each instance."""
        with self._state:
            if self._closed:
                return  # idempotent: a retired variant may be closed by the pool and a swap alike
            self._closed = True
            self._state.wait_for(lambda: self._inflight == 0)
        for _ in self.instances:
            self._free.get().close()

    def memory_bytes(self) -> int:
        return sum(e.memory_bytes() for e in self.instances)


class VariantPool:
    """Engines keyed by batch size; loads beside, warms, then publishes in one assignment."""

    def __init__(self, loader: VariantLoader, max_resident: int = 2, instances: int = 1) -> None:
        self._loader = loader
        self.max_resident = max_resident
        self.instances = instances
        self._loaded: dict[int, LoadedVariant] = {}
        self._lock = threading.Lock()  # serialises loads, not inference

    @property
    def loaded(self) -> dict[int, LoadedVariant]:
        return dict(self._loaded)

    def ensure(self, batch_size: int) -> LoadedVariant:
        """Load (and warm) the variant for ``batch_size`` unless resident; raise Unavailable on failure."""
        current = self._loaded.get(batch_size)
        if current is not None:
            return current
        with self._lock:
            current = self._loaded.get(batch_size)
            if current is not None:
                return current
            t0 = time.perf_counter()
            try:
                engines: list[Engine] = []
                for _ in range(self.instances):
                    engine, variant = self._loader(batch_size)
                    engines.append(engine)
                    warm = np.zeros(engine.input_shape, dtype=np.float32)
                    out_shape = tuple(int(d) for d in engine.run(warm)[0].shape)
                t_run = time.perf_counter()
                engines[0].run(warm)  # the first run pays one-off allocations; time a second one, once
                run_s = time.perf_counter() - t_run
            except EdgebatchError:
                raise
            except (MemoryError, RuntimeError, OSError) as exc:
                raise Unavailable(f"could not load the batch-{batch_size} variant: {exc}") from exc
            lv = LoadedVariant(engines[0], variant, load_s=time.perf_counter() - t0, output_shape=out_shape,
                               instances=engines, run_s=run_s)
            self._loaded = {**self._loaded, batch_size: lv}  # atomic publish
            return lv

    def pick(self, n: int) -> LoadedVariant:
        """Smallest resident variant that holds ``n`` items, else the largest resident one."""
        loaded = self._loaded
        if not loaded:
            raise Unavailable("no model variant is loaded yet; the detector is still starting")
        fitting = [s for s in loaded if s >= n]
        return loaded[min(fitting)] if fitting else loaded[max(loaded)]

    def plan(self, n: int) -> list[LoadedVariant]:
        """The runs that serve a formed batch of ``n`` items: one run on ``pick(n)`` (padded), or the
        batch cut into runs of smaller resident variants when their measured times add up to clearly
        less. On a CPU, where images/s hardly grows with the batch, 5 requests on {b1, b8} run as
        5 x b1 instead of paying for 3 padded images; on a GPU the padded run usually wins."""
        loaded = self._loaded
        first = self.pick(n)  # raises when nothing is loaded
        sizes = sorted(loaded)
        chunks: list[LoadedVariant] = []  # largest piece that fits the rest; the smallest, padded, last
        rest = n
        while rest > 0:
            size = max((s for s in sizes if s <= rest), default=sizes[0])
            chunks.append(loaded[size])
            rest -= size
        if first.batch_size < n:  # larger than any variant: it runs in pieces anyway
            return chunks
        split_s = sum(lv.run_s for lv in chunks)
        if first.run_s > 0 and all(lv.run_s > 0 for lv in chunks) and split_s < 0.9 * first.run_s:
            return chunks
        return [first]

    def retire(self, keep: Sequence[int]) -> list[LoadedVariant]:
        """Unpublish variants not in ``keep`` (most recent first, up to max_resident); caller closes them
        once in-flight batches are done."""
        with self._lock:
            keep_set = [s for s in keep if s in self._loaded][: self.max_resident]
            gone = [lv for s, lv in self._loaded.items() if s not in keep_set]
            self._loaded = {s: lv for s, lv in self._loaded.items() if s in keep_set}
            return gone

    def close(self) -> None:
        for lv in self.retire([]):
            lv.close()


@dataclass
class BatchResult:
    """What one item of a batch gets back: detections or its own error, plus timings."""

    detections: list[Detection] | None
    error: EdgebatchError | None
    variant: ModelVariant | None
    batch_size: int
    timings: dict[str, float]


class Detector:
    """The pipeline hooks for one model; owned by a deployment replica or a local process."""

    def __init__(
        self,
        config: DetectorConfig,
        loader: VariantLoader,
        *,
        labels: Sequence[str],
        input_size: tuple[int, int],
    ) -> None:
        self.config = config
        self.labels = list(labels)
        self.input_size = input_size
        self.pool = VariantPool(loader, max_resident=config.resident_variants, instances=config.engine_instances)

    # -- lifecycle -------------------------------------------------------
    def setup(self, batch_size: int | None = None) -> LoadedVariant:
        """Load and warm the variant for the configured max batch size, plus the smallest one when two
        may stay resident (so a lone request is not padded to the full batch)."""
        lv = self.pool.ensure(self.config.variant_for(batch_size or self.config.max_batch_size))
        smallest = self.config.batch_sizes[0]
        if self.pool.max_resident >= 2 and smallest not in self.pool.loaded:
            self.pool.ensure(smallest)
        return lv

    def resident_preference(self, target: int) -> list[int]:
        """Which variants to keep when trimming: the target, the smallest, then the nearest others."""
        smallest = self.config.batch_sizes[0]
        others = sorted((s for s in self.pool.loaded if s not in (target, smallest)), key=lambda s: abs(s - target))
        return [target, smallest, *others] if smallest != target else [target, *others]

    # -- hooks -----------------------------------------------------------
    def decode_request(self, body: bytes) -> PreparedImage:
        if len(body) > self.config.max_body_bytes:
            raise PayloadTooLarge(
                f"body of {len(body)} bytes exceeds max_body_bytes={self.config.max_body_bytes}; "
                "send a smaller image or raise max_body_bytes in the deployment's user_config"
            )
        t0 = time.perf_counter()
        item = prepare(body, self.input_size, max_pixels=self.config.max_image_pixels)
        item.timings["preprocess_s"] = time.perf_counter() - t0
        return item

    def batch(self, items: Sequence[PreparedImage]) -> np.ndarray:
        return stack(items)

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, LoadedVariant]:
        """Run the batch; returns the output and the (largest) variant that ran it."""
        for _ in range(8):  # a swap retires at most a few variants; each retry sees the newer publish
            runs = self.pool.plan(batch.shape[0])
            try:
                return self._predict_on(runs, batch), max(runs, key=lambda lv: lv.batch_size)
            except VariantRetired:
                continue
        raise Unavailable("model variants kept changing under this batch; retry")

    @staticmethod
    def _predict_on(runs: Sequence[LoadedVariant], batch: np.ndarray) -> np.ndarray:
        """The plan's runs over consecutive slices (they cover the batch; the last may be padded)."""
        outs, start = [], 0
        for lv in runs:
            outs.append(lv.run(batch[start : start + lv.batch_size])[0])
            start += lv.batch_size
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)

    def unbatch(self, output: np.ndarray, items: Sequence[PreparedImage]) -> list[list[Detection]]:
        c = self.config
        return postprocess(
            output,
            [it.letterbox for it in items],
            self.labels,
            conf=c.conf_threshold,
            iou=c.iou_threshold,
            max_det=c.max_detections,
            layout=c.layout,
        )

    def encode_response(self, result: BatchResult) -> dict:
        v = result.variant
        return {
            "model": v.name if v else self.config.model,
            "version": v.version if v else None,
            "backend": v.backend if v else self.config.backend,
            "batch_size": result.batch_size,
            "detections": [d.to_json() for d in (result.detections or [])],
            "timings_ms": {k.removesuffix("_s"): round(val * 1000, 3) for k, val in result.timings.items()},
        }

    # -- the batch stage as one call ----------------------------------
    def run_batch(self, items: Sequence[PreparedImage], enqueued_at: Sequence[float] | None = None) -> list[BatchResult]:
        """Engine + post-processing for a formed batch; a failure fails the batch's items with the error."""
        t_start = time.perf_counter()
        queue_s = [t_start - t for t in enqueued_at] if enqueued_at else [0.0] * len(items)
        try:
            output, lv = self.predict(self.batch(items))
            t_inf = time.perf_counter()
            dets = self.unbatch(output, items)
            t_post = time.perf_counter()
        except EdgebatchError as exc:
            return [BatchResult(None, exc, None, len(items), dict(it.timings)) for it in items]
        results = []
        for it, d, q in zip(items, dets, queue_s):
            timings = {
                "queue_s": max(q, 0.0),
                "preprocess_s": it.timings.get("preprocess_s", 0.0),
                "inference_s": t_inf - t_start,
                "postprocess_s": t_post - t_inf,
            }
            results.append(BatchResult(d, None, lv.variant, lv.batch_size, timings))
        return results
