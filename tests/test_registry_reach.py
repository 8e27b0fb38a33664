"""Replicas on every node use the registry and state of the instance that deployed them (issue 15,
point 4), and a replica that cannot reach the registry says so in `edgebatch status`, in one line.

The multi-node case runs on the session's ``ray.cluster_utils.Cluster``: a worker node whose own
environment points at another state folder and SQLite file (its node-local default), as a second
host's would. `tests/test_rayup.py` shows the same on hosts of their own, with `ray up`.
"""

from __future__ import annotations

import httpx
import pytest

from app.errors import Unavailable
from app.state import StateDir
from deployments.cluster import registry_reach_warning
from deployments.config_file import instance_env
from model_registry.repository import ModelRepository
from tests.conftest import free_port, wait_for

REACH_TAG = "reach_node"


def test_every_replica_is_told_the_registry_up_uses(tmp_path, monkeypatch):
    state = StateDir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert instance_env(state)["MLFLOW_TRACKING_URI"] == state.tracking_uri  # never a node's own default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.0.0.1:5000")
    env = instance_env(state)
    assert env["MLFLOW_TRACKING_URI"] == "http://10.0.0.1:5000" and env["EDGEBATCH_HOME"] == str(tmp_path)


def test_a_replica_does_not_take_a_missing_sqlite_file_for_an_empty_registry(tmp_path):
    db = tmp_path / "head-only" / "mlflow.db"
    repo = ModelRepository(f"sqlite:///{db}", state=StateDir(tmp_path), reader=True)
    with pytest.raises(Unavailable, match="does not exist on this node.*SQLite registry serves only the host"):
        repo.resolve("demo-detector", alias="production")
    assert not db.exists()


def test_up_warns_when_other_hosts_cannot_reach_the_registry():
    def repo(uri: str) -> ModelRepository:
        return ModelRepository(uri, state=StateDir(__import__("pathlib").Path("/nonexistent")))

    sqlite, loopback, shared = repo("sqlite:////x/mlflow.db"), repo("http://127.0.0.1:5000"), repo("http://10.0.0.1:5000")
    assert sqlite.host_local and loopback.host_local and not shared.host_local
    one_host = ["10.0.0.1", "10.0.0.1"]  # several raylets of one machine (ray.cluster_utils)
    assert registry_reach_warning(sqlite.tracking_uri, True, "10.0.0.1", one_host) is None
    assert registry_reach_warning(shared.tracking_uri, False, "10.0.0.1", ["10.0.0.1", "10.0.0.2"]) is None
    line = registry_reach_warning(loopback.tracking_uri, True, "10.0.0.1", ["10.0.0.1", "10.0.0.2", "10.0.0.3"])
    assert line.startswith("warning:") and "2 other host(s)" in line and "MLFLOW_TRACKING_URI=http://<head-ip>:5000" in line


def _detector_app(name: str, **extra) -> dict:
    return {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "deployments.app:build_app",
        "args": {},
        "deployments": [{
            "name": "Detector",
            "num_replicas": 1,
            "max_ongoing_requests": 16,
            "graceful_shutdown_timeout_s": 1,
            "ray_actor_options": {"num_cpus": 0, **extra.pop("ray_actor_options", {})},
            "user_config": {"model": "demo-detector", "alias": "production", "batch_sizes": [1, 2],
                            "max_batch_size": 2, "alias_poll_s": 0, "intra_op_threads": 1},
        }],
        **extra,
    }


def _replica_nodes(app: str) -> list[str]:
    from ray.serve.context import _get_global_client

    dep = _get_global_client().get_serve_details()["applications"][app]["deployments"]["Detector"]
    return [r["node_id"] for r in dep["replicas"] if r["state"] == "RUNNING"]


@pytest.fixture
def other_host(ray_cluster, tmp_path):
    """A worker node whose own default state folder and registry are not the head's."""
    other = tmp_path / "worker-home"
    node = ray_cluster.add_node(num_cpus=1, resources={REACH_TAG: 1}, env_vars={
        "EDGEBATCH_HOME": str(other), "MLFLOW_TRACKING_URI": f"sqlite:///{other / 'mlflow.db'}"})
    ray_cluster.wait_for_nodes()
    yield node
    ray_cluster.remove_node(node)


def test_a_replica_on_another_node_finds_the_heads_registry(other_host, deploy_apps, serve_app, demo_repo):
    deploy_apps([_detector_app("reach", ray_actor_options={"resources": {REACH_TAG: 0.001}})], timeout_s=240)
    try:
        assert _replica_nodes("reach") == [other_host.node_id]
        from app.bench.images import sample_jpegs

        r = httpx.post(f"{serve_app['url']}/reach/v1/detect", content=sample_jpegs(1, 320, 240)[0],
                       headers={"Content-Type": "image/jpeg"}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "demo-detector" and r.json()["version"] == str(demo_repo[1])
    finally:
        deploy_apps(remove=["reach"], timeout_s=120)


def test_status_says_in_one_line_that_a_replica_cannot_reach_the_registry(deploy_apps, serve_app, capsys):
    from app.cli import main
    from deployments.status import serve_summary

    unreachable = f"http://127.0.0.1:{free_port()}"
    app = _detector_app("unreach", runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": unreachable}})
    try:
        with pytest.raises(Unavailable, match="not reachable"):
            deploy_apps([app], timeout_s=120)
        wait_for(lambda: serve_summary()["applications"]["unreach"]["status"] == "DEPLOY_FAILED", 60,
                 "the app without a registry to be DEPLOY_FAILED")
        capsys.readouterr()
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        lines = [ln for ln in out.splitlines() if unreachable in ln]
        assert len(lines) == 1, out
        assert "is not reachable (connection refused" in lines[0] and "mlflow server" in lines[0]
        assert "Traceback" not in out and 'File "' not in out
    finally:
        deploy_apps(remove=["unreach"], timeout_s=120)
