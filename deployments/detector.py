"""The detector deployment: HTTP ingress (/v1 and Open Inference Protocol v2) and the batcher.

Three stages per replica, so the engine never waits on the CPU:
pre-processing runs per request in a CPU thread pool; ``@serve.batch`` forms
batches across concurrent requests and runs the engine in one dedicated
inference thread; post-processing runs per request back in the CPU pool while
the next batch is already on the engine. ``max_ongoing_requests`` bounds the
queue in front of the batcher.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from app.config import DetectorConfig, parse_config
from app.detector import BatchResult, Detector
from app.errors import BadRequest, EdgebatchError, NotFound, Unavailable
from app.monitoring.appmetrics import AppMetrics
from app.security.auth import TokenCheck
from app.state import StateDir
from deployments.decoding import V2BodyDecoder
from deployments.http import error_response, error_responses, read_body
from model_registry.source import RegistryModelSource, ResolvedModel

log = logging.getLogger("ray.serve")

api = FastAPI(title="edgebatch", description="Batched object detection on Ray Serve")

#: The OpenAPI descriptions of what the routes really take and answer (for clients and fuzzers).
DETECT_BODY = {"requestBody": {"required": True, "content": {
    t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "application/octet-stream")}}}
V2_INFER_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"type": "object", "required": ["name", "datatype", "shape"],
                       "properties": {"name": {"type": "string"}, "datatype": {"type": "string"},
                                      "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                      "data": {"type": "array"}, "parameters": {"type": "object"}}}},
            "outputs": {"type": "array", "items": {"type": "object"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "binary tensor data extension: the first "
                                                    "Inference-Header-Content-Length bytes are the JSON header"}}},
    "parameters": [{"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0}}],
}
V2_INFER_RESPONSES = {
    200: {"description": "the outputs: JSON, or JSON header plus raw tensors (binary extension)",
          "content": {"application/json": {"schema": {"type": "object"}},
                      "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
    **error_responses(400, 401, 404, 413, 503),
}


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


@serve.deployment(name="Detector", max_ongoing_requests=64)
@serve.ingress(api)
class DetectorDeployment:
    """One model per replica; reconfigured live by ``serve deploy`` (user_config) or the controller."""

    def __init__(self) -> None:
        self._state = StateDir.default()
        self._token = TokenCheck(self._state)
        self._cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgebatch-cpu")
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgebatch-engine")
        self._v2_decoder = V2BodyDecoder(self._cpu_pool)
        self._batcher = self._make_batcher(1)
        self._instances = 1
        self._detector: Detector | None = None
        self._model: ResolvedModel | None = None
        self._config: DetectorConfig | None = None
        self._reconfigure_lock = asyncio.Lock()
        self._alias_task: asyncio.Task | None = None
        self._counters = {"requests": 0, "errors": 0, "batches": 0, "items": 0}
        self._batch_sizes_seen: dict[int, int] = {}
        self._last_swap: dict[str, Any] | None = None
        self._metrics = AppMetrics(window_s=10.0)  # what the batch controller decides on
        self._exported: ExportedMetrics | None = None
        self._exported_at = 0.0
        self._waiting = 0  # items handed to the batcher and not yet in a batch
        self._last_load_failure: dict[str, Any] | None = None
        self._batch_size_changed_at = self._metrics.now()

    # -- configuration --------------------------------------------------
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = parse_config(DetectorConfig, user_config, "user_config")
        async with self._reconfigure_lock:
            await self._apply_config(config)
        if config.alias and not config.version and config.alias_poll_s > 0 and self._alias_task is None:
            self._alias_task = asyncio.get_running_loop().create_task(self._follow_alias())

    async def _apply_config(self, config: DetectorConfig) -> None:
        old = self._config
        model_changed = old is None or any(
            getattr(old, f) != getattr(config, f)
            for f in ("model", "version", "alias", "backend", "labels", "tracking_uri", "intra_op_threads",
                      "intra_op_spinning")
        )
        loop = asyncio.get_running_loop()
        if model_changed:
            source = self._source(config)
            model = await loop.run_in_executor(None, source.resolve)
            await self._swap_in(config, source, model)
        else:
            assert self._detector is not None
            # load the variant for the new size beside the others before the batcher may form such batches
            await loop.run_in_executor(None, self._detector.pool.ensure, config.variant_for(config.max_batch_size))
            self._detector.config = config
            self._retire_unused(config)
        self._config = config
        if config.engine_instances != self._instances:
            # a new batcher with that many concurrent batches; the old one drains what it holds
            self._infer_pool = ThreadPoolExecutor(max_workers=config.engine_instances, thread_name_prefix="edgebatch-engine")
            self._batcher = self._make_batcher(config.engine_instances)
            self._instances = config.engine_instances
        self._batcher.set_max_batch_size(config.max_batch_size)
        self._batcher.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        if old is None or old.max_batch_size != config.max_batch_size:
            self._batch_size_changed_at = self._metrics.now()  # the controller's windows start here

    def _source(self, config: DetectorConfig) -> RegistryModelSource:
        # a replica leaves one core to decoding, NMS and HTTP beside the engine
        return RegistryModelSource(config, self._state, spare_cores=1)

    async def _swap_in(self, config: DetectorConfig, source: RegistryModelSource, model: ResolvedModel) -> None:
        """Load a (new) model version beside the serving one, warm it, then switch in one assignment."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        detector = Detector(config, source.loader(model), labels=model.labels, input_size=model.input_size)
        await loop.run_in_executor(None, detector.setup)
        old, self._detector, self._model = self._detector, detector, model
        try:
            await loop.run_in_executor(None, source.repo.mark_in_use, model.name, model.version, self._deployment_id())
        except Exception as exc:  # usage marks are informational; never fail a swap on them
            log.warning("could not record model usage: %s", exc)
        self._last_swap = {"to_version": model.version, "seconds": round(time.perf_counter() - t0, 3), "at": time.time()}
        if old is not None:
            # each close waits for its engines to come back from in-flight batches
            threading.Thread(target=old.pool.close, name="edgebatch-retire", daemon=True).start()

    def _retire_unused(self, config: DetectorConfig) -> None:
        assert self._detector is not None
        target = config.variant_for(config.max_batch_size)
        pool = self._detector.pool
        for lv in pool.retire(self._detector.resident_preference(target)):
            threading.Thread(target=lv.close, name="edgebatch-retire", daemon=True).start()

    async def set_batch_size(self, max_batch_size: int, batch_wait_timeout_s: float | None = None) -> dict:
        """Operator/controller path: load the variant beside the others, then move the batcher to it.

        A load failure (memory) leaves the current size and variant in place and raises to the caller.
        """
        if self._config is None:
            raise Unavailable("the detector is still loading its model; retry shortly")
        update = {"max_batch_size": int(max_batch_size)}
        if batch_wait_timeout_s is not None:
            update["batch_wait_timeout_s"] = float(batch_wait_timeout_s)
        config = parse_config(DetectorConfig, {**self._config.model_dump(), **update}, "batch")
        async with self._reconfigure_lock:
            previous = self._config.max_batch_size
            try:
                await self._apply_config(config)
            except EdgebatchError as exc:
                self._last_load_failure = {"batch_size": int(max_batch_size), "error": exc.message, "at": time.time(),
                                           "kept_batch_size": previous}
                log.warning("batch size %d not applied, still serving %d: %s", max_batch_size, previous, exc.message)
                raise
        return self.info()

    async def _follow_alias(self) -> None:
        """Roll to the version an alias points at, without a failed request."""
        loop = asyncio.get_running_loop()
        while True:
            config = self._config
            if config is None or config.version or not config.alias or config.alias_poll_s <= 0:
                return
            await asyncio.sleep(config.alias_poll_s)
            try:
                source = self._source(config)
                version = await loop.run_in_executor(None, source.repo.resolve, config.model, None, config.alias)
                if self._model is not None and version != self._model.version:
                    async with self._reconfigure_lock:
                        model = await loop.run_in_executor(None, source.resolve)
                        await self._swap_in(config, source, model)
                        log.info("alias %s moved: now serving %s v%s", config.alias, model.name, model.version)
            except EdgebatchError as exc:
                log.warning("alias check failed, still serving v%s: %s", self._model and self._model.version, exc.message)
            except Exception as exc:  # the registry may be down: keep serving the cached variant
                log.warning("alias check failed, still serving: %s", exc)

    def _deployment_id(self) -> str:
        try:
            ctx = serve.get_replica_context()
            return f"{ctx.app_name}.{ctx.deployment}"
        except Exception:
            return "local"

    # -- the batch stage -------------------------------------------------
    def _make_batcher(self, instances: int):
        """Serve's batcher around ``_infer``; ``max_concurrent_batches`` = engine instances."""

        async def infer_batch(rows: list[tuple[np.ndarray, float]]):
            return await self._infer(rows)

        return serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, max_concurrent_batches=instances)(infer_batch)

    async def _infer(self, rows: list[tuple[np.ndarray, float]]) -> list[tuple[np.ndarray, Any, float, int, float]]:
        detector = self._detector
        if detector is None:
            raise Unavailable("the detector is still loading its model; retry shortly")
        t_start = time.perf_counter()
        batch = np.stack([r[0] for r in rows])
        loop = asyncio.get_running_loop()
        output, lv = await loop.run_in_executor(self._infer_pool, detector.predict, batch)
        inf_s = time.perf_counter() - t_start
        n = len(rows)
        self._counters["batches"] += 1
        self._counters["items"] += n
        self._batch_sizes_seen[n] = self._batch_sizes_seen.get(n, 0) + 1
        self._record_batch(rows, lv.batch_size, t_start, inf_s)
        return [(output[i], lv, inf_s, n, t_start - rows[i][1]) for i in range(n)]

    async def _submit(self, tensor: np.ndarray) -> tuple:
        """Into the shared batcher, counting what waits in front of it (the queue length)."""
        self._waiting += 1
        try:
            return await self._batcher((tensor, time.perf_counter()))
        finally:
            self._waiting -= 1

    def _record_batch(self, rows: list, variant_batch_size: int, t_start: float, inf_s: float) -> None:
        """Feed the window recorder and Ray's metrics; never fails a batch."""
        try:
            n = len(rows)
            pre_s, post_s = self._metrics.recent_item_stages()
            queue_s = sum(t_start - r[1] for r in rows) / n
            waiting = max(self._waiting - n, 0)
            self._metrics.record_batch(n, variant_batch_size, queue_s, pre_s, inf_s, post_s, waiting)
            self._export(n, pre_s + inf_s + post_s, waiting)
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

    def stats(self, stream_fps: float | None = None, since: float | None = None) -> dict[str, Any]:
        """The controller's reading: the window snapshot (cut at the last batch-size change), the size
        in force, the resident variants and the last load failure."""
        cut = self._batch_size_changed_at if since is None else max(since, self._batch_size_changed_at)
        info = self.info()
        import ray

        return {
            "model": info["model"],
            "version": info["version"],
            "max_batch_size": info["max_batch_size"],
            "batch_sizes": list(self._config.batch_sizes) if self._config else [],
            "loaded_variants": sorted(int(s) for s in info["loaded_variants"]),
            "resident_bytes": {s: v["memory_bytes"] for s, v in info["loaded_variants"].items()},
            "last_load_failure": self._last_load_failure,
            "batch_size_changed_at": self._batch_size_changed_at,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "metrics": self._metrics.snapshot(stream_fps, since=cut),
        }

    async def infer_row(self, tensor: np.ndarray) -> dict[str, Any]:
        """Handle entry for streams: one letterboxed frame (3, H, W) float32 into the shared batcher,
        so frames of many streams and HTTP requests are batched together."""
        self._require_detector()
        row, lv, inf_s, n, queue_s = await self._submit(np.asarray(tensor, dtype=np.float32))
        return {
            "output": row,
            "model": lv.variant.name,
            "version": lv.variant.version,
            "batch_size": lv.batch_size,
            "items_in_batch": n,
            "inference_s": inf_s,
            "queue_s": max(queue_s, 0.0),
        }

    async def detect_bytes(self, body: bytes) -> dict[str, Any]:
        """Handle entry for the tenancy router: an encoded image in, the /v1/detect body out,
        plus which placement and node served it (DMP spreads a model over several)."""
        out = await self._detect_encoded(body)
        out["served_by"] = self.where()
        return out

    def where(self) -> dict[str, Any]:
        """This replica's deployment (= model placement), Ray node and process."""
        import ray

        ctx = serve.get_replica_context()
        return {"deployment": ctx.deployment, "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}

    async def _detect_encoded(self, body: bytes) -> dict[str, Any]:
        """One encoded image through decode -> batcher -> NMS; the /v1/detect reply body."""
        detector = self._require_detector()
        loop = asyncio.get_running_loop()
        item = await loop.run_in_executor(self._cpu_pool, detector.decode_request, body)
        row, lv, inf_s, n, queue_s = await self._submit(item.tensor)
        t0 = time.perf_counter()
        dets = await loop.run_in_executor(self._cpu_pool, detector.unbatch, row[None], [item])
        post_s = time.perf_counter() - t0
        self._metrics.record_item(item.timings["preprocess_s"], post_s)
        timings = {
            "queue_s": max(queue_s, 0.0),
            "preprocess_s": item.timings["preprocess_s"],
            "inference_s": inf_s,
            "postprocess_s": post_s,
        }
        out = detector.encode_response(BatchResult(dets[0], None, lv.variant, lv.batch_size, timings))
        out["items_in_batch"] = n
        return out

    async def _read_body(self, request: Request) -> bytes:
        """The body under max_body_bytes, after the API token check when inference is guarded."""
        config = self._config or DetectorConfig()
        if config.auth_inference:
            self._token.require(request.headers, "inference")
        return await read_body(request, config.max_body_bytes)

    # -- /v1 ---------------------------------------------------------------
    @api.post("/v1/detect", responses=error_responses(400, 401, 413, 503), openapi_extra=DETECT_BODY)
    async def detect(self, request: Request) -> Response:
        self._counters["requests"] += 1
        try:
            body = await self._read_body(request)
            body_out = await self._detect_encoded(body)
            return JSONResponse(body_out)
        except EdgebatchError as exc:
            self._counters["errors"] += 1
            self._record_drop(type(exc).__name__)
            return error_response(exc)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"models": [self.info()]}

    @api.get("/v1/info")
    async def http_info(self) -> dict:
        return self.info()

    def _require_detector(self) -> Detector:
        if self._detector is None:
            raise Unavailable("the detector is still loading its model; retry shortly")
        return self._detector

    def info(self) -> dict:
        """Status for `edgebatch status` and the controller."""
        d, m, c = self._detector, self._model, self._config
        loaded = {}
        if d is not None:
            for size, lv in sorted(d.pool.loaded.items()):
                loaded[str(size)] = {
                    "backend": lv.variant.backend,
                    "device": lv.engine.device,
                    "memory_bytes": lv.memory_bytes(),
                    "instances": len(lv.instances),
                    "load_s": round(lv.load_s, 3),
                    "sha256": lv.variant.sha256[:12],
                    "run_s": round(lv.run_s, 6),  # measured seconds per batch: stream admission's capacity
                }
        return {
            "model": m.name if m else (c.model if c else None),
            "version": m.version if m else None,
            "alias": c.alias if c else None,
            "backend": c.backend if c else None,
            "max_batch_size": c.max_batch_size if c else None,
            "batch_wait_timeout_s": c.batch_wait_timeout_s if c else None,
            "loaded_variants": loaded,
            "labels": m.labels if m else [],
            # what post-processing uses, so stream readers decode exactly as /v1/detect does
            "postprocess": {"conf": c.conf_threshold, "iou": c.iou_threshold, "max_det": c.max_detections,
                            "layout": c.layout} if c else {},
            "input_size": list(m.input_size) if m else None,
            "counters": dict(self._counters),
            "batch_sizes_seen": dict(sorted(self._batch_sizes_seen.items())),
            "last_swap": self._last_swap,
            "last_load_failure": self._last_load_failure,
            "pid": os.getpid(),
        }

    # -- Open Inference Protocol v2 ----------------------------------------
    def _signature(self):
        from app.oip import ModelSignature, TensorSpec

        d, m = self._require_detector(), self._model
        assert m is not None
        lv = d.pool.pick(1)
        out_shape = [-1, *lv.output_shape[1:]]
        return ModelSignature(
            name=m.name,
            versions=[m.version],
            platform="onnxruntime_onnx" if lv.variant.backend == "onnx" else lv.variant.backend,
            inputs=[TensorSpec("images", "FP32", [-1, 3, m.input_size[0], m.input_size[1]])],
            outputs=[TensorSpec("output0", "FP32", out_shape)],
            max_batch_size=max(self._config.batch_sizes) if self._config else 16,
        )

    def _check_model(self, name: str, version: str | None = None) -> None:
        m = self._model
        if m is None:
            raise Unavailable("the detector is still loading its model; retry shortly")
        if name != m.name:
            raise NotFound(f"unknown model '{name}'; this server serves '{m.name}' (GET /v2/models/{m.name})")
        if version not in (None, "", m.version):
            raise NotFound(f"model '{name}' has no loaded version '{version}'; loaded version is '{m.version}'")

    @api.get("/v2")
    async def v2_server(self) -> dict:
        from app.oip import server_metadata

        return server_metadata("edgebatch", "0.1.0", ["binary_tensor_data"])

    @api.get("/v2/health/live")
    async def v2_live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> Response:
        return Response(status_code=200 if self._detector is not None else 503)

    @api.get("/v2/models/{name}", responses=error_responses(404, 503))
    @api.get("/v2/models/{name}/versions/{version}", responses=error_responses(404, 503))
    async def v2_model(self, name: str, version: str | None = None) -> Response:
        from app.oip import model_metadata

        try:
            self._check_model(name, version)
            return JSONResponse(model_metadata(self._signature()))
        except EdgebatchError as exc:
            return error_response(exc)

    @api.get("/v2/models/{name}/ready", responses=error_responses(404, 503))
    @api.get("/v2/models/{name}/versions/{version}/ready", responses=error_responses(404, 503))
    async def v2_model_ready(self, name: str, version: str | None = None) -> Response:
        try:
            self._check_model(name, version)
            return Response(status_code=200)
        except EdgebatchError as exc:
            return error_response(exc)

    @api.post("/v2/models/{name}/infer", responses=V2_INFER_RESPONSES, openapi_extra=V2_INFER_BODY)
    @api.post("/v2/models/{name}/versions/{version}/infer", responses=V2_INFER_RESPONSES, openapi_extra=V2_INFER_BODY)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        from app.oip import encode_infer_response

        self._counters["requests"] += 1
        try:
            body = await self._read_body(request)
            self._check_model(name, version)
            sig = self._signature()
            limit = (self._config or DetectorConfig()).max_body_bytes
            req = await self._v2_decoder.decode(body, request.headers, sig, limit)  # off the event loop
            images = req.inputs["images"].astype(np.float32, copy=False)
            rows = await asyncio.gather(*(self._submit(images[i]) for i in range(images.shape[0])))
            output = np.stack([r[0] for r in rows])
            assert self._model is not None
            payload, headers = encode_infer_response(self._model.name, self._model.version, {"output0": output}, req)
            return Response(content=payload, headers=headers, media_type=headers.get("Content-Type", "application/json"))
        except EdgebatchError as exc:
            self._counters["errors"] += 1
            return error_response(exc)
        except (KeyError, ValueError) as exc:
            self._counters["errors"] += 1
            return error_response(BadRequest(f"bad inference request: {exc}"))
