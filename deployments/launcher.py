"""Start or join Ray, deploy the Serve config declaratively, wait until it serves.

Deploys go through Serve's controller the same way `serve deploy` does, so a
later `serve deploy` that changes only `user_config` reconfigures the running
replicas instead of restarting them.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from app.errors import ConfigError, Unavailable
from app.state import StateDir

DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
APP_NAME = "edgebatch"


def load_serve_config(path: Path | None, state: StateDir, *, port: int | None = None) -> dict[str, Any]:
    """Read the Serve config and point every replica at this project's state and code."""
    path = path or DEFAULT_CONFIG
    try:
        config = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"Serve config {path} not found; pass --config or use {DEFAULT_CONFIG}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Serve config {path} is not valid YAML: {exc}") from None
    config = copy.deepcopy(config)
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    project_root = str(Path(__file__).resolve().parent.parent)
    env_vars = {
        "EDGEBATCH_HOME": str(state.root),
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONPATH": project_root,
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        env_vars["MLFLOW_TRACKING_URI"] = os.environ["MLFLOW_TRACKING_URI"]
    if os.environ.get(DIRECT_INGRESS_ENV) == "1":
        env_vars[DIRECT_INGRESS_ENV] = "1"
    for app in config.get("applications", []):
        runtime_env = app.setdefault("runtime_env", {})
        merged = dict(env_vars)
        merged.update(runtime_env.get("env_vars", {}))
        runtime_env["env_vars"] = merged
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)
    except Exception as exc:  # pydantic v1/v2 inside Ray
        raise ConfigError(f"Serve config {path} is invalid: {exc}") from None
    check_detector_configs(config, path)
    return config


def check_detector_configs(config: dict, path: object = "the Serve config") -> None:
    """Validate every Detector's ``user_config`` before Serve sees it, so a bad field is named
    here (``applications[0].deployments[0].user_config.max_batch_size: ...``) instead of
    surfacing later as a failed replica reconfigure."""
    from app.config import DetectorConfig, parse_config

    for i, app in enumerate(config.get("applications", [])):
        if app.get("import_path") != "deployments.app:build_app":
            continue
        for j, dep in enumerate(app.get("deployments") or []):
            if dep.get("name") == "Detector" and dep.get("user_config") is not None:
                where = f"{path}: applications[{i}] ({app.get('name')}).deployments[{j}].user_config"
                parse_config(DetectorConfig, dep["user_config"], where)


def _head_record(state: StateDir) -> dict[str, Any]:
    """What `edgebatch up` noted about the head it started ({} when it started none)."""
    try:
        record = json.loads(state.ray_head_file.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) and "address" in record else {}


def cluster_address(state: StateDir | None = None) -> str:
    """Where to find Ray: RAY_ADDRESS, else the head `edgebatch up` started (recorded in the
    state folder), else Ray's own "auto" lookup of a head started on this machine."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    return _head_record(state or StateDir.default()).get("address", "auto")


def _gcs_answers(address: str, timeout_s: float = 2.0) -> bool:
    """A TCP probe of the GCS port first: ray.init on a dead address retries for minutes."""
    import socket

    if address == "auto":
        try:
            address = Path("/tmp/ray/ray_current_cluster").read_text().strip()
        except OSError:
            return False
    if address.startswith("ray://"):
        return True  # Ray Client: let ray.init report
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ray_running(address: str | None = None) -> bool:
    """Is there a Ray cluster to join (RAY_ADDRESS, the head `up` started, or a local head)?

    A head from `ray start` (Ray 2.60) wants token authentication, which a driver only sends when
    ``RAY_AUTH_MODE=token`` was set before Ray was imported: the CLI sets it first thing."""
    import ray

    if ray.is_initialized():
        return True
    address = address or cluster_address()
    if not _gcs_answers(address):
        return False
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the CLI prints its own lines
        return True
    except (ConnectionError, RuntimeError, ValueError):
        return False


def _ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def start_local_head(state: StateDir, num_cpus: int | None = None, dashboard: bool = True, port: int = 6379) -> str:
    """`ray start --head` on this machine (the dashboard serves `serve deploy` on :8265);
    records the address in the state folder so later commands and `down` find this head."""
    cmd = [_ray_bin(), "start", "--head", f"--port={port}", "--disable-usage-stats", "--dashboard-host=127.0.0.1"]
    cmd.append(f"--include-dashboard={'true' if dashboard else 'false'}")
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        hint = f"; port {port} is taken: pass --ray-port" if "already in use" in detail or "port" in detail.lower() else ""
        raise Unavailable(f"`ray start --head` failed{hint}:\n{detail[-1500:]}")
    address = f"127.0.0.1:{port}"
    state.ray_head_file.write_text(json.dumps({"address": address, "started_by": "edgebatch up"}))
    return address


def record_session(state: StateDir, direct_ingress: bool = False) -> None:
    """After connecting to the head `up` started, note its session folder so `down` stops that
    head's processes only (``ray stop`` would stop every Ray instance on the machine), and whether
    it was started with direct ingress."""
    import ray

    info = _head_record(state)
    if not info:
        return
    node = getattr(ray._private.worker, "_global_node", None)
    session_dir = node.get_session_dir_path() if node is not None else None
    if session_dir:
        info["session_dir"] = session_dir
    info["direct_ingress"] = bool(direct_ingress)
    state.ray_head_file.write_text(json.dumps(info))


def head_has_direct_ingress(state: StateDir) -> bool:
    return bool(_head_record(state).get("direct_ingress"))


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


def stop_local(state: StateDir, timeout_s: float = 15.0) -> str:
    """Stop the head `edgebatch up` started, and only that: a joined cluster is left alone."""
    import psutil

    info = _head_record(state)
    if not info:
        return "no Ray head started by `edgebatch up` is recorded here; any other Ray cluster is left running"
    port = info["address"].rpartition(":")[2]
    session_dir = info.get("session_dir") or _session_dir_of_gcs_port(port)
    if not session_dir:
        state.ray_head_file.unlink(missing_ok=True)
        return f"no Ray head runs at {info['address']} any more"
    # the head's own processes name its session folder (or its port) on their command line;
    # workers exit when their raylet goes (never `ray stop`: it would stop every cluster here)
    victims = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if session_dir in cmd or f":{port} " in cmd + " " and "ray" in cmd:
            victims.append(proc)
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    state.ray_head_file.unlink(missing_ok=True)
    return f"stopped the local Ray head at {info['address']} ({len(victims)} processes)"


def _session_dir_of_gcs_port(port: str) -> str | None:
    """The session folder of the head whose GCS listens on ``port`` (read off its command line)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        args = proc.info.get("cmdline") or []
        if any(a == f"--gcs_server_port={port}" for a in args):
            for a in args:
                if a.startswith("--log_dir="):
                    return str(Path(a.split("=", 1)[1]).parent)
    return None


def deploy(config: dict[str, Any]) -> None:
    """Submit the config to Serve's controller (what `serve deploy` does over the dashboard)."""
    from ray import serve
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    http = config.get("http_options", {})
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(config)
    client = serve_start(http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000)})
    client.deploy_apps(schema)
    del serve  # imported for its side effect of registering the Serve namespace


def wait_running(app_name: str = APP_NAME, timeout_s: float = 180.0) -> dict[str, Any]:
    """Poll Serve's status until the app runs; surface the reason when it cannot (deploy failure,
    a resource no node has)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        status = serve.status()
        app = status.applications.get(app_name)
        if app is not None:
            state = str(app.status.value if hasattr(app.status, "value") else app.status)
            if state == "RUNNING":
                return serve_summary()
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise Unavailable(f"application '{app_name}' is {state}: {app.message}" + _deployment_messages(app))
            last = (app.message or "") + _deployment_messages(app)
        time.sleep(0.5)  # polling Serve's status; not used as synchronisation in tests
    raise Unavailable(f"application '{app_name}' not running after {timeout_s:.0f} s: {last or 'no status yet'}")


def _deployment_messages(app: Any) -> str:
    msgs = []
    for name, d in app.deployments.items():
        if d.message:
            msgs.append(f"\n  {name}: {d.status}: {d.message}")
    return "".join(msgs)


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
                "message": d.message,
            }
        entry: dict[str, Any] = {
            "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "message": app.message,
            "deployments": deps,
        }
        if "Detector" in deps and entry["status"] == "RUNNING":
            try:
                handle = serve.get_deployment_handle("Detector", app_name=app_name)
                entry["detector"] = handle.info.remote().result(timeout_s=10)
            except Exception as exc:  # status must never fail because one replica is busy
                entry["detector"] = {"error": str(exc)}
        urls = direct_ingress_urls(app_name) if "Detector" in deps else []
        if urls:
            entry["direct_ingress"] = urls
        out["applications"][app_name] = entry
    _add_pending_reasons(out)
    _add_controller(out)
    return out


def _add_controller(summary: dict[str, Any]) -> None:
    """The batch controller's view per detector: size, policy, last decision and its reason."""
    from deployments.controller import APP_NAME as CONTROLLER_APP, DEPLOYMENT_NAME

    app = summary["applications"].get(CONTROLLER_APP)
    if not app or app.get("status") != "RUNNING":
        return
    try:
        from ray import serve

        status = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=CONTROLLER_APP).status.remote().result(timeout_s=10)
    except Exception as exc:  # status must never fail because the controller is busy
        app["controller"] = {"error": str(exc)}
        return
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
        summary["pending_error"] = str(exc)
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
