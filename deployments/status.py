"""What `edgebatch status` shows: applications, replicas and the node each runs on, the detector's
model and batch size, the controller's decision, replicas pending for a missing resource (with the
`ray start` flag that would offer it), this instance's ports."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from app.constants import DETECTOR_DEPLOYMENT, HEAD_NODE_RESOURCE
from app.errors import one_line
from app.tenancy import required_resources, split_deployment_name
from policies.placement import placement_shortfall


def cause_line(message: str | None) -> str:
    """A Serve status message in one line: its summary and the exception that caused it, without
    the traceback frames in between (a Ray task error has frames but no "Traceback" header)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    if not any(ln.startswith(("Traceback", "File ")) for ln in lines):
        return " ".join(lines)[-500:]
    kept = [ln for ln in lines if not ln.startswith(("File ", "Traceback", "^", "~", "ray::"))]
    errors = [ln for ln in kept if ":" in ln and ln.split(":", 1)[0].replace(".", "").isidentifier()]
    summary = lines[0] if lines[0] in kept and lines[0] not in errors else ""
    cause = errors[-1] if errors else (kept[-1] if kept else lines[-1])
    return f"{summary} {cause}".strip()[-500:]


def _plain(value: Any) -> Any:
    """A typed answer from a replica (dataclass or pydantic model) as plain JSON-able data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        to_dict = getattr(value, "to_dict", None)
        return to_dict() if callable(to_dict) else dataclasses.asdict(value)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    return value


def direct_ingress_urls(app_name: str) -> list[str]:
    """HTTP addresses at which an app's ingress replicas serve directly (Serve's direct ingress),
    or [] when it is off (then the only targets are the proxies). The replicas bind
    ``http_options.host``, so the URL uses that host."""
    import ray

    try:
        from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        groups = ray.get(controller.get_target_groups.remote(app_name=app_name), timeout=10)
        http = ray.get(controller.get_http_config.remote(), timeout=10)
    except Exception:  # an internal API of an experimental feature: never fail `up` or `status` on it
        return []
    host = getattr(http, "host", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    proxy_port = getattr(http, "port", None)
    return [f"http://{host}:{t.port}" for g in groups or [] if str(g.protocol).endswith("HTTP")
            for t in g.targets if t.port != proxy_port]


def serve_summary() -> dict[str, Any]:
    """Applications, deployments, replica counts and the model variant each detector has loaded."""
    from ray import serve

    status = serve.status()
    out: dict[str, Any] = {"applications": {}}
    for app_name, app in status.applications.items():
        deps = {}
        for name, d in app.deployments.items():
            deps[name] = {
                "status": str(d.status.value if hasattr(d.status, "value") else d.status),
                "replicas": {str(k.value if hasattr(k, "value") else k): v for k, v in d.replica_states.items()},
                "message": cause_line(d.message),
            }
        entry: dict[str, Any] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": cause_line(app.message),
            "deployments": deps,
        }
        if DETECTOR_DEPLOYMENT in deps and entry["status"] == "RUNNING":
            try:
                handle = serve.get_deployment_handle(DETECTOR_DEPLOYMENT, app_name=app_name)
                entry["detector"] = _plain(handle.info.remote().result(timeout_s=10))
            except Exception as exc:  # status must never fail because one replica is busy
                entry["detector"] = {"error": one_line(exc)}
        urls = direct_ingress_urls(app_name) if DETECTOR_DEPLOYMENT in deps else []
        if urls:
            entry["direct_ingress"] = urls
        out["applications"][app_name] = entry
    _add_pending_reasons(out)
    _add_controller(out)
    return out


def _add_controller(summary: dict[str, Any]) -> None:
    """The batch controller's view per detector: size, policy, last decision and its reason."""
    from deployments.controller import APP_NAME as CONTROLLER_APP
    from deployments.controller import DEPLOYMENT_NAME

    app = summary["applications"].get(CONTROLLER_APP)
    if not app or app.get("status") != "RUNNING":
        return
    try:
        from ray import serve

        status = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=CONTROLLER_APP).status.remote().result(timeout_s=10)
    except Exception as exc:  # status must never fail because the controller is busy
        app["controller"] = {"error": one_line(exc)}
        return
    status = _plain(status)
    app["controller"] = status
    for ctl in status.get("detectors", {}).values():
        det = summary["applications"].get(ctl.get("app"), {}).get("detector")
        if isinstance(det, dict) and "error" not in det:
            det["controller"] = ctl


def _add_pending_reasons(summary: dict[str, Any]) -> None:
    """Where each replica runs, and why replicas Ray keeps pending cannot start (multi-tenancy tags)."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
    except Exception as exc:  # status must never fail because Ray's state API is slow or busy
        summary["pending_error"] = one_line(exc)
        return
    by_id = {n["NodeID"]: n for n in nodes}
    alive = [dict(n.get("Resources", {})) for n in nodes]
    for app_name, app_details in (details.get("applications") or {}).items():
        app = summary["applications"].setdefault(app_name, {"deployments": {}})
        for dep_name, dep_details in (app_details.get("deployments") or {}).items():
            dep = app["deployments"].get(dep_name)
            if dep is not None:
                dep["replica_nodes"] = [replica_node(r, by_id) for r in dep_details.get("replicas", [])]
            line = pending_line(dep_name, dep_details, alive)
            if line is None:
                continue
            app.setdefault("pending", {})[dep_name] = line
            if dep is not None:  # `edgebatch status` prints each deployment's message
                dep["message"] = f"{dep['message']}; {line}" if dep.get("message") else line


def node_tags(resources: dict[str, float]) -> list[str]:
    """A node's kind tags (``gpu_node``...) and ``head``, from the resources it declared."""
    tags = sorted(k for k in resources if k.endswith("_node"))
    return (["head"] if HEAD_NODE_RESOURCE in resources else []) + tags


def replica_node(replica: dict[str, Any], nodes_by_id: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One replica's state, process and node (IP, id, tags) from Serve's replica details."""
    node = nodes_by_id.get(replica.get("node_id") or "")
    return {"state": replica.get("state"), "pid": replica.get("pid"), "node_id": replica.get("node_id"),
            "node_ip": replica.get("node_ip") or (node or {}).get("NodeManagerAddress"),
            "tags": node_tags(node.get("Resources", {})) if node else []}


def ray_start_flags(resources: list[str]) -> str:
    """The `ray start` flags that declare these resources: GPUs and CPUs are counts, the rest custom."""
    flags, custom = [], {}
    for name in resources:
        if name == "GPU":
            flags.append("--num-gpus=1")
        elif name == "CPU":
            flags.append("--num-cpus=1")
        else:
            custom[name] = 1
    if custom:
        flags.append("--resources='" + json.dumps(custom) + "'")
    return " ".join(flags)


def pending_line(dep_name: str, dep: dict[str, Any], alive: list[dict[str, float]]) -> str | None:
    """Why a deployment runs fewer replicas than its target, naming what no alive node offers."""
    running = sum(1 for r in dep.get("replicas", []) if r.get("state") == "RUNNING")
    required = _required(dep)
    short = placement_shortfall(required, running, int(dep.get("target_num_replicas") or 0), alive)
    if short is None:
        return None
    split = split_deployment_name(dep_name)
    who = f"model {split[0]} placement {split[1]}" if split else f"deployment {dep_name}"
    asks = {k: v for k, v in sorted(required.items()) if v}
    if HEAD_NODE_RESOURCE in short.missing:
        return f"{who}: {running}/{short.target} replicas running; it is pinned to the head node, which is not alive"
    if short.missing:
        res = ", ".join(short.missing)
        return (f"no alive node offers resource {res} for {who} ({running}/{short.target} replicas running, "
                f"each needs {asks}); start a node with `ray start {ray_start_flags(list(short.missing))}`, "
                "or change the placement")
    return (f"{who}: {running}/{short.target} replicas running; nodes offering {sorted(asks)} exist "
            "but are full, or the replicas are still starting")


def _required(dep: dict[str, Any]) -> dict[str, float]:
    """One replica's resource request from the controller's deployment details."""
    req = dep.get("required_resources")
    if req:
        return {k: float(v) for k, v in req.items()}
    return required_resources((dep.get("deployment_config") or {}).get("ray_actor_options") or {})


def shutdown_serve() -> None:
    from ray import serve

    serve.shutdown()
