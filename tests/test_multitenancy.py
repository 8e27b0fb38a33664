"""Multi-tenancy on a local multi-node Ray cluster: worker raylets of several kinds (a GPU host
declared with num_gpus=1, a Coral host with an "edgetpu" count, a CPU host) beside the session's
head. Tags decide placement (DMP), shares pack replicas on one device (CME), requests spread by
capacity, the router and control apps stay on the head, a killed node's replicas move to another
node with the tag or `edgebatch status` says what is missing, and they start when it returns.

The tags matter here, not the hardware: every placement runs the demo model with ONNX on the
CPU (the "GPU" is a count Ray is told, as `ray start --num-gpus=1` does). The tests below share
one deployment and run in file order.
"""

from __future__ import annotations

import httpx
import pytest

from app.errors import ConfigError
from app.tenancy import parse_tenancy, tag_resource
from tests.conftest import wait_for

# worker raylets, five Detector replicas and a node kill per test: on a shared 2-core machine a test's
# setup (the deployment on fresh nodes) alone can pass the default 300 s
pytestmark = pytest.mark.timeout(900)

APP = "tenancy"
MODEL = "demo-detector"
GPU_DEP, TPU_DEP, CPU_DEP = f"{MODEL}.gpu", f"{MODEL}.edgetpu", f"{MODEL}.cpu"


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
            "skip_failed_s": 30,
            "models": [{
                "name": MODEL,
                "placements": [
                    # CME: two replicas share the node's one GPU (num_gpus 0.5 each)
                    {"name": "gpu", "tag": "gpu", "replicas_per_device": 2, "throughput_items_s": 20,
                     **placement_common},
                    {"name": "edgetpu", "tag": "edgetpu", "throughput_items_s": 10, **placement_common},
                    {"name": "cpu", "tag": "cpu", "throughput_items_s": 10, **placement_common},
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
    from deployments.tenancy import route_table
    from policies.placement import placement_shortfall

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
    assert placement_shortfall({"gpu_node": 0.001, "GPU": 0.25}, 2, 2, nodes) is None
    assert placement_shortfall({"gpu_node": 0.001, "GPU": 0.25}, 1, 2, nodes).missing == ()  # full, not missing
    short = placement_shortfall({"edgetpu_node": 0.001, "edgetpu": 1.0}, 0, 1, nodes)
    assert (short.missing, short.short) == (("edgetpu", "edgetpu_node"), 1)


def test_status_hints_name_flags_ray_start_accepts():
    """A short placement names what no alive node offers and the `ray start` flags that offer it:
    a GPU is a count (--num-gpus), never a --resources entry."""
    from deployments.status import pending_line, ray_start_flags

    dep = {"target_num_replicas": 2, "replicas": [{"state": "RUNNING"}, {"state": "PENDING_ALLOCATION"}],
           "required_resources": {"CPU": 0.0, "GPU": 0.5, "gpu_node": 0.001}}
    nodes = [{"CPU": 4.0, "node:__internal_head__": 1.0}, {"CPU": 1.0, "edgetpu_node": 1.0, "edgetpu": 1.0}]
    line = pending_line("demo-detector.gpu", dep, nodes)
    assert line.startswith("no alive node offers resource GPU, gpu_node for model demo-detector placement gpu")
    assert "(1/2 replicas running" in line and "ray start --num-gpus=1 --resources='{\"gpu_node\": 1}'" in line
    assert ray_start_flags(["edgetpu", "edgetpu_node"]) == "--resources='{\"edgetpu\": 1, \"edgetpu_node\": 1}'"
    full = pending_line("demo-detector.edgetpu", {**dep, "required_resources": {"edgetpu": 1.0}}, nodes)
    assert "exist but are full, or the replicas are still starting" in full
    assert pending_line("x", {**dep, "replicas": [{"state": "RUNNING"}] * 2}, nodes) is None


def test_up_pins_control_deployments_to_the_head_and_keeps_proxy_location(state, tmp_path):
    import yaml

    # Ray's own name for the head's resource (ray._common.constants), the one definition we use
    from ray._common.constants import HEAD_NODE_RESOURCE_NAME

    from app.constants import HEAD_NODE_RESOURCE, HEAD_PIN
    from deployments.config_file import DEFAULT_CONFIG, load_serve_config

    assert HEAD_NODE_RESOURCE == HEAD_NODE_RESOURCE_NAME
    config = load_serve_config(None, state)
    assert config["proxy_location"] == "HeadOnly"
    pinned = {d["name"]: d["ray_actor_options"].get("resources") for app in config["applications"]
              for d in app.get("deployments", [])}
    assert pinned == {"Detector": HEAD_PIN, "Gateway": HEAD_PIN, "BatchController": HEAD_PIN,
                      "StreamsIngress": HEAD_PIN, "CollectorSupervisor": HEAD_PIN}
    # an operator who names resources (the detector on a GPU node) keeps them
    raw = yaml.safe_load(DEFAULT_CONFIG.read_text())
    raw["applications"][0]["deployments"][0]["ray_actor_options"] = {"num_gpus": 1, "resources": {"gpu_node": 0.001}}
    own = tmp_path / "gpu.yaml"
    own.write_text(yaml.safe_dump(raw))
    det = load_serve_config(own, state)["applications"][0]["deployments"][0]
    assert det["ray_actor_options"]["resources"] == {"gpu_node": 0.001}


# -- on the session's Ray cluster, with worker raylets of several kinds ---------------------

@pytest.fixture(scope="module")
def cluster_nodes(ray_cluster, demo_repo):
    """Worker raylets added by these tests, each a kind of edge node (removed again at the end)."""
    added: dict[str, object] = {}

    def add(key: str, resources: dict[str, float], num_gpus: int = 0):
        node = ray_cluster.add_node(num_cpus=1, num_gpus=num_gpus, resources=resources)
        added[key] = node
        ray_cluster.wait_for_nodes()
        return node

    def remove(key: str):
        """Kill the node: its raylet and every worker on it, without a graceful drain."""
        ray_cluster.remove_node(added.pop(key), allow_graceful=False)

    def node_id(key: str) -> str:
        return added[key].node_id

    yield {"add": add, "remove": remove, "node_id": node_id, "added": added}
    for node in list(added.values()):
        ray_cluster.remove_node(node)


def _details(deployment: str) -> dict:
    from ray.serve.context import _get_global_client

    apps = _get_global_client().get_serve_details().get("applications", {})
    return apps.get(APP, {}).get("deployments", {}).get(deployment, {})


def _replicas(deployment: str) -> list[dict]:
    return [r for r in _details(deployment).get("replicas", []) if r.get("state") == "RUNNING"]


def _router():
    from ray import serve

    return serve.get_deployment_handle("ModelRouter", app_name=APP)


def _tenancy_rows(base: str) -> dict[str, dict]:
    table = httpx.get(f"{base}/tenancy/v1/tenancy", timeout=30).json()["models"][MODEL]
    return {row["placement"]: row for row in table}


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    from app.bench.images import sample_jpegs

    return sample_jpegs(1, 320, 240)[0]


@pytest.fixture(scope="module")
def deployed(cluster_nodes, deploy_apps):
    # a GPU host (one GPU, declared with num_gpus as `ray start --num-gpus=1` does), a Coral host, a CPU host
    cluster_nodes["add"]("gpu_a", {tag_resource("gpu"): 1, tag_resource("x86"): 1}, num_gpus=1)
    cluster_nodes["add"]("tpu", {tag_resource("edgetpu"): 1, "edgetpu": 1})
    cluster_nodes["add"]("cpu", {tag_resource("cpu"): 1})
    deploy_apps([tenancy_app()], timeout_s=300)
    yield cluster_nodes
    deploy_apps(remove=[APP], timeout_s=120)


def test_replicas_land_only_on_tagged_nodes_and_cme_shares_one_device(deployed):
    import ray

    gpu, tpu, cpu = _replicas(GPU_DEP), _replicas(TPU_DEP), _replicas(CPU_DEP)
    assert len(gpu) == 2 and len(tpu) == 1 and len(cpu) == 1
    # both CME replicas (num_gpus 0.5 each) on the one node that has the tag and the GPU: it is full
    assert {r["node_id"] for r in gpu} == {deployed["node_id"]("gpu_a")}
    assert len({r["pid"] for r in gpu}) == 2
    assert _details(GPU_DEP)["deployment_config"]["ray_actor_options"]["num_gpus"] == 0.5
    assert ray.available_resources().get("GPU", 0.0) == 0.0 and ray.cluster_resources()["GPU"] == 1.0
    assert {r["node_id"] for r in tpu} == {deployed["node_id"]("tpu")}
    assert {r["node_id"] for r in cpu} == {deployed["node_id"]("cpu")}


def test_router_and_control_apps_run_on_the_head_with_one_proxy(deployed, ray_cluster):
    """The router and the control deployments ask for the head's resource; HeadOnly from the
    config is honoured: no HTTP proxy on the edge nodes."""
    from ray.serve.context import _get_global_client

    from app.constants import HEAD_NODE_RESOURCE

    head = ray_cluster.head_node.node_id
    apps = _get_global_client().get_serve_details()["applications"]
    control = {APP: ["ModelRouter"], "edgebatch": ["Detector", "Gateway"]}  # the session's (others: config test)
    for app_name, names in control.items():
        for name in names:
            dep = apps[app_name]["deployments"][name]
            assert HEAD_NODE_RESOURCE in dep["deployment_config"]["ray_actor_options"]["resources"], name
            assert {r["node_id"] for r in dep["replicas"] if r["state"] == "RUNNING"} == {head}, name
    assert set(_get_global_client().get_serve_details()["proxies"]) == {head}  # Serve's proxies, by node id


def test_requests_spread_over_placements_by_capacity(deployed, jpeg, serve_app):
    """Capacities 20 : 10 : 10 -> shares 0.5 : 0.25 : 0.25 over a bounded loop of HTTP requests."""
    base = serve_app["url"]
    n = 160
    counts = {"gpu": 0, "edgetpu": 0, "cpu": 0}
    nodes: dict[str, set] = {k: set() for k in counts}
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            r = client.post(f"{base}/tenancy/{MODEL}/v1/detect", content=jpeg)
            assert r.status_code == 200, r.text
            out = r.json()
            counts[out["placement"]] += 1
            nodes[out["placement"]].add(out["served_by"]["node_id"])
    for placement, share in {"gpu": 0.5, "edgetpu": 0.25, "cpu": 0.25}.items():
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(counts[placement] - n * share) <= 4 * sd, counts  # binomial, 4 standard deviations
    assert counts["gpu"] > max(counts["edgetpu"], counts["cpu"]), counts
    assert nodes == {"gpu": {deployed["node_id"]("gpu_a")}, "edgetpu": {deployed["node_id"]("tpu")},
                     "cpu": {deployed["node_id"]("cpu")}}
    rows = _tenancy_rows(base)
    assert {k: (v["running"], v["target"], v["missing"]) for k, v in rows.items()} == {
        "gpu": (2, 2, []), "edgetpu": (1, 1, []), "cpu": (1, 1, [])}
    # bad input stays the client's: clear 4xx, no placement skipped for it
    r = httpx.post(f"{base}/tenancy/nope/v1/detect", content=jpeg, timeout=60)
    assert r.status_code == 404 and "demo-detector" in r.json()["error"]
    r = httpx.post(f"{base}/tenancy/{MODEL}/v1/detect", content=b"", timeout=60)
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = httpx.post(f"{base}/tenancy/{MODEL}/v1/detect", content=b"not an image", timeout=60)
    assert r.status_code == 400 and "not a decodable image" in r.json()["error"]
    assert all(v["skipped_for_s"] == 0 for v in _tenancy_rows(base).values())


def test_concurrency_level_changes_in_place(deployed, deploy_apps):
    """A `deployments:` override of num_replicas is applied by a declarative deploy without
    restarting the replicas that stay (the other placements are not touched at all)."""
    gpu_pids = {r["pid"] for r in _replicas(GPU_DEP)}
    tpu_pids = {r["pid"] for r in _replicas(TPU_DEP)}
    app = tenancy_app()
    app["deployments"] = [{"name": GPU_DEP, "num_replicas": 1}]
    deploy_apps([app], timeout_s=240)
    wait_for(lambda: len(_replicas(GPU_DEP)) == 1, 120, "the gpu placement to scale down to one replica")
    assert {r["pid"] for r in _replicas(GPU_DEP)} <= gpu_pids
    assert {r["pid"] for r in _replicas(TPU_DEP)} == tpu_pids
    # the override stays deployed (deploy_apps keeps it): the gpu placement runs one replica from here on


def _load(base: str, jpeg: bytes, stop, answers: list, clients: int = 3, max_requests: int = 3000) -> list:
    """Closed-loop clients until ``stop`` is set (bounded by ``max_requests``): (status, json?, Retry-After)."""
    import threading

    def client():
        with httpx.Client(timeout=60) as c:
            while not stop.is_set() and len(answers) < max_requests:
                try:
                    r = c.post(f"{base}/tenancy/{MODEL}/v1/detect", content=jpeg)
                    is_json = r.headers.get("content-type", "").startswith("application/json")
                    answers.append((r.status_code, is_json, r.headers.get("retry-after")))
                except httpx.HTTPError as exc:
                    answers.append((0, False, type(exc).__name__))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


def test_node_loss_under_load_reschedules_to_another_node_with_the_tag(deployed, jpeg, serve_app):
    import threading

    deployed["add"]("gpu_b", {tag_resource("gpu"): 1, tag_resource("x86"): 1}, num_gpus=1)
    stop, answers = threading.Event(), []
    threads = _load(serve_app["url"], jpeg, stop, answers)
    try:
        wait_for(lambda: len(answers) >= 20, 60, "the load to run")
        deployed["remove"]("gpu_a")  # SIGKILL of its raylet and workers, mid-load
        new_node = deployed["node_id"]("gpu_b")
        wait_for(lambda: {r["node_id"] for r in _replicas(GPU_DEP)} == {new_node}, 240,
                 "the gpu replica to be rescheduled on the second gpu node")
        before = len(answers)
        wait_for(lambda: len(answers) >= before + 20, 60, "requests after the reschedule")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=90)
    # every request was answered with a reply: success, or a JSON 503 that says when to retry
    assert answers and all(code == 200 or (code == 503 and is_json and retry) for code, is_json, retry in answers), \
        sorted({a for a in answers if a[0] != 200})
    assert sum(code == 200 for code, _, _ in answers) >= 0.95 * len(answers)
    rows = _tenancy_rows(serve_app["url"])
    assert rows["gpu"]["running"] == 1 and rows["gpu"]["served"] > 0


def test_status_says_which_resource_is_missing_and_pending_replicas_start_when_it_returns(deployed, jpeg, serve_app):
    import io
    import time
    from contextlib import redirect_stderr, redirect_stdout

    from app.cli import main
    from deployments.status import serve_summary

    deployed["remove"]("gpu_b")

    def reason():  # until Ray marks the killed node dead, the line says "full, or still starting"
        line = serve_summary()["applications"].get(APP, {}).get("pending", {}).get(GPU_DEP)
        return line if line and "no alive node offers" in line else None

    line = wait_for(reason, 240, "status to report the gpu placement as unplaceable")
    assert "no alive node offers resource GPU, gpu_node" in line and "placement gpu" in line
    assert "ray start --num-gpus=1 --resources='{\"gpu_node\": 1}'" in line  # flags Ray accepts
    wait_for(lambda: _tenancy_rows(serve_app["url"])["gpu"]["missing"] == ["GPU", "gpu_node"], 30,
             "the router to see the gpu placement short")
    # the model keeps serving from the placements that are left, without waiting on the gpu one
    t0 = time.monotonic()
    with httpx.Client(timeout=60) as client:
        placed = [client.post(f"{serve_app['url']}/tenancy/{MODEL}/v1/detect", content=jpeg).json()["placement"]
                  for _ in range(12)]
    assert set(placed) <= {"edgetpu", "cpu"} and time.monotonic() - t0 < 12 * 2.0
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(["status"]) == 0
    text = out.getvalue()
    tpu_node = deployed["node_id"]("tpu")[:8]
    assert f"RUNNING pid {_replicas(TPU_DEP)[0]['pid']} on " in text and f"node {tpu_node}, edgetpu_node)" in text
    assert "--num-gpus=1" in text and "Traceback" not in text + err.getvalue() and 'File "' not in text
    # the node comes back: the pending replica starts there
    deployed["add"]("gpu_c", {tag_resource("gpu"): 1, tag_resource("x86"): 1}, num_gpus=1)
    wait_for(lambda: {r["node_id"] for r in _replicas(GPU_DEP)} == {deployed["node_id"]("gpu_c")}, 240,
             "the pending gpu replica to start on the returning gpu node")
    wait_for(lambda: reason() is None, 60, "status to stop reporting the gpu placement")


def test_router_answers_a_json_503_at_once_when_no_placement_runs(deployed, jpeg, serve_app):
    import time

    for key in ("gpu_c", "tpu", "cpu"):
        deployed["remove"](key)
    wait_for(lambda: all(r["running"] == 0 and r["missing"] for r in _tenancy_rows(serve_app["url"]).values()),
             120, "the router to see every placement without a running replica, and why")
    t0 = time.monotonic()
    r = httpx.post(f"{serve_app['url']}/tenancy/{MODEL}/v1/detect", content=jpeg, timeout=60)
    elapsed = time.monotonic() - t0
    assert r.status_code == 503 and r.headers["retry-after"] == "5", r.text
    body = r.json()
    assert "no placement has a running replica" in body["error"] and "no alive node offers" in body["error"]
    assert body["retry_after_s"] == 5
    assert elapsed < 4.0  # from the router's cached view; main waited placement_timeout_s (8 s) per placement


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
    assert parse_tenancy({**tenancy_app()["args"], "auth_inference": True}).auth_inference
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
