"""The Serve config file: read, check, complete for this instance, export.

`edgebatch up` and Ray's own `serve deploy` must see the same YAML, or Serve treats
the difference (the runtime_env `up` fills in) as new code and restarts every
replica. So the completed config is one function's output: `up` deploys it and
`edgebatch config export` prints it for `serve deploy`.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from app.constants import DETECTOR_APP_IMPORT_PATH, DETECTOR_DEPLOYMENT, HEAD_PIN
from app.errors import ConfigError
from app.imaging import DEFAULT_MAX_IMAGE_PIXELS, OPENCV_PIXELS_ENV
from app.state import StateDir
from deployments.proxy_stamp import PROXY_ENV

DEFAULT_CONFIG = Path(__file__).with_name("serve_config.yaml")
DIRECT_INGRESS_ENV = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
#: Ray passes call arguments and results under this size inline (gRPC between the two workers); larger
#: ones go through the node's object store (raylet, shared memory, pinning). Ray's 100 KiB default puts
#: every camera JPEG (about 130 KB at 1280x720) and every uint8 frame of 320x320 or more in the store: under
#: 200 clients that halved the images/s served and tripled refusal latency (docs/reliability.md).
INLINE_OBJECT_ENV = {"RAY_max_direct_call_object_size": str(4 << 20)}
#: what every node's `ray start` exports, so Serve's proxies and replicas there get it too
NODE_ENV = {**INLINE_OBJECT_ENV, **PROXY_ENV}
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# Apps that run on the head node unless their YAML names other resources: the detector of the
# single-detector app, the batch controller, the streams ingress, the collectors' supervisor.
HEAD_PINNED_APPS = (DETECTOR_APP_IMPORT_PATH, "deployments.controller:build_app", "deployments.streams:build_app",
                    "deployments.collectors:build_app")


def read_serve_config(path: Path | None) -> dict[str, Any]:
    """The YAML as written, with its structure checked (a wrong shape is named by its key)."""
    path = Path(path or DEFAULT_CONFIG)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"Serve config {path} not found; pass --config or use {DEFAULT_CONFIG}") from None
    except IsADirectoryError:
        raise ConfigError(f"Serve config {path} is a folder; pass the YAML file") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"Serve config {path} is not valid YAML: {exc}") from None
    check_structure(config, path)
    return config


def _expect(value: Any, kind: type, where: str, path: object) -> None:
    names = {dict: "a mapping (key: value)", list: "a list (- item)", str: "a string"}
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: {where} must be {names[kind]}, got {type(value).__name__}: {str(value)[:60]!r}")


def check_structure(config: Any, path: object = "the Serve config") -> None:
    """The shape Serve's schema and our completion rely on, checked before either touches it."""
    _expect(config, dict, "the top level", path)
    if "http_options" in config:
        _expect(config["http_options"], dict, "http_options", path)
    apps = config.get("applications")
    if apps is None:
        raise ConfigError(f"{path}: `applications` is missing; see {DEFAULT_CONFIG}")
    _expect(apps, list, "applications", path)
    for i, app in enumerate(apps):
        _expect(app, dict, f"applications[{i}]", path)
        name = app.get("name", "?")
        if "runtime_env" in app:
            _expect(app["runtime_env"], dict, f"applications[{i}] ({name}).runtime_env", path)
            if "env_vars" in app["runtime_env"]:
                _expect(app["runtime_env"]["env_vars"], dict, f"applications[{i}] ({name}).runtime_env.env_vars", path)
        if "args" in app and app["args"] is not None:
            _expect(app["args"], dict, f"applications[{i}] ({name}).args", path)
        deps = app.get("deployments")
        if deps is None:
            continue
        _expect(deps, list, f"applications[{i}] ({name}).deployments", path)
        for j, dep in enumerate(deps):
            _expect(dep, dict, f"applications[{i}] ({name}).deployments[{j}]", path)
            if dep.get("user_config") is not None:
                _expect(dep["user_config"], dict, f"applications[{i}] ({name}).deployments[{j}].user_config", path)


def instance_env(state: StateDir, direct_ingress: bool = False) -> dict[str, str]:
    """Environment every replica of this instance gets, whatever node it runs on: the head's state
    folder and registry address, never the default of the node a replica lands on."""
    env = {
        "EDGEBATCH_HOME": str(state.root),
        "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI") or state.tracking_uri,
        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        "PYTHONPATH": PROJECT_ROOT,
        # OpenCV reads its allocation limit once, at `import cv2`: set before any replica decodes
        OPENCV_PIXELS_ENV: str(DEFAULT_MAX_IMAGE_PIXELS),
        **INLINE_OBJECT_ENV,
    }
    if direct_ingress:
        env[DIRECT_INGRESS_ENV] = "1"
    return env


def complete_serve_config(config: dict[str, Any], state: StateDir, *, port: int | None = None,
                          direct_ingress: bool = False) -> dict[str, Any]:
    """The config `up` applies: the HTTP port of this instance, every app's runtime_env pointing
    replicas at this instance's state and code (values already in the YAML win), and the control
    deployments pinned to the head node."""
    config = copy.deepcopy(config)
    if port is not None:
        config.setdefault("http_options", {})["port"] = port
    env_vars = instance_env(state, direct_ingress)
    for app in config["applications"]:
        runtime_env = app.setdefault("runtime_env", {})
        runtime_env["env_vars"] = {**env_vars, **runtime_env.get("env_vars", {})}
        pin_to_head(app)
    validate_schema(config)
    check_detector_configs(config)
    return config


def pin_to_head(app: dict[str, Any]) -> None:
    """Control deployments run on the head (the node `up` runs on, which a cluster cannot lose
    without losing Serve's controller too); one whose ``ray_actor_options`` names ``resources``
    keeps them, so an operator can still move the detector onto a GPU node."""
    if app.get("import_path") not in HEAD_PINNED_APPS:
        return
    for dep in app.get("deployments") or []:
        options = dep.setdefault("ray_actor_options", {})
        if isinstance(options, dict) and "resources" not in options:
            options["resources"] = dict(HEAD_PIN)


def load_serve_config(path: Path | None, state: StateDir, *, port: int | None = None,
                      direct_ingress: bool | None = None) -> dict[str, Any]:
    """Read, check and complete the Serve config for this instance (see `complete_serve_config`)."""
    if direct_ingress is None:
        direct_ingress = os.environ.get(DIRECT_INGRESS_ENV) == "1"
    config = read_serve_config(path)
    try:
        return complete_serve_config(config, state, port=port, direct_ingress=direct_ingress)
    except ConfigError as exc:
        raise ConfigError(f"{path or DEFAULT_CONFIG}: {exc.message}") from None


def validate_schema(config: dict[str, Any]) -> None:
    """Serve's own schema, with its first complaint named by its key path."""
    from ray.serve.schema import ServeDeploySchema

    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    try:
        validate(config)
    except Exception as exc:  # pydantic v1 or v2 inside Ray
        errors = getattr(exc, "errors", None)
        if callable(errors):
            first = errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ()))
            raise ConfigError(f"{where or 'config'}: {first.get('msg')}") from None
        raise ConfigError(f"invalid: {str(exc).splitlines()[0]}") from None


def check_detector_configs(config: dict[str, Any]) -> None:
    """Validate every Detector's ``user_config`` before Serve sees it, so a bad field is named
    here (``applications[0] (edgebatch).deployments[0].user_config: max_batch_size ...``)
    instead of surfacing later as a refused reconfigure."""
    from app.config import DetectorConfig, parse_config

    for i, app in enumerate(config.get("applications", [])):
        if app.get("import_path") != DETECTOR_APP_IMPORT_PATH:
            continue
        for j, dep in enumerate(app.get("deployments") or []):
            if dep.get("name") == DETECTOR_DEPLOYMENT and dep.get("user_config") is not None:
                where = f"applications[{i}] ({app.get('name')}).deployments[{j}].user_config"
                parse_config(DetectorConfig, dep["user_config"], where)


def export_yaml(config: dict[str, Any]) -> str:
    """The completed config as YAML for `serve deploy` (the same dict `up` deploys)."""
    head = ("# Written by `edgebatch config export`: the exact config `edgebatch up` applies to this instance.\n"
            "# Edit user_config and `serve deploy` this file (with the environment of `edgebatch env`),\n"
            "# or `edgebatch up --config` it: either way only reconfigures the running replicas.\n")
    return head + yaml.safe_dump(config, sort_keys=False)
