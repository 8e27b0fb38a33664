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
from app.errors import BadRequest, EdgebatchError, NotFound, PayloadTooLarge, Unavailable
from app.state import StateDir
from model_registry.source import RegistryModelSource, ResolvedModel

log = logging.getLogger("ray.serve")

api = FastAPI(title="edgebatch", description="Batched object detection on Ray Serve")


def _error(exc: EdgebatchError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@serve.deployment(name="Detector", max_ongoing_requests=64)
@serve.ingress(api)
class DetectorDeployment:
    """One model per replica; reconfigured live by ``serve deploy`` (user_config) or the controller."""

    def __init__(self) -> None:
        self._state = StateDir.default()
        self._cpu_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgebatch-cpu")
        self._infer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgebatch-engine")
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
            for f in ("model", "version", "alias", "backend", "labels", "tracking_uri", "intra_op_threads")
        )
        loop = asyncio.get_running_loop()
        if model_changed:
            source = RegistryModelSource(config, self._state)
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
            await self._apply_config(config)
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
                source = RegistryModelSource(config, self._state)
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
        return [(output[i], lv, inf_s, n, t_start - rows[i][1]) for i in range(n)]

    async def infer_row(self, tensor: np.ndarray) -> dict[str, Any]:
        """Handle entry for streams: one letterboxed frame (3, H, W) float32 into the shared batcher,
        so frames of many streams and HTTP requests are batched together."""
        self._require_detector()
        row, lv, inf_s, n, queue_s = await self._batcher((np.asarray(tensor, dtype=np.float32), time.perf_counter()))
        return {
            "output": row,
            "model": lv.variant.name,
            "version": lv.variant.version,
            "batch_size": lv.batch_size,
            "items_in_batch": n,
            "inference_s": inf_s,
            "queue_s": max(queue_s, 0.0),
        }

    async def _read_body(self, request: Request) -> bytes:
        limit = (self._config or DetectorConfig()).max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds max_body_bytes={limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds max_body_bytes={limit}")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- /v1 ---------------------------------------------------------------
    @api.post("/v1/detect")
    async def detect(self, request: Request) -> Response:
        self._counters["requests"] += 1
        try:
            detector = self._require_detector()
            body = await self._read_body(request)
            loop = asyncio.get_running_loop()
            item = await loop.run_in_executor(self._cpu_pool, detector.decode_request, body)
            row, lv, inf_s, n, queue_s = await self._batcher((item.tensor, time.perf_counter()))
            t0 = time.perf_counter()
            dets = await loop.run_in_executor(self._cpu_pool, detector.unbatch, row[None], [item])
            timings = {
                "queue_s": max(queue_s, 0.0),
                "preprocess_s": item.timings["preprocess_s"],
                "inference_s": inf_s,
                "postprocess_s": time.perf_counter() - t0,
            }
            result = BatchResult(dets[0], None, lv.variant, lv.batch_size, timings)
            body_out = detector.encode_response(result)
            body_out["items_in_batch"] = n
            return JSONResponse(body_out)
        except EdgebatchError as exc:
            self._counters["errors"] += 1
            return _error(exc)

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
            "input_size": list(m.input_size) if m else None,
            "counters": dict(self._counters),
            "batch_sizes_seen": dict(sorted(self._batch_sizes_seen.items())),
            "last_swap": self._last_swap,
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

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def v2_model(self, name: str, version: str | None = None) -> Response:
        from app.oip import model_metadata

        try:
            self._check_model(name, version)
            return JSONResponse(model_metadata(self._signature()))
        except EdgebatchError as exc:
            return _error(exc)

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def v2_model_ready(self, name: str, version: str | None = None) -> Response:
        try:
            self._check_model(name, version)
            return Response(status_code=200)
        except EdgebatchError as exc:
            return _error(exc)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        from app.oip import decode_infer_request, encode_infer_response

        self._counters["requests"] += 1
        try:
            self._check_model(name, version)
            sig = self._signature()
            body = await self._read_body(request)
            req = decode_infer_request(body, request.headers, sig)
            images = req.inputs["images"].astype(np.float32, copy=False)
            now = time.perf_counter()
            rows = await asyncio.gather(*(self._batcher((images[i], now)) for i in range(images.shape[0])))
            output = np.stack([r[0] for r in rows])
            assert self._model is not None
            payload, headers = encode_infer_response(self._model.name, self._model.version, {"output0": output}, req)
            return Response(content=payload, headers=headers, media_type=headers.get("Content-Type", "application/json"))
        except EdgebatchError as exc:
            self._counters["errors"] += 1
            return _error(exc)
        except (KeyError, ValueError) as exc:
            self._counters["errors"] += 1
            return _error(BadRequest(f"bad inference request: {exc}"))
