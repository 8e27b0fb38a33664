"""The detector's one batch handler (LitServe's loop): ``Detector.handle_batch(items) -> results``.

Every path (HTTP v1 and v2, streams, tenancy, ``edgebatch bench engine``) hands a
formed batch of ``DetectRequest`` items to ``handle_batch``: pre-processing, the
engine, post-processing and the timings each happen there once. A bad item gets an
error result of its own; a failure of the whole batch (the engine) raises. The Ray
Serve deployment only forms batches and schedules this call; nothing here needs Ray.

Variants: one engine per fixed batch size. ``VariantPool`` keeps a few
resident, picks the smallest loaded one that holds a formed batch, and swaps
atomically: a new variant is loaded and warmed beside the old one before any
batch is routed to it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from app.config import DetectorConfig
from app.engines.base import Engine, ModelVariant, run_padded
from app.errors import BadRequest, EdgebatchError, Overloaded, PayloadTooLarge, Unavailable
from app.pipeline import Detection, Letterbox, Postprocessor, PostprocessSettings, PreparedImage, prepare, to_input

log = logging.getLogger(__name__)

VariantLoader = Callable[[int], tuple[Engine, ModelVariant]]


class DetectorRetired(Unavailable):
    """A batch reached a Detector that a model swap had just closed; the replica re-runs it on the new one."""


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
    _free: queue.SimpleQueue[Engine] = field(default_factory=queue.SimpleQueue, repr=False)

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
        self.closed = False

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
            lv = self._load(batch_size, self.instances)
            self._loaded = {**self._loaded, batch_size: lv}  # atomic publish
            return lv

    def _load(self, batch_size: int, instances: int) -> LoadedVariant:
        t0 = time.perf_counter()
        engines: list[Engine] = []
        try:
            for _ in range(instances):
                engine, variant = self._loader(batch_size)
                engines.append(engine)
                warm = np.zeros(engine.input_shape, dtype=np.float32)
                out_shape = tuple(int(d) for d in engine.run(warm)[0].shape)
            t_run = time.perf_counter()
            engines[0].run(warm)  # the first run pays one-off allocations; time a second one, once
            run_s = time.perf_counter() - t_run
        except EdgebatchError:
            _close_all(engines)
            raise
        except (MemoryError, RuntimeError, OSError) as exc:
            _close_all(engines)
            raise Unavailable(f"could not load the batch-{batch_size} variant: {exc}") from exc
        return LoadedVariant(engines[0], variant, load_s=time.perf_counter() - t0, output_shape=out_shape,
                             instances=engines, run_s=run_s)

    def set_instances(self, instances: int) -> None:
        """Engine instances per variant (concurrent batches): each resident variant is reloaded with
        that many beside the serving one, published, and the old one closed once its batches are done."""
        with self._lock:
            if instances == self.instances:
                return
            for size, old in sorted(self._loaded.items()):
                fresh = self._load(size, instances)  # raises before anything changed for this size
                self._loaded = {**self._loaded, size: fresh}
                _close_later([old])
            self.instances = instances

    def set_max_resident(self, max_resident: int, keep: Sequence[int]) -> None:
        """How many variants may stay loaded; the ones past the limit (by ``keep`` order) are closed."""
        self.max_resident = max_resident
        _close_later(self.retire(keep))

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
        self.closed = True
        for lv in self.retire([]):
            lv.close()


def _close_all(engines: Sequence[Engine]) -> None:
    for e in engines:
        e.close()


def _close_later(variants: Sequence[LoadedVariant]) -> None:
    """Close retired variants off the caller's thread: each close waits for its in-flight batches."""
    for lv in variants:
        threading.Thread(target=lv.close, name="edgebatch-retire", daemon=True).start()




# -- what crosses the batch handler ---------------------------------------------------------------
RequestKind = Literal["encoded", "frame", "letterboxed", "tensor"]
RAW_OUTPUT_KINDS = ("letterboxed", "tensor")  # their caller decodes the raw output row itself


@dataclass(frozen=True)
class DetectRequest:
    """One item of a batch: an encoded image (JPEG/PNG bytes), a decoded BGR uint8 frame (H, W, 3),
    a BGR uint8 image already letterboxed to the model input (H, W, 3) (stream readers: a quarter
    of the float bytes), or a v2 input row (3, H, W) float32; the last two get their raw output back."""

    kind: RequestKind
    data: bytes | np.ndarray
    enqueued_at: float | None = None  # perf_counter() when it entered the replica's batcher
    deadline_s: float | None = None  # the caller's time budget left when it sent the item
    expires_at: float | None = None  # perf_counter() past which the replica refuses it unrun
    #: decoded and letterboxed ahead of its batch (``Detector.prepare_ahead``), with the seconds that took;
    #: ``data`` stays, so a model swapped in with another input size prepares it again
    ahead: PreparedAhead | None = None

    @classmethod
    def encoded(cls, body: bytes) -> DetectRequest:
        return cls("encoded", bytes(body))

    @classmethod
    def frame(cls, image: np.ndarray) -> DetectRequest:
        return cls("frame", image)

    @classmethod
    def letterboxed(cls, image: np.ndarray) -> DetectRequest:
        return cls("letterboxed", image)

    @classmethod
    def tensor(cls, row: np.ndarray) -> DetectRequest:
        return cls("tensor", row)


@dataclass(frozen=True)
class PreparedAhead:
    """An encoded item's pre-processing done while it waited for an engine, not inside its batch."""

    image: PreparedImage
    preprocess_s: float


@dataclass(frozen=True)
class StageTimings:
    """Seconds one item spent in each stage; ``inference_s`` is its whole batch's engine time."""

    queue_s: float = 0.0
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    postprocess_s: float = 0.0

    def to_ms(self) -> dict[str, float]:
        return {"queue": round(self.queue_s * 1000, 3), "preprocess": round(self.preprocess_s * 1000, 3),
                "inference": round(self.inference_s * 1000, 3), "postprocess": round(self.postprocess_s * 1000, 3)}


@dataclass(frozen=True)
class ServedVariant:
    """Which model version and fixed-batch variant ran an item."""

    model: str
    version: str
    backend: str
    batch_size: int


@dataclass(frozen=True)
class BatchSummary:
    """The batch an item ran in: its size, the variant, and each stage's wall time for the whole batch."""

    items: int
    variant: ServedVariant | None
    queue_s: float = 0.0  # mean over the batch's items
    preprocess_s: float = 0.0
    inference_s: float = 0.0
    postprocess_s: float = 0.0


@dataclass(frozen=True)
class ItemResult:
    """What one item gets back: detections (or the raw output row of a tensor item), or its own error."""

    detections: list[Detection] | None
    output: np.ndarray | None
    error: EdgebatchError | None
    timings: StageTimings
    batch: BatchSummary

    def unwrap(self) -> ItemResult:
        """The result itself, or its error raised: handles and ingresses pass errors as exceptions."""
        if self.error is not None:
            raise self.error
        return self

    def to_json(self) -> dict:
        """The ``/v1/detect`` reply body."""
        v = self.batch.variant
        return {
            "model": v.model if v else None,
            "version": v.version if v else None,
            "backend": v.backend if v else None,
            "batch_size": v.batch_size if v else None,
            "items_in_batch": self.batch.items,
            "detections": [d.to_json() for d in (self.detections or [])],
            "timings_ms": self.timings.to_ms(),
        }


@dataclass
class _Prepared:
    """An item after pre-processing: its letterboxed uint8 image (or a v2 float row), or why it has none."""

    tensor: np.ndarray | None
    letterbox: Letterbox | None
    preprocess_s: float
    error: EdgebatchError | None = None


def check_batch_results(items: Sequence[object], results: Sequence[object]) -> None:
    """The batch-length contract at the boundary (Ray Serve's ``_validate_results``): one result per item."""
    if len(results) != len(items):
        raise EdgebatchError(f"the batch handler returned {len(results)} results for {len(items)} requests; "
                             "this is a server bug, please report it")


class Detector:
    """One model version: its variant pool, pre- and post-processing, and the batch handler."""

    def __init__(
        self,
        config: DetectorConfig,
        loader: VariantLoader,
        *,
        labels: Sequence[str],
        input_size: tuple[int, int],
        model: str = "",
        version: str = "",
    ) -> None:
        self.model = model or config.model
        self.version = version
        self.labels = list(labels)
        self.input_size = input_size
        self.batch_sizes = list(config.batch_sizes)
        self.max_body_bytes = config.max_body_bytes
        self.max_image_pixels = config.max_image_pixels
        self.pool = VariantPool(loader, max_resident=config.resident_variants, instances=config.engine_instances)
        self.post = Postprocessor(labels, thresholds_of(config))
        self._cpu = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)),
                                       thread_name_prefix="edgebatch-cpu")
        self.batch_time_s = 0.0  # how long a batch takes here, as measured: an item must have this much left

    # -- lifecycle -------------------------------------------------------
    def variant_for(self, n: int) -> int:
        """Smallest allowed variant batch size that holds ``n`` items."""
        return next((s for s in self.batch_sizes if s >= n), self.batch_sizes[-1])

    def setup(self, max_batch_size: int) -> LoadedVariant:
        """Load and warm the variant for ``max_batch_size``, plus the smallest one when two may stay
        resident (so a lone request is not padded to the full batch)."""
        lv = self.pool.ensure(self.variant_for(max_batch_size))
        smallest = self.batch_sizes[0]
        if self.pool.max_resident >= 2 and smallest not in self.pool.loaded:
            self.pool.ensure(smallest)
        return lv

    def close(self) -> None:
        self.pool.close()
        self._cpu.shutdown(wait=False)

    def resident_preference(self, target: int) -> list[int]:
        """Which variants to keep when trimming: the target, the smallest, then the nearest others."""
        smallest = self.batch_sizes[0]
        others = sorted((s for s in self.pool.loaded if s not in (target, smallest)), key=lambda s: abs(s - target))
        return [target, smallest, *others] if smallest != target else [target, *others]

    # -- knobs (each owned here or by the object named) --------------------
    def set_max_batch_size(self, n: int) -> None:
        """Load the variant that holds ``n`` beside the others (raises, changing nothing, if it cannot),
        then trim the resident set to the preference around it."""
        target = self.variant_for(n)
        self.pool.ensure(target)
        _close_later(self.pool.retire(self.resident_preference(target)))

    def set_batch_sizes(self, sizes: Sequence[int]) -> None:
        """Which variants may be loaded; resident ones stay until the resident set is next trimmed."""
        self.batch_sizes = sorted(sizes)

    def set_resident_variants(self, n: int, max_batch_size: int) -> None:
        """Trim to ``n`` resident variants, or (growing to two or more) load the smallest as ``setup`` does."""
        self.pool.set_max_resident(n, self.resident_preference(self.variant_for(max_batch_size)))
        if n >= 2 and self.batch_sizes[0] not in self.pool.loaded:
            self.pool.ensure(self.batch_sizes[0])

    def set_engine_instances(self, n: int) -> None:
        self.pool.set_instances(n)

    def set_thresholds(self, settings: PostprocessSettings) -> None:
        self.post.set_thresholds(settings)

    def set_max_body_bytes(self, n: int) -> None:
        self.max_body_bytes = n

    def set_max_image_pixels(self, n: int) -> None:
        """Images whose header declares more pixels get a 400 before any pixel is decoded."""
        self.max_image_pixels = n

    def set_batch_time_s(self, seconds: float) -> None:
        """The measured time of one batch (the replica's running mean): an item whose deadline leaves less
        than this when its batch starts would be answered late, so it is refused unrun instead."""
        self.batch_time_s = max(0.0, float(seconds))

    # -- the batch handler ---------------------------------------------------
    def handle_batch(self, items: Sequence[DetectRequest]) -> list[ItemResult]:
        """Pre-process every item, run the engine once over the good rows, post-process, time it.

        A bad item (not an image, too large, wrong shape) gets an error result of its own and never
        fails the others; an engine failure raises for the whole batch."""
        t_start = time.perf_counter()
        try:
            prepared = list(self._cpu.map(self._prepare, items)) if len(items) > 1 else [self._prepare(items[0])]
        except RuntimeError:  # "cannot schedule new futures after shutdown": closed by a swap
            if self.pool.closed:
                raise DetectorRetired("this model version was swapped out under the batch") from None
            raise
        t_inf = time.perf_counter()
        good = [i for i, p in enumerate(prepared) if p.error is None]
        output, variant = None, None
        if good:
            batch = model_input([prepared[i].tensor for i in good])  # type: ignore[misc]  # good rows have one
            output, lv = self.predict(batch)
            if output.shape[0] != len(good):
                raise EdgebatchError(f"the engine returned {output.shape[0]} rows for a batch of {len(good)}; "
                                     "this is a server bug, please report it")
            variant = ServedVariant(self.model, self.version, lv.variant.backend, lv.batch_size)
        t_post = time.perf_counter()
        boxed = [k for k, i in enumerate(good) if items[i].kind not in RAW_OUTPUT_KINDS]
        dets = self.post.decode(output[boxed], [prepared[good[k]].letterbox for k in boxed]) if boxed else []
        t_end = time.perf_counter()
        queued = [_queued(it, t_start) for it in items]
        summary = BatchSummary(len(items), variant, sum(queued) / len(items), t_inf - t_start, t_post - t_inf,
                               t_end - t_post)
        post_share = summary.postprocess_s / max(1, len(boxed))
        dets_by_row = dict(zip(boxed, dets))
        row_of = {i: k for k, i in enumerate(good)}
        results: list[ItemResult] = []
        for i, (item, p) in enumerate(zip(items, prepared)):
            if p.error is not None:
                results.append(ItemResult(None, None, p.error, StageTimings(queued[i], p.preprocess_s), summary))
                continue
            k = row_of[i]
            raw = item.kind in RAW_OUTPUT_KINDS
            results.append(ItemResult(
                detections=None if raw else dets_by_row[k],
                output=output[k] if raw else None,  # type: ignore[index]  # good rows imply an output
                error=None,
                timings=StageTimings(queued[i], p.preprocess_s, summary.inference_s, 0.0 if raw else post_share),
                batch=summary,
            ))
        check_batch_results(items, results)
        return results

    def prepare_ahead(self, item: DetectRequest) -> DetectRequest:
        """Decode and letterbox an encoded image before its batch forms (in the replica, while the engine
        runs the batch before it), so the batch itself only normalises and infers. An image that cannot
        be decoded raises its 4xx here; other kinds come back as they are."""
        if item.kind != "encoded" or item.ahead is not None:
            return item
        t0 = time.perf_counter()
        if len(item.data) > self.max_body_bytes:
            raise self._too_large(item)
        image = prepare(item.data, self.input_size, max_pixels=self.max_image_pixels)
        done = time.perf_counter()
        # its time in the queue starts now: the preparation is counted once, as pre-processing (the
        # gateway's hop estimate subtracts the stages from the whole time)
        return dataclasses.replace(item, ahead=PreparedAhead(image, done - t0),
                                   enqueued_at=done if item.enqueued_at is not None else None)

    def submit_prepare_ahead(self, item: DetectRequest) -> Future[DetectRequest]:
        """``prepare_ahead`` in this detector's CPU pool (the one its batches decode in)."""
        return self._cpu.submit(self.prepare_ahead, item)

    def _prepare(self, item: DetectRequest) -> _Prepared:
        t0 = time.perf_counter()
        if item.expires_at is not None and t0 + self.batch_time_s > item.expires_at:  # it would be late: refuse, unrun
            waited = t0 - (item.enqueued_at or t0)
            late = "past" if t0 > item.expires_at else f"too close to ({self.batch_time_s:.2f} s batches) finish within"
            return _Prepared(None, None, 0.0, Overloaded(
                f"overloaded: waited {waited:.2f} s in the queue, {late} its {item.deadline_s or 0:.2f} s deadline; retry",
                retry_after_s=1.0, queue={"waited_s": round(waited, 3), "batch_s": round(self.batch_time_s, 4)}))
        try:
            tensor, letterbox = self._preprocess(item)
        except EdgebatchError as exc:
            return _Prepared(None, None, time.perf_counter() - t0, exc)
        ahead_s = item.ahead.preprocess_s if item.ahead is not None else 0.0
        return _Prepared(tensor, letterbox, time.perf_counter() - t0 + ahead_s)

    def _preprocess(self, item: DetectRequest) -> tuple[np.ndarray, Letterbox | None]:
        if item.kind == "tensor":
            row = np.asarray(item.data)
            want = (3, *self.input_size)
            if row.shape != want:
                raise BadRequest(f"input row has shape {list(row.shape)}; this model takes {list(want)}")
            return row.astype(np.float32, copy=False), None
        if item.kind == "letterboxed":
            image = np.asarray(item.data)
            want = (*self.input_size, 3)
            if image.shape != want or image.dtype != np.uint8:
                raise BadRequest(f"letterboxed image is {image.dtype} {list(image.shape)}; this model takes "
                                 f"uint8 {list(want)}")
            return image, None
        if item.ahead is not None and item.ahead.image.image.shape[:2] == tuple(self.input_size):
            return item.ahead.image.image, item.ahead.image.letterbox
        if item.kind == "encoded" and len(item.data) > self.max_body_bytes:
            raise self._too_large(item)
        prepared = prepare(item.data, self.input_size, max_pixels=self.max_image_pixels)
        return prepared.image, prepared.letterbox

    def _too_large(self, item: DetectRequest) -> PayloadTooLarge:
        return PayloadTooLarge(f"body of {len(item.data)} bytes exceeds max_body_bytes={self.max_body_bytes}; "
                               "send a smaller image or raise max_body_bytes in the deployment's user_config")

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, LoadedVariant]:
        """Run the batch; returns the output and the (largest) variant that ran it."""
        for _ in range(8):  # a swap retires at most a few variants; each retry sees the newer publish
            if self.pool.closed:
                raise DetectorRetired("this model version was swapped out under the batch")
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
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)[: batch.shape[0]]


def model_input(rows: Sequence[np.ndarray]) -> np.ndarray:
    """The engine's (N, 3, H, W) float32 batch: letterboxed uint8 images are normalised together in one
    vectorised call; v2 float rows (already model input) are copied in at their places."""
    images = [k for k, r in enumerate(rows) if r.dtype == np.uint8]
    if len(images) == len(rows):
        return to_input(rows)
    floats = [k for k, r in enumerate(rows) if r.dtype != np.uint8]
    batch = np.empty((len(rows), *rows[floats[0]].shape), dtype=np.float32)
    batch[floats] = [rows[k] for k in floats]
    if images:
        batch[images] = to_input([rows[k] for k in images])
    return batch


def _queued(item: DetectRequest, t_start: float) -> float:
    return max(t_start - item.enqueued_at, 0.0) if item.enqueued_at is not None else 0.0


def thresholds_of(config: DetectorConfig) -> PostprocessSettings:
    return PostprocessSettings(conf=config.conf_threshold, iou=config.iou_threshold, max_det=config.max_detections,
                               layout=config.layout)
