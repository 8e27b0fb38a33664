"""The ``edgebatch`` app's HTTP ingress: a thin gateway in front of the ``Detector`` replicas.

The routes translate HTTP into ``DetectRequest`` items for the detector's ``detect`` (through a
DeploymentHandle) and results back into JSON; errors are raised, never caught here:
``install_error_handlers`` is the one place they become replies. The gateway is its own
deployment, not a route inside the detector's process, so that a detector replica dying under a
request is answered (issue 15): Serve's proxy can only answer a plain-text 500 for a replica that
died, while the gateway retries the item once on another replica when time is left, else answers a
JSON 503 that says to retry. It also gives every request its deadline (``app.overload``).
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from app.constants import GATEWAY_DEPLOYMENT
from app.detector import DetectRequest, ItemResult
from app.errors import NotFound, Overloaded, ReplicaLost, Unavailable
from app.oip import ModelSignature, encode_infer_response, model_metadata, server_metadata
from app.overload import BusyRate, HopReserve, LoopLag, QueueState, RefusedClients, ServedRate, admit, request_budget_s
from app.security.auth import TokenCheck
from app.state import StateDir
from deployments.console import ConsoleRoutes, ConsoleState
from deployments.console import router as console_router
from deployments.decoding import V2BodyDecoder
from deployments.detector import IngressSettings
from deployments.http import as_edgebatch_error, error_responses, install_error_handlers, read_inference_body
from deployments.proxy_stamp import ARRIVED_HEADER, arrival_wait_s, node_id
from deployments.registry_http import RegistryRoutes
from deployments.registry_http import router as registry_router

api = FastAPI(title="edgebatch", description="Batched object detection on Ray Serve")
install_error_handlers(api)
api.include_router(registry_router)  # /v1/registry: models, versions, variants; promote (token)
api.include_router(console_router)  # /ui: the operator's console (docs/console.md)

#: how long what the gateway reads from the detector (settings, v2 signature) is reused
SETTINGS_TTL_S = 1.0
#: a replica lost under an item: the item is tried once more when this much of its budget is left
RETRY_MIN_BUDGET_S = 0.2

#: The OpenAPI descriptions of what the routes really take and answer (for clients and fuzzers).
DETECT_BODY = {"requestBody": {"required": True, "content": {
    t: {"schema": {"type": "string", "format": "binary"}} for t in ("image/jpeg", "image/png", "application/octet-stream")}},
    "parameters": [{"name": "X-Request-Timeout", "in": "header", "required": False,
                    "schema": {"type": "number", "exclusiveMinimum": 0},
                    "description": "seconds this request may take; refused at once (503) when it cannot"}]}
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

REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


class _Cached:
    """One value read from the detector, reused for ``SETTINGS_TTL_S`` (a swap shows within that).

    Single-flight: when it is stale, one read goes out and every request arriving meanwhile awaits
    that same read (under load, hundreds of requests would otherwise each send their own).
    """

    def __init__(self) -> None:
        self.value: Any = None
        self.at = -1e9
        self._reading: asyncio.Future | None = None

    async def get(self, read) -> Any:
        if time.monotonic() - self.at <= SETTINGS_TTL_S:
            return self.value
        if self._reading is None:
            self._reading = asyncio.ensure_future(read())
            self._reading.add_done_callback(self._done)
        return await asyncio.shield(self._reading)

    def _done(self, reading: asyncio.Future) -> None:
        self._reading = None
        if not reading.cancelled() and reading.exception() is None:
            self.value, self.at = reading.result(), time.monotonic()


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=2048, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class DetectorGateway(RegistryRoutes, ConsoleRoutes):
    """HTTP in, ``detect`` items out to the ``Detector`` deployment; replies and refusals in JSON; the
    registry routes and the operator's console (/ui)."""

    def __init__(self, detector: Any) -> None:
        self._detector = detector
        self._token = TokenCheck(StateDir.default())
        self._console = ConsoleState()
        self._v2_decoder = V2BodyDecoder(ThreadPoolExecutor(max_workers=2, thread_name_prefix="edgebatch-decode"))
        self._settings, self._signature_cache = _Cached(), _Cached()
        self.counters = {"replica_lost": 0, "retried": 0, "overloaded": 0, "refused_here": 0, "late": 0}
        self.outstanding = 0  # items sent to detectors and not answered yet
        self._refused = RefusedClients()  # when each refused client should come back
        self._busy = BusyRate()  # the end-to-end rate while the detectors were kept full
        self._hops = HopReserve()  # what served items spent outside the detector's stages
        self._lag = LoopLag()  # what they wait on this event loop outside the gateway's own clock
        self._served = ServedRate()  # what is really answered with a result: refused clients are spread at it
        self._proxy_wait = HopReserve()  # what stamped requests waited in the proxy (shown in /v1/info)
        self._node = node_id()  # arrival stamps of the proxy on this node are trusted (deployments.proxy_stamp)

    # -- what the detector says ---------------------------------------------------------
    async def _call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self._detector, method).remote(*args)
        except REPLICA_GONE:
            raise ReplicaLost("the detector replica was lost; Serve is starting it again, retry") from None
        except DeploymentUnavailableError:
            raise Unavailable("the detector deployment has no running replica; see `edgebatch status`") from None
        except Exception as exc:
            ours = as_edgebatch_error(exc)
            if ours is not None:
                raise ours from None
            raise

    async def settings(self) -> IngressSettings:
        return await self._settings.get(lambda: self._call("ingress_settings"))

    async def _body(self, request: Request) -> tuple[bytes, IngressSettings]:
        s = await self.settings()
        return await read_inference_body(request, s.max_body_bytes, self._token, s.auth_inference), s

    # -- one item, with its deadline ----------------------------------------------------------
    async def detect(self, item: DetectRequest, budget_s: float, arrived: str | None = None) -> ItemResult:
        """``item`` to a detector replica within ``budget_s``, counted from the proxy's ``arrived`` stamp
        where it has one; a replica lost under it costs one retry (Serve routes it to another replica, or
        waits for the restarted one) while time is left."""
        start = time.monotonic()
        waited = arrival_wait_s(arrived, here=self._node, now=start, budget_s=budget_s)  # in the proxy, unseen here
        self._lag.start()
        due = start - waited + budget_s - self._lag.reserve_s(budget_s)  # an answer later than this reaches the client late
        usable = due - start - self._hops.reserve_s(budget_s)  # the rest is kept for the way back
        if arrived is not None and waited:
            self._proxy_wait.observe(waited)
        try:
            if usable <= 0:
                self.counters["refused_here"] += 1
                raise Overloaded(f"overloaded: the request waited {waited:.2f} s in the HTTP proxy before the gateway "
                                 f"saw it, too much of its {budget_s:.2f} s deadline to be served in time; retry",
                                 retry_after_s=1.0)
            self._admit(usable)
            self._track(+1)
            served = 0
            try:
                result = await self._detect(item, start + usable, due, budget_s)
                served = 1
            finally:
                self._track(-1, completed=served)
        except Overloaded as refused:  # its place among the clients refused lately sets its Retry-After
            now = time.monotonic()
            rate = self._served.current(now)
            raise refused.later(self._refused.ticket(self._capacity() if rate is None else rate, now)) from None
        took = time.monotonic() - start
        self._served.served(start + took)
        t = result.timings
        self._hops.observe(took - (t.queue_s + t.preprocess_s + t.inference_s + t.postprocess_s))
        return result

    def _track(self, delta: int, completed: int = 0) -> None:
        self.outstanding += delta
        s: IngressSettings | None = self._settings.value
        self._busy.change(self.outstanding, time.monotonic(), completed=completed,
                          full_at=s.queue.max_batch_size if s else 1)

    def _capacity(self) -> float | None:
        """Items/s all detector replicas serve, end to end: measured here while they were kept full, else
        what the detector measured of its own batches (times its running replicas)."""
        here = self._busy.current(time.monotonic())
        if here is not None:
            return here
        s: IngressSettings | None = self._settings.value
        return s.queue.capacity_items_s * s.running_replicas if s and s.queue.capacity_items_s else None

    def _admit(self, budget_s: float) -> None:
        """Refuse here, without a hop, what the detectors cannot serve in time: this gateway's outstanding
        items drained at the end-to-end rate (the detector checks again with its own queue)."""
        s: IngressSettings | None = self._settings.value
        capacity = self._capacity()
        if s is None or capacity is None:
            return  # nothing measured yet: the detector's cold bound decides
        ours = QueueState(waiting=self.outstanding, capacity_items_s=capacity,
                          d_batch_s=s.queue.d_batch_s, max_batch_size=s.queue.max_batch_size,
                          concurrent_batches=s.queue.concurrent_batches)
        try:
            admit(ours, budget_s)
        except Overloaded:
            self.counters["refused_here"] += 1
            raise

    async def _detect(self, item: DetectRequest, deadline: float, due: float, budget_s: float) -> ItemResult:
        """The detector gets ``deadline`` (the budget less the hop reserve) and refuses, with its queue
        named, what it cannot finish by then; an answer not here by ``due`` (the client's budget from this
        ingress, less what replies wait on its event loop) is not waited for: a late answer is useless to a real-time client, and a
        reply after the deadline would break the promise the deadline makes."""
        for attempt in (1, 2):
            left = deadline - time.monotonic()
            try:
                return await asyncio.wait_for(
                    self._detector.detect.remote(DetectRequest(item.kind, item.data, deadline_s=max(left, 0.001))),
                    timeout=max(due - time.monotonic(), 0.0))
            except REPLICA_GONE:
                self.counters["replica_lost"] += 1
                if attempt == 1 and deadline - time.monotonic() > RETRY_MIN_BUDGET_S:
                    self.counters["retried"] += 1
                    continue
                raise ReplicaLost("the detector replica serving this request was lost; Serve is starting it "
                                  "again: retry") from None
            except TimeoutError:
                self.counters["late"] += 1
                raise Overloaded(f"overloaded: no detector replica answered within the request's {budget_s:.2f} s "
                                 "deadline (or none is running: see `edgebatch status`); retry", retry_after_s=1.0) from None
            except BackPressureError:
                self.counters["overloaded"] += 1
                raise Overloaded("overloaded: every detector replica's queue is full; retry", retry_after_s=1.0) from None
            except DeploymentUnavailableError:
                raise Unavailable("the detector deployment has no running replica; see `edgebatch status`") from None
            except Exception as exc:
                ours = as_edgebatch_error(exc)
                if isinstance(ours, Overloaded):
                    self.counters["overloaded"] += 1
                if ours is not None:
                    raise ours from None
                raise
        raise AssertionError("unreachable")

    # -- /v1 ---------------------------------------------------------------------------------
    @api.post("/v1/detect", responses=error_responses(400, 401, 413, 503), openapi_extra=DETECT_BODY)
    async def v1_detect(self, request: Request) -> Response:
        start = time.perf_counter()
        body, s = await self._body(request)
        budget = request_budget_s(request.headers, None, default_s=s.deadline_s, max_s=s.max_deadline_s)
        result = await self.detect(DetectRequest.encoded(body), budget, request.headers.get(ARRIVED_HEADER))
        return Response(orjson.dumps(result.to_json()), media_type="application/json",  # orjson: 25x cheaper than json.dumps
                        headers={"Server-Timing": f"gateway;dur={(time.perf_counter() - start) * 1000:.1f}"})

    @api.get("/v1/models")
    async def v1_models(self) -> dict:
        return {"models": [(await self._call("info")).to_dict()]}

    @api.get("/v1/info")
    async def v1_info(self) -> dict:
        info = (await self._call("info")).to_dict()
        rate = self._busy.current(time.monotonic())
        info["gateway"] = {**self.counters,
                           "busy_rate_items_s": None if rate is None else round(rate, 2),
                           "hop_reserve_s": round(self._hops.reserve_s(3600.0), 4),
                           "loop_lag_reserve_s": round(self._lag.reserve_s(3600.0), 4),
                           "proxy_wait_mean_s": round(self._proxy_wait.mean_s or 0.0, 4)}
        return info

    # -- /v2: Open Inference Protocol (KServe / Triton HTTP) -------------------------------------
    async def _signature(self, name: str, version: str | None) -> ModelSignature:
        sig: ModelSignature = await self._signature_cache.get(lambda: self._call("signature"))
        if name != sig.name:
            raise NotFound(f"unknown model '{name}'; this server serves '{sig.name}' (GET /v2/models/{sig.name})")
        if version not in (None, "", *sig.versions):
            raise NotFound(f"model '{name}' has no loaded version '{version}'; loaded version is '{sig.versions[0]}'")
        return sig

    @api.get("/v2")
    async def v2_server(self) -> dict:
        return server_metadata("edgebatch", "0.1.0", ["binary_tensor_data"])

    @api.get("/v2/health/live")
    async def v2_live(self) -> Response:
        return Response(status_code=200)

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> Response:
        try:
            ready = (await self.settings()).loaded
        except Exception:
            ready = False
        return Response(status_code=200 if ready else 503)

    @api.get("/v2/models/{name}", responses=error_responses(404, 503))
    @api.get("/v2/models/{name}/versions/{version}", responses=error_responses(404, 503))
    async def v2_model(self, name: str, version: str | None = None) -> JSONResponse:
        return JSONResponse(model_metadata(await self._signature(name, version)))

    @api.get("/v2/models/{name}/ready", responses=error_responses(404, 503))
    @api.get("/v2/models/{name}/versions/{version}/ready", responses=error_responses(404, 503))
    async def v2_model_ready(self, name: str, version: str | None = None) -> Response:
        await self._signature(name, version)
        return Response(status_code=200)

    @api.post("/v2/models/{name}/infer", responses=V2_INFER_RESPONSES, openapi_extra=V2_INFER_BODY)
    @api.post("/v2/models/{name}/versions/{version}/infer", responses=V2_INFER_RESPONSES, openapi_extra=V2_INFER_BODY)
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        body, s = await self._body(request)  # the token before anything about the model is told
        sig = await self._signature(name, version)
        req = await self._v2_decoder.decode(body, request.headers, sig, s.max_body_bytes)  # client mistakes: 400
        budget = request_budget_s(request.headers, req.parameters, default_s=s.deadline_s, max_s=s.max_deadline_s)
        images = req.inputs["images"]
        arrived = request.headers.get(ARRIVED_HEADER)
        results = await asyncio.gather(*(self.detect(DetectRequest.tensor(row), budget, arrived) for row in images))
        output = np.stack([r.output for r in results])
        payload, headers = encode_infer_response(sig.name, sig.versions[0], {"output0": output}, req)
        return Response(content=payload, headers=headers, media_type=headers.get("Content-Type", "application/json"))
