"""Node loss on a local multi-node Ray cluster, measured as the tenancy route's clients see it.

Starts its own ``ray.cluster_utils.Cluster`` (a head plus worker raylets declared as two GPU
hosts, a Coral host and a CPU host), a throwaway state folder with the demo model, and the
tenancy app (placements gpu / edgetpu / cpu of the demo detector, ONNX on the CPU everywhere).
Then, under a bounded closed-loop HTTP load on 127.0.0.1:

1. kills the first GPU node (its raylet and workers, SIGKILL): requests served and failed, and
   the seconds until the gpu placement runs again on the second GPU node;
2. kills the second GPU node (no node has the tag any more): response times with that placement
   down, and the line `edgebatch status` prints for it;
3. adds a GPU node back: seconds until the pending replica runs there;
4. kills the nodes of every other placement: how fast the router answers the JSON 503.

Prints a table; ``--json`` also prints the figures as one JSON object on the last line::

    /work/helpers/heavy --exclusive .venv/bin/python scripts/multinode_faults.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

APP, MODEL = "tenancy", "demo-detector"
GPU_DEP = f"{MODEL}.gpu"


@dataclass
class Answer:
    sent: float  # monotonic
    latency_s: float
    status: int  # 0: no HTTP answer at all
    json_body: bool
    retry_after: str | None
    placement: str | None


@dataclass
class Load:
    """Closed-loop clients posting one JPEG until stopped, at most ``max_requests`` in all."""

    url: str
    body: bytes
    clients: int
    max_requests: int
    answers: list[Answer] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        return threads

    def _client(self) -> None:
        import httpx

        with httpx.Client(timeout=90) as c:
            while not self.stop.is_set() and len(self.answers) < self.max_requests:
                t0 = time.monotonic()
                try:
                    r = c.post(self.url, content=self.body)
                    js = r.headers.get("content-type", "").startswith("application/json")
                    placement = r.json().get("placement") if js and r.status_code == 200 else None
                    self.answers.append(Answer(t0, time.monotonic() - t0, r.status_code, js,
                                               r.headers.get("retry-after"), placement))
                except httpx.HTTPError:
                    self.answers.append(Answer(t0, time.monotonic() - t0, 0, False, None, None))

    def between(self, t0: float, t1: float) -> list[Answer]:
        return [a for a in list(self.answers) if t0 <= a.sent < t1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise SystemExit(f"timed out after {timeout_s:.0f} s waiting for {what}")


def running_nodes(deployment: str) -> set[str]:
    from ray.serve.context import _get_global_client

    dep = _get_global_client().get_serve_details()["applications"][APP]["deployments"].get(deployment, {})
    return {r["node_id"] for r in dep.get("replicas", []) if r.get("state") == "RUNNING"}


def summarise(answers: list[Answer]) -> dict:
    ok = [a.latency_s * 1000 for a in answers if a.status == 200]
    failed = [a for a in answers if a.status != 200]
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) >= 2 else [ok[0] if ok else float("nan")] * 99
    return {"requests": len(answers), "served": len(ok), "failed": len(failed),
            "failed_json_503_with_retry_after": sum(a.status == 503 and a.json_body and bool(a.retry_after)
                                                    for a in failed),
            "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1), "max_ms": round(max(ok, default=float("nan")), 1)}


def tenancy_app() -> dict:
    common = {"backend": "onnx", "user_config": {"batch_sizes": [1, 2, 4], "max_batch_size": 4, "alias_poll_s": 0,
                                                 "intra_op_threads": 1}}
    return {"name": APP, "route_prefix": "/tenancy", "import_path": "deployments.tenancy:build_app",
            "args": {"graceful_shutdown_timeout_s": 1, "models": [{"name": MODEL, "placements": [
                {"name": "gpu", "tag": "gpu", "throughput_items_s": 20, **common},
                {"name": "edgetpu", "tag": "edgetpu", "throughput_items_s": 10, **common},
                {"name": "cpu", "tag": "cpu", "throughput_items_s": 10, **common},
            ]}]}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=4, help="closed-loop HTTP clients (default 4)")
    p.add_argument("--max-requests", type=int, default=20000, help="bound on all requests sent")
    p.add_argument("--after-s", type=float, default=5.0, help="seconds of load kept after each recovery")
    p.add_argument("--port", type=int, default=None, help="Serve HTTP port (default a free one)")
    p.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    args = p.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from app.bench.images import sample_jpegs
    from app.state import StateDir
    from app.tenancy import tag_resource
    from deployments import launcher
    from deployments.config_file import complete_serve_config
    from deployments.status import serve_summary
    from model_registry.demo import ensure_demo_model
    from model_registry.repository import ModelRepository

    home = Path(tempfile.mkdtemp(prefix="edgebatch-faults-"))
    os.environ["EDGEBATCH_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    state = StateDir(home).ensure()
    ensure_demo_model(ModelRepository(state.tracking_uri, state=state))
    if args.port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            args.port = s.getsockname()[1]

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    nodes = {}

    def add(key: str, resources: dict, num_gpus: int = 0) -> None:
        nodes[key] = cluster.add_node(num_cpus=1, num_gpus=num_gpus, resources=resources)
        cluster.wait_for_nodes()

    def kill(key: str) -> float:
        cluster.remove_node(nodes.pop(key), allow_graceful=False)
        return time.monotonic()

    figures: dict = {"clients": args.clients}
    load = None
    try:
        gpu = {tag_resource("gpu"): 1, tag_resource("x86"): 1}
        add("gpu_a", gpu, num_gpus=1)
        add("gpu_b", gpu, num_gpus=1)
        add("tpu", {tag_resource("edgetpu"): 1, "edgetpu": 1})
        add("cpu", {tag_resource("cpu"): 1})
        config = complete_serve_config({"proxy_location": "HeadOnly",
                                        "http_options": {"host": "127.0.0.1", "port": args.port},
                                        "applications": [tenancy_app()]}, state, port=args.port)
        launcher.deploy(config)
        launcher.wait_running(APP, timeout_s=600)
        first_gpu = next(iter(running_nodes(GPU_DEP)))
        survivor = "gpu_b" if first_gpu == nodes["gpu_a"].node_id else "gpu_a"
        doomed = "gpu_a" if survivor == "gpu_b" else "gpu_b"

        url = f"http://127.0.0.1:{args.port}/tenancy/{MODEL}/v1/detect"
        load = Load(url, sample_jpegs(1, 320, 240)[0], args.clients, args.max_requests)
        threads = load.start()
        wait_for(lambda: sum(a.status == 200 for a in load.answers) >= 30, 120, "the load to run")
        t = time.monotonic()
        time.sleep(args.after_s)  # steady load before the first fault (a measuring window, not a sync)
        figures["steady"] = summarise(load.between(t, time.monotonic()))

        # 1. a GPU node dies; another node has the tag
        t_kill = kill(doomed)
        wait_for(lambda: running_nodes(GPU_DEP) == {nodes[survivor].node_id}, 300, "the gpu replica to move")
        t_back = time.monotonic()
        time.sleep(args.after_s)
        figures["gpu_node_killed_other_gpu_node_left"] = {
            **summarise(load.between(t_kill, time.monotonic())),
            "replica_running_again_s": round(t_back - t_kill, 1),
            "gpu_placement_share_after": round(sum(a.placement == "gpu" for a in load.between(t_back, time.monotonic()))
                                               / max(1, len(load.between(t_back, time.monotonic()))), 2)}

        # 2. the last GPU node dies: the placement is short
        t_kill = kill(survivor)
        line = wait_for(lambda: serve_summary()["applications"].get(APP, {}).get("pending", {}).get(GPU_DEP), 120,
                        "status to report the gpu placement")
        t = time.monotonic()
        time.sleep(args.after_s)
        figures["no_gpu_node_left"] = {**summarise(load.between(t_kill, time.monotonic())),
                                       "with_placement_down": summarise(load.between(t, time.monotonic())),
                                       "status_reported_after_s": round(t - t_kill, 1), "status_line": line}

        # 3. a GPU node comes back
        t_add = time.monotonic()
        add("gpu_c", gpu, num_gpus=1)
        wait_for(lambda: running_nodes(GPU_DEP) == {nodes["gpu_c"].node_id}, 300, "the pending replica to start")
        figures["gpu_node_returned"] = {"replica_running_after_s": round(time.monotonic() - t_add, 1)}

        # 4. every placement down
        load.stop.set()
        for th in threads:
            th.join(timeout=120)
        for key in ("gpu_c", "tpu", "cpu"):
            kill(key)
        wait_for(lambda: not any(running_nodes(f"{MODEL}.{p}") for p in ("gpu", "edgetpu", "cpu")), 120,
                 "every placement to lose its replicas")
        import httpx

        time.sleep(3.0)  # two refreshes of the router's view (1 s each), as a client arriving later would see
        probes = []
        for _ in range(10):
            t0 = time.monotonic()
            r = httpx.post(url, content=load.body, timeout=90)
            probes.append((time.monotonic() - t0, r.status_code, r.headers.get("retry-after")))
        figures["all_placements_down"] = {"status_codes": sorted({c for _, c, _ in probes}),
                                          "retry_after": sorted({str(ra) for _, _, ra in probes}),
                                          "max_ms": round(max(t for t, _, _ in probes) * 1000, 1)}
        figures["total"] = summarise(load.answers)
    finally:
        if load is not None:
            load.stop.set()
        try:
            from ray import serve

            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(home, ignore_errors=True)

    rows = [("steady load", figures["steady"]), ("GPU node killed, 2nd GPU node up", figures["gpu_node_killed_other_gpu_node_left"]),
            ("last GPU node killed", figures["no_gpu_node_left"]),
            ("  ... with the placement down", figures["no_gpu_node_left"]["with_placement_down"])]
    print(f"{'phase':<34} {'requests':>8} {'served':>7} {'failed':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name, f in rows:
        print(f"{name:<34} {f['requests']:>8} {f['served']:>7} {f['failed']:>6} {f['p50_ms']:>8} {f['p99_ms']:>8} "
              f"{f['max_ms']:>8}")
    print(f"gpu replica running again on the other GPU node after "
          f"{figures['gpu_node_killed_other_gpu_node_left']['replica_running_again_s']} s; pending replica running "
          f"{figures['gpu_node_returned']['replica_running_after_s']} s after a GPU node returned")
    print(f"status: {figures['no_gpu_node_left']['status_line']}")
    down = figures["all_placements_down"]
    print(f"all placements down: HTTP {down['status_codes']} Retry-After {down['retry_after']} within {down['max_ms']} ms")
    if args.json:
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
