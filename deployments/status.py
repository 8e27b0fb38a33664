"""What `edgebatch status` shows: applications, replicas, the detector's model and batch size,
the controller's decision, replicas pending for a missing resource, this instance's ports."""

from __future__ import annotations

import dataclasses
from typing import Any

from app.constants import DETECTOR_DEPLOYMENT
from app.errors import one_line


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
    """Replicas Ray keeps pending for a resource no alive node offers: say so (multi-tenancy tags)."""
    try:
        from deployments.tenancy import pending_reasons

        reasons = pending_reasons()
    except Exception as exc:  # status must never fail because Ray's state API is slow or busy
        summary["pending_error"] = one_line(exc)
        return
    for app_name, by_deployment in reasons.items():
        app = summary["applications"].setdefault(app_name, {"deployments": {}})
        app["pending"] = by_deployment
        for dep_name, line in by_deployment.items():
            dep = app["deployments"].get(dep_name)
            if dep is not None:  # `edgebatch status` prints each deployment's message
                dep["message"] = f"{dep['message']}; {line}" if dep.get("message") else line


def shutdown_serve() -> None:
    from ray import serve

    serve.shutdown()
