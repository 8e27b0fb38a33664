"""The multi-tenancy application: one Detector deployment per (model, placement), one router.

``import_path: deployments.tenancy:build_app`` with ``args`` = ``app.tenancy.TenancyConfig``.
Each placement becomes ``PlacementDetector.options(name="<model>.<placement>")`` (the
handle-only ``DetectorReplica``, without the HTTP routes of the ``edgebatch`` app)
whose replicas ask Ray for the node-tag resource (``gpu_node``: only nodes that
declared that tag with ``ray start --resources`` qualify) plus their device share
(``num_gpus`` 1/k or ``edgetpu`` 1/k: CME, k replicas on one device). Ray's
scheduler does the placing and re-placing when a node leaves; we only declare.

``ModelRouter`` is the app's HTTP ingress, pinned to the head node: ``POST /{model}/v1/detect``
goes to one of the model's placements, chosen with weights proportional to capacity
(``policies.placement.route_weights``), through DeploymentHandles, and only among placements
that Serve's controller reports running replicas for (read every ``state_refresh_s`` in the
background, never on the request path). With none, the answer is a JSON 503 with
``Retry-After`` at once. A placement that fails or does not answer in ``placement_timeout_s``
is skipped for ``skip_failed_s``, or until Serve shows new replicas for it.

Concurrency changes in place: a ``deployments:`` override in the Serve config
(``name: demo-detector.gpu``, ``num_replicas``, ``user_config``) is applied by
``serve deploy`` without restarting the other replicas; a changed device share
(``ray_actor_options``) restarts that placement's replicas, as Serve requires.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) on the routes

import asyncio
import dataclasses
import logging
import random
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application

from app.constants import DETECTOR_DEPLOYMENT, HEAD_PIN, TENANCY_ROUTER_DEPLOYMENT
from app.detector import DetectRequest
from app.errors import BadRequest, ConfigError, NotFound, Overloaded, PayloadTooLarge, RetryLater, one_line
from app.security.auth import TokenCheck
from app.tenancy import PlacementSpec, TenancyConfig, deployment_name, parse_tenancy, required_resources
from deployments.detector import DetectorReplica, PlacedResult
from deployments.http import as_edgebatch_error, install_error_handlers, read_inference_body
from policies.placement import (
    Placement,
    PlacementPlan,
    Shortfall,
    concurrency_level,
    placement_shortfall,
    route_weights,
)

log = logging.getLogger("ray.serve")

api = FastAPI(title="edgebatch tenancy", description="Several models, each spread over its placements")
install_error_handlers(api)



def capacity_plan(config: TenancyConfig) -> PlacementPlan:
    """The configured placements as a policy plan, so routing uses the policy's weights.

    A placement here stands for a Serve deployment, not one node: its ``node_id`` is
    the deployment name (Ray decides the nodes), its throughput the placement capacity.
    """
    placements = []
    for m in config.models:
        for p in m.placements:
            share = p.device.share if p.device is not None and p.device.share is not None else 1.0
            placements.append(Placement(
                model=m.name, node_id=deployment_name(m.name, p.name or p.tag), tag=p.tag, backend=p.backend,
                replicas=p.num_replicas, fraction=share, expected_throughput=p.capacity(),
            ))
    return PlacementPlan(tuple(placements), unplaced={})


def actor_options(p: PlacementSpec) -> dict[str, Any]:
    """Ray resources of one replica of a placement: node-tag presence + device share."""
    num_gpus, custom = p.ray_resources()
    options: dict[str, Any] = {"num_cpus": p.num_cpus, "resources": custom}
    if num_gpus:
        options["num_gpus"] = num_gpus
    return options


def check_memory(model: str, p: PlacementSpec) -> None:
    """Ray does not budget device memory (ray#41432): refuse a k that the device cannot hold."""
    if p.instance_memory_mb is None or p.device_memory_mb is None:
        return
    try:
        level = concurrency_level(p.replicas_per_device, instance_bytes=int(p.instance_memory_mb * 1e6),
                                  device_bytes=int(p.device_memory_mb * 1e6))
    except ValueError as exc:
        raise ConfigError(f"models[{model}].placements[{p.name}]: {exc}") from None
    if level.k < p.replicas_per_device:
        raise ConfigError(
            f"models[{model}].placements[{p.name}].replicas_per_device: {level.reason}; "
            f"set replicas_per_device <= {level.k}"
        )


def route_table(config: TenancyConfig) -> dict[str, list[dict[str, Any]]]:
    """model -> its placements with routing weight and resources (handles are added by build_app)."""
    for m in config.models:
        for p in m.placements:
            check_memory(m.name, p)
    plan = capacity_plan(config)
    table: dict[str, list[dict[str, Any]]] = {}
    for m in config.models:
        weights = route_weights(plan, m.name)
        rows = []
        for p in m.placements:
            name = deployment_name(m.name, p.name or p.tag)
            rows.append({
                "placement": p.name, "deployment": name, "tag": p.tag, "backend": p.backend,
                "replicas": p.num_replicas, "replicas_per_device": p.replicas_per_device,
                "engine_instances": p.engine_instances, "capacity": p.capacity(),
                "weight": round(weights[(name, p.backend)], 6), "ray_actor_options": actor_options(p),
            })
        table[m.name] = rows
    return table


# The detector replica as it is (batcher, hot reconfigure, detect): reached through handles only.
PlacementDetector = serve.deployment(name=DETECTOR_DEPLOYMENT, max_ongoing_requests=64)(DetectorReplica)


@dataclasses.dataclass
class PlacementState:
    """What Serve's controller last said about one placement's deployment (read off the request path)."""

    running: int = 0
    target: int = 0
    replica_ids: frozenset[str] = frozenset()
    shortfall: Shortfall | None = None


class PlacementGauges:
    """Prometheus view of each placement: replicas running and configured, and which resource of its
    request no alive node offers (1), so an operator's alert can say why a placement is short."""

    def __init__(self) -> None:
        from ray.serve import metrics

        keys = ("model", "placement")
        self.running = metrics.Gauge("edgebatch_tenancy_replicas_running", tag_keys=keys,
                                     description="replicas of the placement Serve reports RUNNING")
        self.target = metrics.Gauge("edgebatch_tenancy_replicas_target", tag_keys=keys,
                                    description="replicas the placement is configured to run")
        self.missing = metrics.Gauge("edgebatch_tenancy_resource_missing", tag_keys=(*keys, "resource"),
                                     description="1 when no alive node offers this resource of the placement's request")

    def record(self, routes: dict[str, list[dict[str, Any]]], state: dict[str, PlacementState]) -> None:
        for model, rows in routes.items():
            for r in rows:
                st = state.get(r["deployment"], PlacementState())
                tags = {"model": model, "placement": r["placement"]}
                self.running.set(st.running, tags)
                self.target.set(st.target, tags)
                missing = set(st.shortfall.missing) if st.shortfall else set()
                for res in required_resources(r["ray_actor_options"]):
                    self.missing.set(1 if res in missing else 0, {**tags, "resource": res})


def alive_node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def read_placement_states(app_name: str, routes: dict[str, list[dict[str, Any]]]) -> dict[str, PlacementState]:
    """Each placement's replicas as Serve's controller reports them (blocking: run in a thread)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    deps = ((details.get("applications") or {}).get(app_name) or {}).get("deployments") or {}
    out: dict[str, PlacementState] = {}
    nodes: list[dict[str, float]] | None = None
    for rows in routes.values():
        for r in rows:
            dep = deps.get(r["deployment"]) or {}
            ids = frozenset(str(x.get("replica_id")) for x in dep.get("replicas", []) if x.get("state") == "RUNNING")
            target = int(dep.get("target_num_replicas") or r["replicas"])
            st = PlacementState(running=len(ids), target=target, replica_ids=ids)
            if st.running < st.target:
                nodes = alive_node_resources() if nodes is None else nodes
                st.shortfall = placement_shortfall(required_resources(r["ray_actor_options"]), st.running,
                                                   st.target, nodes)
            out[r["deployment"]] = st
    return out


@serve.deployment(name=TENANCY_ROUTER_DEPLOYMENT, max_ongoing_requests=256,
                  ray_actor_options={"num_cpus": 0, "resources": dict(HEAD_PIN)})
@serve.ingress(api)
class ModelRouter:
    """Spreads each model's requests over its placements by capacity, only to placements that Serve
    says have running replicas; runs on the head node, which does not leave with an edge node."""

    async def __init__(self, routes: dict[str, list[dict[str, Any]]], *, state_refresh_s: float,
                       placement_timeout_s: float, skip_failed_s: float, retry_after_s: int,
                       auth_inference: bool, max_body_bytes: int) -> None:
        """The settings come from ``TenancyConfig`` (``build_app``), where their defaults live."""
        self._routes = routes
        self._token = TokenCheck()
        self._auth_inference = auth_inference
        self._max_body_bytes = max_body_bytes
        self._refresh_s = state_refresh_s
        self._timeout_s = placement_timeout_s
        self._skip_s = skip_failed_s
        self._retry_after_s = retry_after_s
        self._down: dict[str, tuple[float, frozenset[str]]] = {}  # deployment -> (skip until, replicas then)
        self._state: dict[str, PlacementState] = {}
        self._state_at: float | None = None  # monotonic time of the last successful read
        self._rng = random.Random()
        self._served: dict[str, int] = {}
        self._app = serve.get_replica_context().app_name
        self._gauges = PlacementGauges()
        await self._refresh()
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    # -- Serve's view of the placements, refreshed in the background -------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)  # a polling period, not a synchronisation
            await self._refresh()

    async def _refresh(self) -> None:
        try:
            self._state = await asyncio.to_thread(read_placement_states, self._app, self._routes)
        except Exception as exc:  # the controller is busy or restarting: keep the last view, say so
            log.warning("tenancy router: cannot read Serve's replica states: %s", one_line(exc))
            return
        self._state_at = time.monotonic()
        for name, st in self._state.items():
            down = self._down.get(name)
            if down is not None and st.running and st.replica_ids != down[1]:
                del self._down[name]  # Serve replaced the replicas that failed: route there again
        self._gauges.record(self._routes, self._state)

    def _state_known(self) -> bool:
        return self._state_at is not None and time.monotonic() - self._state_at < max(10 * self._refresh_s, 10.0)

    def _order(self, model: str) -> list[dict[str, Any]]:
        """Placements to try: those with running replicas, one drawn by weight first, then the rest
        by weight, recently failed ones last. Placements without a running replica are left out."""
        rows = self._routes.get(model)
        if rows is None:
            known = ", ".join(sorted(self._routes)) or "none"
            raise NotFound(f"unknown model '{model}'; this tenancy app serves: {known} (GET /v1/tenancy)")
        known = self._state_known()
        live = [r for r in rows if not known or self._state[r["deployment"]].running > 0]
        if not live:
            raise RetryLater(f"model '{model}': no placement has a running replica ("
                             + "; ".join(self._why_down(r) for r in rows) + "); see `edgebatch status`",
                             retry_after_s=self._retry_after_s)
        now = time.monotonic()
        up = [r for r in live if self._down.get(r["deployment"], (0.0,))[0] <= now]
        ordered: list[dict[str, Any]] = []
        pool = list(up)
        while pool:
            pick = self._rng.choices(pool, weights=[max(r["weight"], 1e-9) for r in pool])[0]
            ordered.append(pick)
            pool.remove(pick)
        return ordered + [r for r in live if r not in up]

    def _why_down(self, row: dict[str, Any]) -> str:
        st = self._state.get(row["deployment"], PlacementState())
        text = f"{row['placement']}: {st.running}/{st.target} running"
        if st.shortfall is not None and st.shortfall.missing:
            text += f", no alive node offers {', '.join(st.shortfall.missing)}"
        return text

    def _failed(self, name: str, why: str) -> None:
        st = self._state.get(name, PlacementState())
        log.warning("placement %s skipped for %.0f s: %s", name, self._skip_s, why)
        self._down[name] = (time.monotonic() + self._skip_s, st.replica_ids)

    async def detect_bytes(self, model: str, body: bytes) -> dict[str, Any]:
        """Handle and HTTP path: one image to one of the model's placements."""
        if not body:
            raise BadRequest("empty request body: send a JPEG or PNG image as the body")
        if len(body) > self._max_body_bytes:
            raise PayloadTooLarge(f"body of {len(body)} bytes exceeds max_body_bytes={self._max_body_bytes}")
        last: str = "no placement answered"
        busy: Overloaded | None = None
        for row in self._order(model):
            name = row["deployment"]
            resp = row["handle"].detect_placed.remote(DetectRequest.encoded(body))
            try:
                placed: PlacedResult = await asyncio.wait_for(resp, timeout=self._timeout_s)
            except asyncio.TimeoutError:
                resp.cancel()
                last = f"{name}: no replica answered in {self._timeout_s:g} s"
            except Exception as exc:  # a replica died mid-request (node left), or answered an error
                ours = as_edgebatch_error(exc)
                if ours is not None and ours.status < 500:
                    raise ours from None  # the request is wrong (not an image, too large), not the placement
                if isinstance(ours, Overloaded):
                    busy = ours  # busy, not down: try the next placement, and do not skip this one
                    continue
                last = f"{name}: {ours.message if ours else one_line(exc)}"
            else:
                self._served[name] = self._served.get(name, 0) + 1
                return {**placed.result.to_json(), "served_by": dataclasses.asdict(placed.served_by),
                        "placement": row["placement"]}
            self._failed(name, last)
        if busy is not None:
            raise busy  # every placement that answered was over its deadline: the detector's own 503
        raise RetryLater(f"model '{model}': every placement with running replicas failed; last: {last}; "
                         "see `edgebatch status`", retry_after_s=self._retry_after_s)

    def tenancy(self) -> dict[str, Any]:
        """Routes, weights, resources, Serve's replica counts, and how many requests each placement served."""
        now = time.monotonic()

        def row_view(r: dict[str, Any]) -> dict[str, Any]:
            st = self._state.get(r["deployment"], PlacementState())
            return {**{k: v for k, v in r.items() if k != "handle"},
                    "running": st.running, "target": st.target,
                    "missing": list(st.shortfall.missing) if st.shortfall else [],
                    "served": self._served.get(r["deployment"], 0),
                    "skipped_for_s": round(max(0.0, self._down.get(r["deployment"], (0.0,))[0] - now), 1)}

        age = None if self._state_at is None else round(now - self._state_at, 1)
        return {"state_age_s": age, "models": {m: [row_view(r) for r in rows] for m, rows in self._routes.items()}}

    @api.get("/v1/tenancy")
    async def http_tenancy(self) -> dict:
        return self.tenancy()

    @api.post("/{model}/v1/detect")
    async def http_detect(self, model: str, request: Request) -> JSONResponse:
        body = await read_inference_body(request, self._max_body_bytes, self._token, self._auth_inference)
        return JSONResponse(await self.detect_bytes(model, body))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """One Detector deployment per (model, placement) and the ModelRouter ingress over them."""
    config = parse_tenancy(dict(args or {}), "args")
    table = route_table(config)
    for m in config.models:
        for p, row in zip(m.placements, table[m.name]):
            row["handle"] = PlacementDetector.options(
                name=row["deployment"],
                num_replicas=p.num_replicas,
                ray_actor_options=row["ray_actor_options"],
                user_config=m.detector_config(p),
                max_ongoing_requests=config.max_ongoing_requests,
                graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
            ).bind()
    return ModelRouter.options(graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s).bind(
        table, state_refresh_s=config.state_refresh_s, placement_timeout_s=config.placement_timeout_s,
        skip_failed_s=config.skip_failed_s, retry_after_s=config.retry_after_s,
        auth_inference=config.auth_inference, max_body_bytes=config.max_body_bytes,
    )
