"""Deploy the Serve config declaratively and wait until it serves.

Deploys go through Serve's controller the same way `serve deploy` does, so a
later `serve deploy` that changes only `user_config` reconfigures the running
replicas instead of restarting them. The cluster lifecycle is in
``deployments.cluster``, the config file in ``deployments.config_file``, what
`status` shows in ``deployments.status``.
"""

from __future__ import annotations

import time
from typing import Any

from app.constants import DETECTOR_APP
from app.errors import Unavailable
from deployments.status import cause_line, serve_summary


def deploy(config: dict[str, Any]) -> float:
    """Submit the config to Serve's controller (what `serve deploy` does over the dashboard);
    returns the submission time, so a wait ignores the status of an earlier deploy."""
    from ray.serve._private.api import serve_start
    from ray.serve.schema import ServeDeploySchema

    validate = getattr(ServeDeploySchema, "model_validate", None) or ServeDeploySchema.parse_obj
    schema = validate(config)
    # as Ray's dashboard does for `serve deploy`: the first deploy starts Serve with the config's
    # HTTP options and proxy_location (HeadOnly: no proxy on the edge nodes)
    client = serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location,
                         grpc_options=schema.grpc_options.model_dump(), global_logging_config=schema.logging_config,
                         controller_options=schema.controller_options)
    submitted = time.time()
    client.deploy_apps(schema)
    return submitted


def wait_running(app_name: str = DETECTOR_APP, timeout_s: float = 180.0, since: float | None = None) -> dict[str, Any]:
    """Poll Serve's status until the app runs; surface the reason when it cannot (deploy failure,
    a resource no node has). With ``since`` (from `deploy`), a status older than that deploy (a
    DEPLOY_FAILED left by the previous config) is not taken as this deploy's answer."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        app = serve.status().applications.get(app_name)
        if app is not None and (since is None or (app.last_deployed_time_s or 0) >= since - 1.0):
            state = str(app.status.value if hasattr(app.status, "value") else app.status)
            if state == "RUNNING":
                return serve_summary()
            if state in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise Unavailable(f"application '{app_name}' is {state}: {cause_line(app.message)}"
                                  + _deployment_messages(app))
            last = cause_line(app.message) + _deployment_messages(app)
        time.sleep(0.5)  # polling Serve's status; not used as synchronisation in tests
    raise Unavailable(f"application '{app_name}' not running after {timeout_s:.0f} s: {last or 'no status yet'}")


def _deployment_messages(app: Any) -> str:
    return "".join(f"\n  {name}: {d.status}: {cause_line(d.message)}" for name, d in app.deployments.items() if d.message)


def shutdown_serve() -> None:
    from ray import serve

    serve.shutdown()
