"""The detector replica: Serve's batcher in front of ``Detector.handle_batch``, reached by handles only.

``DetectorReplica`` owns the batcher, the model's variant pool (through ``app.detector``),
``reconfigure``, the deadline admission and the stats; it has no HTTP routes. The ``edgebatch``
app serves it over HTTP through the gateway in ``deployments/gateway.py`` (its own deployment, so
a replica that dies under a request is answered in JSON and retried); tenancy deploys it as it
is, one deployment per placement.

Every caller (HTTP v1 and v2, stream readers, the tenancy router) submits ``DetectRequest``
items with ``detect``; ``@serve.batch`` forms batches across all of them and runs the core's
``handle_batch`` in a thread, up to ``engine_instances + 1`` batches at once (the next batch is at the
engine when the current one ends). An encoded image is decoded and letterboxed when it arrives
(``Detector.prepare_ahead``), while the engines run earlier batches, and a ``BatchGate`` lets a batch
be sealed only when a slot can start it, with everything that waited meanwhile.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ray import serve

from app.config import DetectorConfig, parse_config
from app.detector import Detector, DetectorRetired, DetectRequest, ItemResult, thresholds_of
from app.errors import EdgebatchError, Overloaded, Unavailable, one_line
from app.monitoring.appmetrics import AppMetrics
from app.oip import ModelSignature, TensorSpec
from app.overload import QueueState, ServiceRate, admit
from app.replica_status import ConfigRefusal, DetectorInfo, DetectorStats, LoadFailure, SwapRecord, VariantInfo
from app.state import StateDir
from model_registry.source import RegistryModelSource, ResolvedModel

log = logging.getLogger("ray.serve")

# user_config fields that select the model or how its engines are built: a change loads a new Detector
MODEL_FIELDS = ("model", "version", "alias", "backend", "labels", "tracking_uri", "intra_op_threads",
                "intra_op_spinning")
THRESHOLD_FIELDS = ("conf_threshold", "iou_threshold", "max_detections", "layout")


class ExportedMetrics:
    """The detector's application metrics as Ray Serve metrics (``ray_edgebatch_*`` on the export
    port); Serve adds the deployment, replica and application tags, we add the model."""

    def __init__(self) -> None:
        from ray.serve import metrics

        keys = ("model",)
        self.batch_size = metrics.Histogram("edgebatch_batch_size", description="items per formed batch",
                                            boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=keys)
        self.d_batch = metrics.Histogram("edgebatch_d_batch_seconds", description="batch delay: pre + infer + post",
                                         boundaries=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0], tag_keys=keys)
        self.queue_len = metrics.Gauge("edgebatch_queue_length", description="items waiting for the batcher", tag_keys=keys)
        self.max_batch_size = metrics.Gauge("edgebatch_max_batch_size", description="batch size in force", tag_keys=keys)
        self.throughput = metrics.Gauge("edgebatch_throughput_items_per_s", description="items/s over the window", tag_keys=keys)
        self.d_batch_mean = metrics.Gauge("edgebatch_d_batch_mean_seconds", description="mean batch delay over the window", tag_keys=keys)
        self.stage = metrics.Gauge("edgebatch_stage_mean_seconds", description="mean delay per stage over the window",
                                   tag_keys=("model", "stage"))
        self.drops = metrics.Counter("edgebatch_dropped_total", description="requests or frames dropped", tag_keys=("model", "reason"))


class BatchGate:
    """Holds items back from Serve's batcher while every engine slot is taken.

    ``@serve.batch`` seals a batch as soon as its wait timeout passes and only then queues it for its
    concurrency semaphore, so under load it seals batches of one or two that wait behind the running
    one (measured: mean batch 1.0-1.7 with two 30 fps streams). Behind this gate, no more items wait
    inside Serve's batcher than the free slots can start at once: the others wait here, and when a
    batch ends they go in together and form the next batch, as large as the backlog allows.
    """

    def __init__(self, max_batch_size: int, slots: int) -> None:
        self.max_batch_size = max_batch_size
        self.slots = slots
        self.running = 0  # batches started and not ended
        self._inside: set[int] = set()  # items (by id) in Serve's batcher whose batch has not started
        self._waiters: dict[int, asyncio.Future] = {}  # in arrival order

    def _room(self) -> bool:
        return len(self._inside) < self.max_batch_size * max(0, self.slots - self.running)

    async def enter(self, key: int) -> None:
        """Wait (first come, first served) until the item may go into Serve's batcher."""
        if not self._waiters and self._room():
            self._inside.add(key)
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[key] = waiter
        await waiter  # cancelled: ``leave`` (the caller's finally) forgets the key

    def leave(self, key: int) -> None:
        """The item is done (answered, failed or cancelled): if no batch took it, it frees its place."""
        self._inside.discard(key)
        self._waiters.pop(key, None)
        self._wake()

    def started(self, keys: list[int]) -> None:
        self._inside.difference_update(keys)
        self.running += 1
        self._wake()

    def ended(self) -> None:
        self.running -= 1
        self._wake()

    def set_limits(self, max_batch_size: int, slots: int) -> None:
        self.max_batch_size, self.slots = max_batch_size, slots
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._room():
            key = next(iter(self._waiters))
            waiter = self._waiters.pop(key)
            if not waiter.done():
                self._inside.add(key)
                waiter.set_result(None)


class Batcher:
    """Serve's ``@serve.batch`` around the replica's batch handler, behind a ``BatchGate``; the one owner
    of the batch size, the wait timeout and the number of concurrent batches."""

    def __init__(self, handler: Callable[[list[DetectRequest]], Awaitable[list[ItemResult]]], *,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005, max_concurrent_batches: int = 1) -> None:
        self._handler = handler
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.waiting = 0  # items handed to the batcher and not yet in a batch
        self.gate = BatchGate(max_batch_size, max_concurrent_batches)
        self._batched = self._make()

    def _make(self) -> Callable[[DetectRequest], Awaitable[ItemResult]]:
        async def handle(items: list[DetectRequest]) -> list[ItemResult]:
            self.gate.started([id(it) for it in items])
            try:
                return await self._handler(items)
            finally:
                self.gate.ended()

        return serve.batch(max_batch_size=self.max_batch_size, batch_wait_timeout_s=self.batch_wait_timeout_s,
                           max_concurrent_batches=self.max_concurrent_batches)(handle)

    async def submit(self, item: DetectRequest) -> ItemResult:
        self.waiting += 1
        key = id(item)
        try:
            await self.gate.enter(key)
            return await self._batched(item)
        finally:
            self.gate.leave(key)
            self.waiting -= 1

    def set_max_batch_size(self, n: int) -> None:
        self.max_batch_size = n
        self._batched.set_max_batch_size(n)
        self.gate.set_limits(n, self.max_concurrent_batches)

    def set_batch_wait_timeout_s(self, seconds: float) -> None:
        self.batch_wait_timeout_s = seconds
        self._batched.set_batch_wait_timeout_s(seconds)

    def set_max_concurrent_batches(self, n: int) -> None:
        """Serve fixes a batcher's concurrency when it is made: new items go to a new one, while the
        old one finishes the batches it holds (its queue then stays empty)."""
        if n != self.max_concurrent_batches:
            self.max_concurrent_batches = n
            self._batched = self._make()
            self.gate.set_limits(self.max_batch_size, n)


def _running_replicas() -> int:
    """RUNNING replicas of this replica's deployment (Serve's own count); 1 when it cannot be read."""
    try:
        ctx = serve.get_replica_context()
        dep = serve.status().applications[ctx.app_name].deployments[ctx.deployment]
        return max(1, sum(n for state, n in dep.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING"))
    except Exception:
        return 1


@dataclass(frozen=True)
class IngressSettings:
    """The part of a detector's config its HTTP gateway applies (body limit, token, deadlines)."""

    max_body_bytes: int
    auth_inference: bool
    deadline_s: float
    max_deadline_s: float
    loaded: bool
    queue: QueueState  # the replica's own, for the gateway's first admission check
    running_replicas: int  # of this deployment: the gateway drains its outstanding items at queue rate x this

@dataclass(frozen=True)
class ReplicaLocation:
    """Which deployment (= placement), Ray node and process served a request."""

    deployment: str
    node_id: str
    pid: int


@dataclass(frozen=True)
class PlacedResult:
    """A tenancy placement's answer: the item's result and where it ran."""

    result: ItemResult
    served_by: ReplicaLocation


class DetectorReplica:
    """One model per replica; reconfigured live by ``serve deploy`` (user_config) or the controller."""

    def __init__(self) -> None:
        self._state = StateDir.default()
        self._batch_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgebatch-batch")
        self.batcher = Batcher(self._run_batch)
        self._detector: Detector | None = None
        self._model: ResolvedModel | None = None
        self._source: RegistryModelSource | None = None
        self._config: DetectorConfig | None = None
        self._reconfigure_lock = asyncio.Lock()
        self._alias_task: asyncio.Task | None = None
        self._counters = {"requests": 0, "errors": 0, "refused": 0, "batches": 0, "items": 0}
        self._batch_sizes_seen: dict[int, int] = {}
        self._last_swap: SwapRecord | None = None
        self._last_load_failure: LoadFailure | None = None
        self._config_refused: ConfigRefusal | None = None
        self._metrics = AppMetrics(window_s=10.0)  # what the batch controller decides on
        self._exported: ExportedMetrics | None = None
        self._exported_at = 0.0
        self._batch_size_changed_at = self._metrics.now()
        self._rate = ServiceRate()  # what the admission check drains the queue at
        self._replicas_seen = (-1e9, 1)  # (when, how many): for the gateway's admission
        self._replicas_reading = threading.Lock()
        self._preparing = 0  # items being decoded ahead of the batcher

    # -- configuration ------------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Apply a ``user_config``. The first one must be good (raising makes Serve report it); a bad one
        later is refused while the replica keeps serving the last good one: Serve would otherwise stop
        the replica and leave the deployment with none (issue 12)."""
        try:
            config = parse_config(DetectorConfig, user_config, "user_config")
            async with self._reconfigure_lock:
                await self._apply_config(config)
        except Exception as exc:  # after a good config, nothing may escape: Serve would stop this replica
            if self._config is None:
                raise
            if not isinstance(exc, EdgebatchError):
                log.exception("user_config could not be applied")
            self._refuse(user_config, one_line(exc))
            return
        self._config_refused = None
        if config.alias and not config.version and config.alias_poll_s > 0 and self._alias_task is None:
            self._alias_task = asyncio.get_running_loop().create_task(self._follow_alias())

    def _refuse(self, user_config: dict[str, Any], reason: str) -> None:
        serving = self._config.model_dump() if self._config else {}
        refused = {k: v for k, v in (user_config or {}).items() if serving.get(k, object()) != v}
        self._config_refused = ConfigRefusal(reason=reason, at=time.time(), refused=refused,
                                             serving={k: serving.get(k) for k in refused})
        log.error("user_config refused, still serving the last good one: %s (refused %s)", reason, refused)

    async def _apply_config(self, config: DetectorConfig) -> None:
        """Diff against the config in force and call each knob's setter; the ones that load variants
        go first, so a failure leaves the cheap knobs (and the batcher) as they were."""
        old = self._config
        loop = asyncio.get_running_loop()
        if old is None or any(getattr(old, f) != getattr(config, f) for f in MODEL_FIELDS):
            source = RegistryModelSource(config, self._state, spare_cores=1)
            model = await loop.run_in_executor(None, source.resolve)
            await self._swap_in(config, source, model)
        else:
            detector = self._require_detector()
            if old.batch_sizes != config.batch_sizes:
                detector.set_batch_sizes(config.batch_sizes)
            if old.max_batch_size != config.max_batch_size:
                await loop.run_in_executor(None, detector.set_max_batch_size, config.max_batch_size)
            if old.resident_variants != config.resident_variants:
                await loop.run_in_executor(None, detector.set_resident_variants, config.resident_variants,
                                           config.max_batch_size)
            if old.engine_instances != config.engine_instances:
                if self._source is not None:
                    self._source.set_engine_instances(config.engine_instances)
                await loop.run_in_executor(None, detector.set_engine_instances, config.engine_instances)
            if any(getattr(old, f) != getattr(config, f) for f in THRESHOLD_FIELDS):
                detector.set_thresholds(thresholds_of(config))
            if old.max_body_bytes != config.max_body_bytes:
                detector.set_max_body_bytes(config.max_body_bytes)
            if old.max_image_pixels != config.max_image_pixels:
                detector.set_max_image_pixels(config.max_image_pixels)
        self._set_concurrent_batches(config.engine_instances + 1)
        self.batcher.set_max_batch_size(config.max_batch_size)
        self.batcher.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self._config = config
        if old is None or old.max_batch_size != config.max_batch_size:
            self._batch_size_changed_at = self._metrics.now()  # the controller's windows start here

    def _set_concurrent_batches(self, n: int) -> None:
        """The batcher's concurrency and the threads that run its batches move together."""
        if n == self.batcher.max_concurrent_batches:
            return
        old, self._batch_pool = self._batch_pool, ThreadPoolExecutor(max_workers=n, thread_name_prefix="edgebatch-batch")
        self.batcher.set_max_concurrent_batches(n)
        old.shutdown(wait=False)  # its running batches finish; it takes no new ones

    async def _swap_in(self, config: DetectorConfig, source: RegistryModelSource, model: ResolvedModel) -> None:
        """Load a (new) model version beside the serving one, warm it, then switch in one assignment;
        the old version's ``in_use`` mark is released once nothing routes to it."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        detector = Detector(config, source.loader(model), labels=model.labels, input_size=model.input_size,
                            model=model.name, version=model.version)
        await loop.run_in_executor(None, detector.setup, config.max_batch_size)
        old, old_model, old_source = self._detector, self._model, self._source
        self._detector, self._model, self._source = detector, model, source
        self._last_swap = SwapRecord(model.version, round(time.perf_counter() - t0, 3), time.time())
        await loop.run_in_executor(None, self._mark_usage, source, model, old_source, old_model)
        if old is not None:
            await loop.run_in_executor(None, old.close)  # each variant closes once its in-flight batches are done

    def _mark_usage(self, source: RegistryModelSource, model: ResolvedModel,
                    old_source: RegistryModelSource | None, old_model: ResolvedModel | None) -> None:
        """Registry ``in_use`` tags: informational, so a registry hiccup never fails a swap."""
        deployment = self._deployment_id()
        try:
            source.repo.mark_in_use(model.name, model.version, deployment)
            if old_model is not None and old_source is not None and (old_model.name, old_model.version) != (model.name, model.version):
                old_source.repo.release(old_model.name, old_model.version, deployment)
        except Exception as exc:
            log.warning("could not record model usage: %s", exc)

    async def set_batch_size(self, max_batch_size: int, batch_wait_timeout_s: float | None = None) -> DetectorInfo:
        """Operator/controller path: load the variant beside the others, then move the batcher to it.

        A load failure (memory) leaves the current size and variant in place and raises to the caller.
        """
        if self._config is None:
            raise Unavailable("the detector is still loading its model; retry shortly")
        update: dict[str, Any] = {"max_batch_size": int(max_batch_size)}
        if batch_wait_timeout_s is not None:
            update["batch_wait_timeout_s"] = float(batch_wait_timeout_s)
        config = parse_config(DetectorConfig, {**self._config.model_dump(), **update}, "batch")
        async with self._reconfigure_lock:
            previous = self._config.max_batch_size
            try:
                await self._apply_config(config)
            except EdgebatchError as exc:
                self._last_load_failure = LoadFailure(int(max_batch_size), exc.message, time.time(), previous)
                log.warning("batch size %d not applied, still serving %d: %s", max_batch_size, previous, exc.message)
                raise
        return self.info()

    async def _follow_alias(self) -> None:
        """Roll to the version an alias points at, without a failed request."""
        loop = asyncio.get_running_loop()
        while True:
            config = self._config
            if config is None or config.version or not config.alias or config.alias_poll_s <= 0:
                self._alias_task = None
                return
            await asyncio.sleep(config.alias_poll_s)
            try:
                await self._check_alias(loop)
            except EdgebatchError as exc:
                log.warning("alias check failed, still serving v%s: %s", self._model and self._model.version, exc.message)
            except Exception as exc:  # the registry may be down: keep serving the cached variant
                log.warning("alias check failed, still serving: %s", exc)

    async def _check_alias(self, loop: asyncio.AbstractEventLoop) -> None:
        config, source = self._config, self._source
        if config is None or source is None or self._model is None or config.version or not config.alias:
            return
        version = await loop.run_in_executor(None, lambda: source.repo.resolve(config.model, alias=config.alias))
        if version == self._model.version:
            return
        async with self._reconfigure_lock:
            if self._config is not config:  # reconfigured meanwhile: the next check sees the new one
                return
            model = await loop.run_in_executor(None, source.resolve)
            await self._swap_in(config, source, model)
            log.info("alias %s moved: now serving %s v%s", config.alias, model.name, model.version)

    def _deployment_id(self) -> str:
        try:
            ctx = serve.get_replica_context()
            return f"{ctx.app_name}.{ctx.deployment}"
        except Exception:
            return "local"

    # -- the batch stage ---------------------------------------------------
    async def _run_batch(self, items: list[DetectRequest]) -> list[ItemResult]:
        """Serve's batch handler: the core's ``handle_batch`` in a thread, then the window's records."""
        loop = asyncio.get_running_loop()
        for _ in range(3):  # a model swap closes the old Detector under at most the batches in flight
            detector = self._require_detector()
            try:
                results = await loop.run_in_executor(self._batch_pool, detector.handle_batch, items)
            except DetectorRetired:
                if self._detector is detector:
                    raise
                continue
            self._record_batch(results)
            return results
        raise Unavailable("the model was swapped several times under this batch; retry")

    def queue_state(self) -> QueueState:
        return QueueState(waiting=self.batcher.waiting + self._preparing, capacity_items_s=self._rate.capacity_items_s,
                          d_batch_s=self._rate.d_batch_s, max_batch_size=self.batcher.max_batch_size,
                          concurrent_batches=self.batcher.max_concurrent_batches)

    async def detect(self, request: DetectRequest) -> ItemResult:
        """The one entry of every caller: an item into the shared batcher; its error is raised.

        An item that cannot be done within its budget (the caller's, else ``deadline_s``) is refused at
        once (``Overloaded``), and one whose budget runs out while it waits is refused unrun."""
        self._require_detector()
        self._counters["requests"] += 1
        config = self._config or DetectorConfig()
        budget = min(request.deadline_s, config.max_deadline_s) if request.deadline_s else config.deadline_s
        try:
            admit(self.queue_state(), budget)
            now = time.perf_counter()
            item = dataclasses.replace(request, enqueued_at=now, deadline_s=budget, expires_at=now + budget)
            item = await self._prepare_ahead(item)
            return (await self.batcher.submit(item)).unwrap()
        except Overloaded:
            self._counters["refused"] += 1
            self._record_drop("overloaded")
            raise
        except EdgebatchError as exc:
            self._counters["errors"] += 1
            self._record_drop(type(exc).__name__)
            raise
        except Exception:
            self._counters["errors"] += 1
            self._record_drop("internal")
            raise

    async def _prepare_ahead(self, item: DetectRequest) -> DetectRequest:
        """Decode an encoded image now, in the detector's CPU pool, while the engine runs other batches."""
        if item.kind != "encoded":
            return item
        self._preparing += 1
        try:
            return await asyncio.wrap_future(self._require_detector().submit_prepare_ahead(item))
        except RuntimeError:  # that detector was closed by a swap meanwhile: its batch prepares it
            return item
        finally:
            self._preparing -= 1

    async def detect_placed(self, request: DetectRequest) -> PlacedResult:
        """``detect`` for the tenancy router, which also reports which placement and node served it."""
        return PlacedResult(await self.detect(request), self.where())

    def where(self) -> ReplicaLocation:
        import ray

        ctx = serve.get_replica_context()
        return ReplicaLocation(ctx.deployment, ray.get_runtime_context().get_node_id(), os.getpid())

    def _record_batch(self, results: list[ItemResult]) -> None:
        """Feed the window recorder and Ray's metrics; never fails a batch."""
        try:
            b = results[0].batch
            self._counters["batches"] += 1
            self._counters["items"] += b.items
            self._batch_sizes_seen[b.items] = self._batch_sizes_seen.get(b.items, 0) + 1
            waiting = max(self.batcher.waiting - b.items, 0)
            self._rate.observe(b.items, b.preprocess_s + b.inference_s + b.postprocess_s,
                               concurrent=self._detector.pool.instances if self._detector else 1,
                               now=time.monotonic(), backlog=waiting)
            batch_time = self._rate.batch_time_s()
            if self._detector is not None and batch_time is not None:
                self._detector.set_batch_time_s(batch_time)
            variant_size = b.variant.batch_size if b.variant else 0
            self._metrics.record_batch(b.items, variant_size, b.queue_s, b.preprocess_s, b.inference_s,
                                       b.postprocess_s, waiting)
            self._export(b.items, b.preprocess_s + b.inference_s + b.postprocess_s, waiting)
        except Exception as exc:  # metrics must never cost a request
            log.debug("metrics not recorded: %s", exc)

    def _exported_metrics(self) -> tuple[ExportedMetrics, dict[str, str]]:
        """Ray's metric objects (made on first use, inside the replica) and this model's tag."""
        if self._exported is None:
            self._exported = ExportedMetrics()
        return self._exported, {"model": self._config.model if self._config else "unknown"}

    def _export(self, n: int, d_batch_s: float, waiting: int) -> None:
        exported, tags = self._exported_metrics()
        exported.batch_size.observe(n, tags=tags)
        exported.d_batch.observe(d_batch_s, tags=tags)
        exported.queue_len.set(waiting, tags=tags)
        now = time.monotonic()
        if now - self._exported_at >= 1.0:  # window gauges at most once a second
            self._exported_at = now
            snap = self._metrics.snapshot(since=self._batch_size_changed_at)
            exported.throughput.set(snap["throughput"], tags=tags)
            exported.d_batch_mean.set(snap["d_batch_s"], tags=tags)
            if self._config is not None:
                exported.max_batch_size.set(self._config.max_batch_size, tags=tags)
            for stage, figures in snap["stages"].items():
                exported.stage.set(figures["mean_s"], tags={**tags, "stage": stage})

    def _record_drop(self, reason: str) -> None:
        self._metrics.record_drop(reason)
        try:
            exported, tags = self._exported_metrics()
            exported.drops.inc(tags={**tags, "reason": reason})
        except Exception as exc:  # metrics must never cost a request
            log.debug("drop not exported: %s", exc)

    # -- status ----------------------------------------------------------------
    def _require_detector(self) -> Detector:
        if self._detector is None:
            raise Unavailable("the detector is still loading its model; retry shortly")
        return self._detector

    def model(self) -> ResolvedModel:
        """The model version in force (the v2 ingress checks names and versions against it)."""
        self._require_detector()
        assert self._model is not None  # set together with the detector
        return self._model

    def signature(self) -> ModelSignature:
        """The model's Open Inference Protocol v2 signature (the gateway checks names and shapes with it)."""
        m = self.model()
        lv = self._require_detector().pool.pick(1)
        return ModelSignature(
            name=m.name,
            versions=[m.version],
            platform="onnxruntime_onnx" if lv.variant.backend == "onnx" else lv.variant.backend,
            inputs=[TensorSpec("images", "FP32", [-1, 3, m.input_size[0], m.input_size[1]])],
            outputs=[TensorSpec("output0", "FP32", [-1, *lv.output_shape[1:]])],
            max_batch_size=max(self._config.batch_sizes) if self._config else 16,
        )

    def _running_replicas(self) -> int:
        """Serve's count of this deployment's RUNNING replicas, read at most every 5 s (a controller call)."""
        at, n = self._replicas_seen
        if time.monotonic() - at > 5.0 and self._replicas_reading.acquire(blocking=False):
            try:  # one thread asks the controller; the others keep the last count meanwhile
                n = _running_replicas()
                self._replicas_seen = (time.monotonic(), n)
            finally:
                self._replicas_reading.release()
        return n

    def ingress_settings(self) -> IngressSettings:
        """What the HTTP gateway enforces before a body reaches this replica (from the live user_config)."""
        c = self._config or DetectorConfig()
        return IngressSettings(max_body_bytes=c.max_body_bytes, auth_inference=c.auth_inference,
                               deadline_s=c.deadline_s, max_deadline_s=c.max_deadline_s,
                               loaded=self._detector is not None, queue=self.queue_state(),
                               running_replicas=self._running_replicas())

    def stats(self, stream_fps: float | None = None, since: float | None = None) -> DetectorStats:
        """The controller's reading: the window snapshot (cut at the last batch-size change), the size
        in force, the resident variants and the last load failure."""
        import ray

        cut = self._batch_size_changed_at if since is None else max(since, self._batch_size_changed_at)
        info = self.info()
        return DetectorStats(
            model=info.model, version=info.version, max_batch_size=info.max_batch_size,
            batch_sizes=list(self._config.batch_sizes) if self._config else [],
            loaded_variants=sorted(info.loaded_variants),
            resident_bytes={s: v.memory_bytes for s, v in info.loaded_variants.items()},
            last_load_failure=self._last_load_failure, batch_size_changed_at=self._batch_size_changed_at,
            node_id=ray.get_runtime_context().get_node_id(), pid=os.getpid(),
            metrics=self._metrics.snapshot(stream_fps, since=cut),
        )

    def info(self) -> DetectorInfo:
        """Status for `edgebatch status`, `GET /v1/info`, the controller and the streams app."""
        d, m, c = self._detector, self._model, self._config
        loaded = {}
        if d is not None:
            for size, lv in sorted(d.pool.loaded.items()):
                loaded[size] = VariantInfo(lv.variant.backend, lv.engine.device, lv.memory_bytes(), len(lv.instances),
                                           round(lv.load_s, 3), lv.variant.sha256[:12], round(lv.run_s, 6))
        return DetectorInfo(
            model=m.name if m else (c.model if c else None),
            version=m.version if m else None,
            alias=c.alias if c and not c.version else None,
            pinned_version=c.version if c else None,
            backend=c.backend if c else None,
            max_batch_size=self.batcher.max_batch_size if c else None,
            batch_wait_timeout_s=self.batcher.batch_wait_timeout_s if c else None,
            engine_instances=d.pool.instances if d else None,
            resident_variants=d.pool.max_resident if d else None,
            loaded_variants=loaded,
            labels=list(m.labels) if m else [],
            postprocess=d.post.settings if d else None,  # stream readers decode exactly as /v1/detect does
            input_size=tuple(m.input_size) if m else None,
            counters=dict(self._counters),
            batch_sizes_seen=dict(self._batch_sizes_seen),
            last_swap=self._last_swap,
            last_load_failure=self._last_load_failure,
            config_refused=self._config_refused,
            pid=os.getpid(),
        )
