"""Multi-tenancy on a local multi-node Ray cluster: tags decide placement (DMP), shares pack
replicas on one device (CME), a model spreads over its placements, node loss reschedules or
is reported by `edgebatch status`.

The tags matter here, not the hardware: every placement runs the demo model with ONNX on the
CPU; "gpu_dev" stands in for a GPU count (a fractional custom resource like num_gpus).
The tests below share one deployment and run in file order.
"""

from __future__ import annotations

import httpx
import pytest

from app.errors import ConfigError
from app.tenancy import parse_tenancy, tag_resource
from tests.conftest import wait_for

APP = "tenancy"
MODEL = "demo-detector"
GPU_DEP, TPU_DEP = f"{MODEL}.gpu", f"{MODEL}.edgetpu"


def tenancy_app() -> dict:
    placement_common = {"backend": "onnx", "user_config": {"batch_sizes": [1, 2], "max_batch_size": 2,
                                                           "alias_poll_s": 0, "intra_op_threads": 1}}
    return {
        "name": APP,
        "route_prefix": "/tenancy",
        "import_path": "deployments.tenancy:build_app",
        "args": {
            "graceful_shutdown_timeout_s": 1,
            "placement_timeout_s": 8,
            "retry_after_s": 30,
            "models": [{
                "name": MODEL,
                "placements": [
                    # CME: two replicas share one "GPU" (0.5 each)
                    {"name": "gpu", "tag": "gpu", "replicas_per_device": 2,
                     "device": {"resource": "gpu_dev"}, "throughput_items_s": 10, **placement_common},
                    {"name": "edgetpu", "tag": "edgetpu", "throughput_items_s": 10, **placement_common},
                ],
            }],
        },
    }


# -- schema and pure helpers (no Ray) --------------------------------------------------

def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"models\.0\.placements\.0\.tag"):
        parse_tenancy({"models": [{"name": "m", "placements": [{"tag": "GPU node"}]}]})
    with pytest.raises(ConfigError, match="exceeds one device"):
        parse_tenancy({"models": [{"name": "m", "placements": [
            {"tag": "gpu", "replicas_per_device": 4, "device": {"resource": "GPU", "share": 0.5}}]}]})
    with pytest.raises(ConfigError, match="placement names must be unique"):
        parse_tenancy({"models": [{"name": "m", "placements": [{"tag": "gpu"}, {"tag": "gpu"}]}]})


def test_resources_and_weights_from_config():
    from deployments.tenancy import missing_resources, route_table

    cfg = parse_tenancy({"models": [{"name": "m", "placements": [
        {"tag": "gpu", "backend": "tensorrt", "replicas_per_device": 4, "throughput_items_s": 300},
        {"tag": "edgetpu", "backend": "edgetpu", "throughput_items_s": 100},
    ]}]})
    gpu, tpu = route_table(cfg)["m"]
    assert gpu["ray_actor_options"] == {"num_cpus": 0.0, "num_gpus": 0.25, "resources": {"gpu_node": 0.001}}
    assert tpu["ray_actor_options"]["resources"] == {"edgetpu_node": 0.001, "edgetpu": 1.0}
    assert (gpu["weight"], tpu["weight"]) == (0.75, 0.25)
    too_many = parse_tenancy({"models": [{"name": "m", "placements": [
        {"tag": "gpu", "replicas_per_device": 4, "instance_memory_mb": 3000, "device_memory_mb": 8000}]}]})
    with pytest.raises(ConfigError, match=r"replicas_per_device.*memory holds 2"):
        route_table(too_many)
    nodes = [{"CPU": 4.0}, {"CPU": 1.0, "gpu_node": 1.0, "GPU": 1.0}]
    assert missing_resources({"gpu_node": 0.001, "GPU": 0.25}, nodes) == []
    assert missing_resources({"edgetpu_node": 0.001, "edgetpu": 1.0}, nodes) == ["edgetpu", "edgetpu_node"]


# -- on the session's Ray cluster -------------------------------------------------------

@pytest.fixture(scope="module")
def cluster_nodes(ray_cluster, demo_repo):
    """Extra nodes added by these tests (removed again at the end, whatever happened)."""
    import ray

    added: dict[str, object] = {}

    def add(key: str, resources: dict[str, float]):
        node = ray_cluster.add_node(num_cpus=1, resources=resources)
        added[key] = node
        ray_cluster.wait_for_nodes()
        return node

    def remove(key: str):
        node = added.pop(key)
        ray_cluster.remove_node(node)

    def node_id(key: str) -> str:
        return added[key].node_id

    yield {"add": add, "remove": remove, "node_id": node_id, "added": added}
    for node in list(added.values()):
        ray_cluster.remove_node(node)
    del ray


def _replicas(deployment: str) -> list[dict]:
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details().get("applications", {})
    dep = apps.get(APP, {}).get("deployments", {}).get(deployment, {})
    return [r for r in dep.get("replicas", []) if r.get("state") == "RUNNING"]


def _router():
    from ray import serve

    return serve.get_deployment_handle("ModelRouter", app_name=APP)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    from app.bench.images import sample_jpegs

    return sample_jpegs(1, 640, 360)[0]


@pytest.fixture(scope="module")
def deployed(cluster_nodes, deploy_apps):
    cluster_nodes["add"]("gpu_a", {tag_resource("gpu"): 1, "gpu_dev": 1})
    cluster_nodes["add"]("tpu", {tag_resource("edgetpu"): 1, "edgetpu": 1})
    deploy_apps([tenancy_app()], timeout_s=300)
    yield cluster_nodes
    deploy_apps(remove=[APP], timeout_s=120)


def test_replicas_land_only_on_tagged_nodes_and_cme_shares_one_device(deployed):
    gpu = _replicas(GPU_DEP)
    tpu = _replicas(TPU_DEP)
    assert len(gpu) == 2 and len(tpu) == 1
    # both CME replicas (0.5 gpu_dev each) on the one node that has the tag and the device
    assert {r["node_id"] for r in gpu} == {deployed["node_id"]("gpu_a")}
    assert len({r["pid"] for r in gpu}) == 2
    assert {r["node_id"] for r in tpu} == {deployed["node_id"]("tpu")}


def test_model_with_two_placements_serves_from_both(deployed, jpeg, serve_app):
    router = _router()
    served = [router.detect_bytes.remote(MODEL, jpeg).result(timeout_s=120) for _ in range(16)]
    by_placement = {s["placement"] for s in served}
    assert by_placement == {"gpu", "edgetpu"}  # equal capacities: P(one never drawn) = 2 * 0.5**16
    nodes = {s["placement"]: {s["served_by"]["node_id"]} for s in served}
    assert nodes["gpu"] == {deployed["node_id"]("gpu_a")} and nodes["edgetpu"] == {deployed["node_id"]("tpu")}
    assert all(s["model"] == MODEL and "detections" in s for s in served)
    # over HTTP too, with clear 4xx for bad input
    base = f"{serve_app['url']}/tenancy"
    r = httpx.post(f"{base}/{MODEL}/v1/detect", content=jpeg, timeout=120)
    assert r.status_code == 200 and r.json()["placement"] in ("gpu", "edgetpu")
    r = httpx.post(f"{base}/nope/v1/detect", content=jpeg, timeout=60)
    assert r.status_code == 404 and "demo-detector" in r.json()["error"]
    r = httpx.post(f"{base}/{MODEL}/v1/detect", content=b"", timeout=60)
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = httpx.post(f"{base}/{MODEL}/v1/detect", content=b"not an image", timeout=60)  # refused by the replica
    assert r.status_code == 400 and "not a decodable image" in r.json()["error"]
    table = httpx.get(f"{base}/v1/tenancy", timeout=60).json()["models"][MODEL]
    assert {row["placement"]: row["served"] > 0 for row in table} == {"gpu": True, "edgetpu": True}


def test_concurrency_level_changes_in_place(deployed, deploy_apps):
    """A `deployments:` override of num_replicas is applied by a declarative deploy without
    restarting the replicas that stay (the other placement is not touched at all)."""
    gpu_pids = {r["pid"] for r in _replicas(GPU_DEP)}
    tpu_pids = {r["pid"] for r in _replicas(TPU_DEP)}
    app = tenancy_app()
    app["deployments"] = [{"name": GPU_DEP, "num_replicas": 1}]
    deploy_apps([app], timeout_s=240)
    wait_for(lambda: len(_replicas(GPU_DEP)) == 1, 120, "the gpu placement to scale down to one replica")
    assert {r["pid"] for r in _replicas(GPU_DEP)} <= gpu_pids
    assert {r["pid"] for r in _replicas(TPU_DEP)} == tpu_pids
    # the override stays deployed (deploy_apps keeps it): the gpu placement runs one replica from here on


def test_node_loss_reschedules_to_another_node_with_the_tag(deployed):
    deployed["add"]("gpu_b", {tag_resource("gpu"): 1, "gpu_dev": 1})
    deployed["remove"]("gpu_a")
    new_node = deployed["node_id"]("gpu_b")
    wait_for(lambda: len(_replicas(GPU_DEP)) == 1 and {r["node_id"] for r in _replicas(GPU_DEP)} == {new_node},
             240, "the gpu replica to be rescheduled on the second gpu node")


def test_status_says_why_when_no_node_has_the_tag(deployed, jpeg):
    from deployments.status import serve_summary

    deployed["remove"]("gpu_b")

    def reason():
        summary = serve_summary()
        return summary["applications"].get(APP, {}).get("pending", {}).get(GPU_DEP)

    line = wait_for(reason, 240, "status to report the gpu placement as unplaceable")
    assert "no alive node offers resource" in line and "gpu_node" in line and "placement gpu" in line
    summary = serve_summary()
    assert "gpu_node" in summary["applications"][APP]["deployments"][GPU_DEP]["message"]
    # the model keeps serving from the placement that is left
    out = _router().detect_bytes.remote(MODEL, jpeg).result(timeout_s=120)
    assert out["placement"] == "edgetpu"


def test_the_router_guards_inference_with_the_api_token_when_asked(state, monkeypatch):
    """``auth_inference`` in the tenancy args: /tenancy/<model>/v1/detect answers 401 without the
    token (before it reads the body or picks a placement), and passes with it."""
    import asyncio
    import types

    from starlette.requests import Request

    from app.errors import Unauthorized
    from app.security.auth import TOKEN_ENV, TokenCheck
    from deployments.tenancy import ModelRouter

    token = "t" * 32
    monkeypatch.setenv(TOKEN_ENV, token)
    args = {k: v for k, v in tenancy_app()["args"].items() if k not in ("placement_timeout_s", "retry_after_s")}
    assert parse_tenancy({**args, "auth_inference": True}).auth_inference  # the router's own knobs are popped
    route = ModelRouter.func_or_class.http_detect  # the route as Serve runs it, on a stand-in router

    async def detect_bytes(model: str, body: bytes) -> dict:
        return {"model": model, "bytes": len(body)}

    def call(headers: dict[str, str], guarded: bool = True):
        router = types.SimpleNamespace(_token=TokenCheck(state), _auth_inference=guarded,
                                       _max_body_bytes=1 << 20, detect_bytes=detect_bytes)
        scope = {"type": "http", "method": "POST", "path": f"/{MODEL}/v1/detect",
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}

        async def receive() -> dict:
            return {"type": "http.request", "body": b"jpeg", "more_body": False}

        return asyncio.run(route(router, MODEL, Request(scope, receive)))

    with pytest.raises(Unauthorized, match="needs the API token"):
        call({})
    with pytest.raises(Unauthorized, match="not this server's API token"):
        call({"Authorization": "Bearer " + "x" * 32})
    assert call({"Authorization": f"Bearer {token}"}).status_code == 200
    assert call({}, guarded=False).status_code == 200  # off by default: inference stays open on loopback
