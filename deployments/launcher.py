"""Start or join Ray, deploy the Serve config declaratively, wait until it serves.

Deploys go through Serve's controller the same way `serve deploy` does, so a
later `serve deploy` that changes only `user_config` reconfigures the running
replicas instead of restarting them.
"""

from __future__ import annotations

import copy
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
    return config


def ray_running(address: str | None = None) -> bool:
    """Is there a Ray cluster to join (RAY_ADDRESS, or a local head started by `ray start`)?"""
    import ray

    if ray.is_initialized():
        return True
    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR", log_to_driver=False)
        return True
    except (ConnectionError, RuntimeError, ValueError):
        return False


def start_local_head(num_cpus: int | None = None, dashboard: bool = True) -> None:
    """`ray start --head` on this machine (the dashboard serves `serve deploy` on :8265)."""
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--head", "--disable-usage-stats", "--dashboard-host=127.0.0.1"]
    cmd.append(f"--include-dashboard={'true' if dashboard else 'false'}")
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise Unavailable(f"`ray start --head` failed:\n{proc.stderr.strip() or proc.stdout.strip()}")


def stop_local() -> str:
    ray_bin = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run([ray_bin, "stop"], capture_output=True, text=True)
    return proc.stdout.strip() or proc.stderr.strip()


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
        out["applications"][app_name] = entry
    return out


def shutdown_serve() -> None:
    from ray import serve

    serve.shutdown()
