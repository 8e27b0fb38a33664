"""Shared fixtures: one state folder, one demo registry and ONE Ray instance for the whole session.

The Ray instance is a ``ray.cluster_utils.Cluster`` (a head node here) so the
multi-node tests can add and remove nodes on the same instance.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # throwaway test cluster on loopback

from app.config import DetectorConfig
from app.state import StateDir
from deployments.config_file import NODE_ENV

for _k, _v in NODE_ENV.items():  # the test cluster passes objects and stamps arrivals as `edgebatch up`'s does
    os.environ.setdefault(_k, _v)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, timeout_s: float = 20) -> None:
    """Terminate a child process (a Prometheus server), kill it if it does not go."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    """Poll ``predicate`` until truthy or fail naming ``what`` (a deadline, not a sleep-as-sync)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="session")
def state(tmp_path_factory) -> StateDir:
    root = tmp_path_factory.mktemp("edgebatch-home")
    os.environ["EDGEBATCH_HOME"] = str(root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return StateDir(Path(root)).ensure()


@pytest.fixture(scope="session")
def demo_repo(state):
    """The session's MLflow repository (SQLite in the state folder) with the demo detector registered."""
    from model_registry.demo import ensure_demo_model
    from model_registry.repository import ModelRepository

    repo = ModelRepository(state.tracking_uri, state=state)
    version = ensure_demo_model(repo)
    return repo, version


@pytest.fixture(scope="session")
def ray_cluster(state):
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield cluster
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


# The test cluster's Detector: alias moves are seen within half a second, and a request that names
# no deadline gets the longest one a client may ask (max_deadline_s), not the product's 3 s. CI's two
# cores stall for seconds under the session's other replicas; with 3 s such a stall is the deadline
# working (a JSON 503), which made tests about batching, swaps and parsing fail by chance. Tests
# about the deadline itself ask their own budget (X-Request-Timeout); the Detector-kill test asks
# for the product's default, so that what the killed replica held is answered within it.
TEST_DETECTOR_SETTINGS = {"alias_poll_s": 0.5, "deadline_s": DetectorConfig().max_deadline_s}


@pytest.fixture(scope="session")
def serve_app(ray_cluster, demo_repo, state):
    """The edgebatch application deployed from deployments/serve_config.yaml on a free port."""
    import httpx

    from deployments import launcher
    from deployments.config_file import load_serve_config

    port = free_port()
    config = load_serve_config(None, state, port=port)
    det = config["applications"][0]["deployments"][0]
    det["user_config"].update(TEST_DETECTOR_SETTINGS)
    det["graceful_shutdown_timeout_s"] = 1
    launcher.deploy(config)
    launcher.wait_running(timeout_s=240)
    base = f"http://127.0.0.1:{port}"

    def ready():
        try:
            return httpx.get(f"{base}/v2/health/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, 120, "the detector to be ready over HTTP")
    return {"url": base, "port": port, "config": config}


@pytest.fixture(scope="session")
def deploy_apps(serve_app, state):
    """Add or replace Serve applications beside the base ``edgebatch`` app, declaratively.

    Serve's declarative deploy replaces the whole set of applications, so every call
    re-submits the base config plus every extra app deployed so far in this session
    (unchanged apps keep their replicas). Call ``deploy_apps([app_dict, ...])`` where each
    dict is one entry of a Serve config's ``applications`` list (``name``,
    ``route_prefix``, ``import_path``, ``args``, ``deployments``); pass ``remove=[name]``
    to drop extra apps again. ``detector={...}`` changes the base Detector's ``user_config``
    from then on (``detector={}`` restores it). Returns the merged config.
    """
    from deployments import launcher
    from deployments.config_file import load_serve_config

    extra: dict[str, dict] = {}
    detector_changes: dict = {}

    def _deploy(apps: list[dict] | None = None, remove: list[str] | None = None, timeout_s: float = 240,
                detector: dict | None = None):
        for name in remove or []:
            extra.pop(name, None)
        for app in apps or []:
            extra[app["name"]] = app
        if detector is not None:
            detector_changes.clear()
            detector_changes.update(detector)
        config = load_serve_config(None, state, port=serve_app["port"])
        base = config["applications"][0]
        base["deployments"][0]["user_config"].update({**TEST_DETECTOR_SETTINGS, **detector_changes})
        base["deployments"][0]["graceful_shutdown_timeout_s"] = 1
        env = base["runtime_env"]
        merged = [base]
        for app in extra.values():
            app = dict(app)
            app.setdefault("runtime_env", {})
            app["runtime_env"] = {**app["runtime_env"], "env_vars": {**env["env_vars"], **app["runtime_env"].get("env_vars", {})}}
            merged.append(app)
        config["applications"] = merged
        launcher.deploy(config)
        for app in merged:
            launcher.wait_running(app["name"], timeout_s=timeout_s)
        return config

    return _deploy
