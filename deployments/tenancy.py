"""The multi-tenancy application: one Detector deployment per (model, placement), one router.

``import_path: deployments.tenancy:build_app`` with ``args`` = ``app.tenancy.TenancyConfig``.
Each placement becomes ``PlacementDetector.options(name="<model>.<placement>")`` (the
handle-only ``DetectorReplica``, without the HTTP routes of the ``edgebatch`` app)
whose replicas ask Ray for the node-tag resource (``gpu_node``: only nodes that
declared that tag with ``ray start --resources`` qualify) plus their device share
(``num_gpus`` 1/k or ``edgetpu`` 1/k: CME, k replicas on one device). Ray's
scheduler does the placing and re-placing when a node leaves; we only declare.

``ModelRouter`` is the app's HTTP ingress: ``POST /{model}/v1/detect`` goes to one
of the model's placements, chosen with weights proportional to capacity
(``policies.placement.route_weights``), through DeploymentHandles. A placement that
fails or does not answer in ``placement_timeout_s`` (no replica alive: its tag left
the cluster) is skipped for a while, so the model keeps serving from the others.

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

from app.constants import DETECTOR_DEPLOYMENT
from app.detector import DetectRequest
from app.errors import BadRequest, ConfigError, NotFound, PayloadTooLarge, Unavailable
from app.security.auth import TokenCheck
from app.tenancy import PlacementSpec, TenancyConfig, deployment_name, parse_tenancy, split_deployment_name
from deployments.detector import DetectorReplica, PlacedResult
from deployments.http import as_edgebatch_error, install_error_handlers, read_inference_body
from policies.placement import Placement, PlacementPlan, concurrency_level, route_weights

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


@serve.deployment(name="ModelRouter", max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class ModelRouter:
    """Spreads each model's requests over its placements by capacity; skips a placement that is down."""

    def __init__(self, routes: dict[str, list[dict[str, Any]]], placement_timeout_s: float = 30.0,
                 retry_after_s: float = 15.0, *, auth_inference: bool = False,
                 max_body_bytes: int = 20 * 1024 * 1024) -> None:
        self._routes = routes
        self._token = TokenCheck()
        self._auth_inference = auth_inference
        self._max_body_bytes = max_body_bytes
        self._timeout_s = placement_timeout_s
        self._retry_after_s = retry_after_s
        self._down_until: dict[str, float] = {}
        self._rng = random.Random()
        self._served: dict[str, int] = {}

    def _order(self, model: str) -> list[dict[str, Any]]:
        """Placements to try: one drawn by weight first, then the rest by weight; down ones last."""
        rows = self._routes.get(model)
        if rows is None:
            known = ", ".join(sorted(self._routes)) or "none"
            raise NotFound(f"unknown model '{model}'; this tenancy app serves: {known} (GET /v1/tenancy)")
        now = time.monotonic()
        up = [r for r in rows if self._down_until.get(r["deployment"], 0.0) <= now]
        down = [r for r in rows if r not in up]
        ordered: list[dict[str, Any]] = []
        pool = list(up)
        while pool:
            pick = self._rng.choices(pool, weights=[max(r["weight"], 1e-9) for r in pool])[0]
            ordered.append(pick)
            pool.remove(pick)
        return ordered + down

    async def detect_bytes(self, model: str, body: bytes) -> dict[str, Any]:
        """Handle and HTTP path: one image to one of the model's placements."""
        if not body:
            raise BadRequest("empty request body: send a JPEG or PNG image as the body")
        if len(body) > self._max_body_bytes:
            raise PayloadTooLarge(f"body of {len(body)} bytes exceeds max_body_bytes={self._max_body_bytes}")
        last: str = "no placement answered"
        for row in self._order(model):
            name = row["deployment"]
            try:
                resp = row["handle"].detect_placed.remote(DetectRequest.encoded(body))
                placed: PlacedResult = await asyncio.wait_for(resp, timeout=self._timeout_s)
            except asyncio.TimeoutError:
                last = f"{name}: no replica answered in {self._timeout_s:.0f} s (is a node with tag {row['tag']!r} alive?)"
            except Exception as exc:  # a replica died mid-request (node left), or answered an error
                ours = as_edgebatch_error(exc)
                if ours is not None and ours.status < 500:
                    raise ours from None  # the request is wrong (not an image, too large), not the placement
                last = f"{name}: {ours.message if ours else f'{type(exc).__name__}: {exc}'}"
            else:
                self._served[name] = self._served.get(name, 0) + 1
                return {**placed.result.to_json(), "served_by": dataclasses.asdict(placed.served_by),
                        "placement": row["placement"]}
            log.warning("placement %s skipped for %.0f s: %s", name, self._retry_after_s, last)
            self._down_until[name] = time.monotonic() + self._retry_after_s
        raise Unavailable(f"model '{model}': every placement failed; last: {last}; see `edgebatch status`")

    def tenancy(self) -> dict[str, Any]:
        """Routes, weights, resources, and how many requests each placement served."""
        now = time.monotonic()
        return {
            "models": {
                m: [{**{k: v for k, v in r.items() if k != "handle"},
                     "served": self._served.get(r["deployment"], 0),
                     "skipped_for_s": round(max(0.0, self._down_until.get(r["deployment"], 0.0) - now), 1)}
                    for r in rows]
                for m, rows in self._routes.items()
            }
        }

    @api.get("/v1/tenancy")
    async def http_tenancy(self) -> dict:
        return self.tenancy()

    @api.post("/{model}/v1/detect")
    async def http_detect(self, model: str, request: Request) -> JSONResponse:
        body = await read_inference_body(request, self._max_body_bytes, self._token, self._auth_inference)
        return JSONResponse(await self.detect_bytes(model, body))


def build_app(args: dict[str, Any] | None = None) -> Application:
    """One Detector deployment per (model, placement) and the ModelRouter ingress over them."""
    args = dict(args or {})
    router_opts = {k: args.pop(k) for k in ("placement_timeout_s", "retry_after_s") if k in args}
    config = parse_tenancy(args, "args")
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
        table, **router_opts, auth_inference=config.auth_inference, max_body_bytes=config.max_body_bytes
    )


# -- why replicas cannot start ------------------------------------------------------

def missing_resources(required: dict[str, float], alive_nodes: list[dict[str, float]]) -> list[str]:
    """Resources no alive node offers in the amount one replica asks (pure: testable on snapshots)."""
    missing = []
    for name, amount in sorted(required.items()):
        if amount and not any(node.get(name, 0.0) + 1e-9 >= amount for node in alive_nodes):
            missing.append(name)
    return missing


def pending_reasons() -> dict[str, dict[str, str]]:
    """app -> deployment -> why its replicas are not all running, naming the missing resource.

    Ray keeps such a replica PENDING without an error (the autoscaler only logs it),
    so ``edgebatch status`` asks the Serve controller what each deployment needs and
    compares it with the alive nodes' resources.
    """
    import ray
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    alive = [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]
    out: dict[str, dict[str, str]] = {}
    for app_name, app in (details.get("applications") or {}).items():
        for dep_name, dep in (app.get("deployments") or {}).items():
            running = sum(1 for r in dep.get("replicas", []) if r.get("state") == "RUNNING")
            target = dep.get("target_num_replicas") or 0
            if running >= target:
                continue
            required = _required(dep)
            missing = missing_resources(required, alive)
            split = split_deployment_name(dep_name)
            who = f"model {split[0]} placement {split[1]}" if split else f"deployment {dep_name}"
            if missing:
                res = ", ".join(missing)
                line = (
                    f"no alive node offers resource {res} for {who} ({running}/{target} replicas running, "
                    f"each needs {required}); start a node whose `ray start --resources` declares {res}, "
                    "or change the placement"
                )
            else:
                line = (
                    f"{who}: {running}/{target} replicas running; nodes offering {sorted(required)} exist "
                    "but are full, or the replicas are still starting"
                )
            out.setdefault(app_name, {})[dep_name] = line
    return out


def _required(dep: dict[str, Any]) -> dict[str, float]:
    """One replica's resource request from the controller's deployment details."""
    req = dep.get("required_resources")
    if req:
        return {k: float(v) for k, v in req.items()}
    opts = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
    out = {k: float(v) for k, v in (opts.get("resources") or {}).items()}
    if opts.get("num_gpus"):
        out["GPU"] = float(opts["num_gpus"])
    if opts.get("num_cpus"):
        out["CPU"] = float(opts["num_cpus"])
    return out
