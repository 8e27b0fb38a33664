"""One resource collector per Ray node, exported to Prometheus, kept by a Serve deployment.

``NodeCollectorActor`` is pinned to its node (hard node affinity), samples the node
with ``app.monitoring.collectors.NodeCollector`` every ``interval_s`` and sets
``ray.util.metrics`` gauges, which Ray's metrics agent on that node exports on its
metrics export port. Ray prefixes custom metrics with ``ray_``, so Prometheus shows
``edgebatch_node_cpu_percent`` as ``ray_edgebatch_node_cpu_percent``.

``CollectorSupervisor`` is a Serve deployment (application ``edgebatch-monitor``)
rather than a detached actor: the same serve_config.yaml starts and removes it with
the rest of the system, Serve's controller restarts it when it fails, and callers
reach it by a deployment handle. The collectors are owned by its replica, so they
die with it (nothing leaks after the app is removed) and a restarted replica
recreates them. It reconciles against the alive nodes every few seconds: a node
that joins gets a collector, a dead node's collector is dropped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from app.errors import Unavailable
from app.monitoring.collectors import NodeCollector, NodeSample

logger = logging.getLogger("edgebatch.monitor")

MONITOR_APP = "edgebatch-monitor"
SUPERVISOR = "CollectorSupervisor"
RAY_METRIC_PREFIX = "ray_"  # what Ray puts in front of every ray.util.metrics name on export
NODE_TAGS = ("node", "hostname")
DEVICE_TAGS = ("node", "hostname", "device", "kind")
METRICS = {
    "edgebatch_node_cpu_percent": ("CPU load of the node, percent of all cores", NODE_TAGS),
    "edgebatch_node_ram_used_bytes": ("RAM in use on the node (total minus available)", NODE_TAGS),
    "edgebatch_node_ram_total_bytes": ("RAM of the node", NODE_TAGS),
    "edgebatch_device_util_percent": ("Load of a device (GPU, Jetson GR3D, CPU); absent where unknown", DEVICE_TAGS),
    "edgebatch_device_mem_used_bytes": ("Memory in use on a device (Jetson: the shared board RAM)", DEVICE_TAGS),
    "edgebatch_device_mem_total_bytes": ("Memory of a device (Jetson: the shared board RAM)", DEVICE_TAGS),
    "edgebatch_device_present": ("1 for every device the node has (EdgeTPUs report presence only)", DEVICE_TAGS),
}


@ray.remote(num_cpus=0, max_restarts=0)
class NodeCollectorActor:
    """Samples its node every ``interval_s`` in a thread, exports gauges, keeps the latest sample."""

    def __init__(self, node_id: str, interval_s: float = 5.0) -> None:
        from ray.util.metrics import Gauge

        # The node Ray actually placed us on: with hard affinity it is ``node_id``, and the
        # samples carry it so a caller can check the pinning.
        self.node_id = ray.get_runtime_context().get_node_id() or node_id
        self.hostname = socket.gethostname()
        self._interval_s = float(interval_s)
        self._collector = NodeCollector(node_id=self.node_id, hostname=self.hostname)
        self._gauges = {name: Gauge(name, description=desc, tag_keys=tags) for name, (desc, tags) in METRICS.items()}
        self._lock = threading.Lock()
        self._latest: NodeSample | None = None
        self._stop = threading.Event()
        self._sample_once()
        self._thread = threading.Thread(target=self._run, name="edgebatch-node-collector", daemon=True)
        self._thread.start()

    def _sample_once(self) -> None:
        try:
            sample = self._collector.sample()
        except Exception:  # the collector folds probe failures into notes; this is a bug guard
            logger.exception("node collector failed on %s", self.node_id)
            return
        self._export(sample)
        with self._lock:
            self._latest = sample

    def _export(self, sample: NodeSample) -> None:
        g, node = self._gauges, {"node": sample.node_id, "hostname": sample.hostname}
        if sample.cpu_percent == sample.cpu_percent:  # NaN when no host probe read it
            g["edgebatch_node_cpu_percent"].set(sample.cpu_percent, tags=node)
        g["edgebatch_node_ram_used_bytes"].set(sample.ram_used_bytes, tags=node)
        g["edgebatch_node_ram_total_bytes"].set(sample.ram_total_bytes, tags=node)
        for device in sample.devices:
            tags = {**node, "device": device.label, "kind": device.kind}
            g["edgebatch_device_present"].set(1, tags=tags)
            if device.util_percent is not None:
                g["edgebatch_device_util_percent"].set(device.util_percent, tags=tags)
            if device.mem_used_bytes is not None:
                g["edgebatch_device_mem_used_bytes"].set(device.mem_used_bytes, tags=tags)
            if device.mem_total_bytes is not None:
                g["edgebatch_device_mem_total_bytes"].set(device.mem_total_bytes, tags=tags)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample_once()

    def latest(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._latest is None else self._latest.to_dict()

    def set_interval(self, interval_s: float) -> None:
        self._interval_s = max(0.2, float(interval_s))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._collector.close()


def alive_node_ids() -> list[str]:
    """Node ids of the alive Ray nodes, from the GCS."""
    return sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))


@serve.deployment(
    name=SUPERVISOR,
    num_replicas=1,
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0},
    graceful_shutdown_timeout_s=2,
)
class CollectorSupervisor:
    """Keeps exactly one NodeCollectorActor on every alive node and answers their latest samples."""

    def __init__(self, sample_interval_s: float = 5.0, reconcile_interval_s: float = 2.0) -> None:
        self._sample_interval_s = float(sample_interval_s)
        self._reconcile_interval_s = float(reconcile_interval_s)
        self._lock = threading.Lock()
        self._collectors: dict[str, Any] = {}  # node id -> actor handle
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgebatch-collector-supervisor", daemon=True)
        self._thread.start()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """``user_config``: ``sample_interval_s``, ``reconcile_interval_s``."""
        self._reconcile_interval_s = max(0.2, float(config.get("reconcile_interval_s", self._reconcile_interval_s)))
        interval = max(0.2, float(config.get("sample_interval_s", self._sample_interval_s)))
        if interval != self._sample_interval_s:
            self._sample_interval_s = interval
            with self._lock:
                actors = list(self._collectors.values())
            for actor in actors:
                actor.set_interval.remote(interval)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.reconcile()
                self._last_error = None
            except Exception as exc:  # the GCS may be busy; try again next round
                self._last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("collector reconcile failed: %s", self._last_error)
            self._stop.wait(self._reconcile_interval_s)

    def reconcile(self) -> dict[str, list[str]]:
        """Start a collector on each alive node without one; drop those of dead nodes."""
        alive = set(alive_node_ids())
        with self._lock:
            known = set(self._collectors)
        started, dropped = [], []
        for node_id in sorted(alive - known):
            actor = NodeCollectorActor.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
                name=None,
            ).remote(node_id, self._sample_interval_s)
            with self._lock:
                self._collectors[node_id] = actor
            started.append(node_id)
        for node_id in sorted(known - alive):
            with self._lock:
                actor = self._collectors.pop(node_id, None)
            if actor is not None:
                ray.kill(actor, no_restart=True)
            dropped.append(node_id)
        if started or dropped:
            logger.info("collectors started on %s, dropped for %s", started, dropped)
        return {"started": started, "dropped": dropped}

    def collector_nodes(self) -> list[str]:
        """The node ids that have a collector now."""
        with self._lock:
            return sorted(self._collectors)

    async def latest(self, timeout_s: float = 3.0) -> dict[str, dict[str, Any]]:
        """The latest NodeSample (as dict) of every collector that has one; a dead collector is
        forgotten so the next reconcile starts a new one."""
        with self._lock:
            pairs = list(self._collectors.items())
        if not pairs:
            return {}
        refs = [actor.latest.remote() for _, actor in pairs]
        ready, _ = await asyncio.to_thread(ray.wait, refs, num_returns=len(refs), timeout=timeout_s)
        ready_set = set(ready)
        out: dict[str, dict[str, Any]] = {}
        for (node_id, actor), ref in zip(pairs, refs):
            if ref not in ready_set:
                continue  # still starting (a fresh node) or busy: it will answer next time
            try:
                sample = await ref
            except ray.exceptions.RayActorError:
                with self._lock:
                    if self._collectors.get(node_id) is actor:
                        del self._collectors[node_id]
                continue
            if sample is not None:
                out[node_id] = sample
        return out

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the collector reconcile thread stopped")

    def __del__(self) -> None:
        self._stop.set()


def build_app(args: dict[str, Any] | None = None) -> serve.Application:
    """The ``edgebatch-monitor`` application: one CollectorSupervisor, no HTTP route needed."""
    args = dict(args or {})
    return CollectorSupervisor.bind(
        sample_interval_s=float(args.get("sample_interval_s", 5.0)),
        reconcile_interval_s=float(args.get("reconcile_interval_s", 2.0)),
    )


def monitor_app_entry(**args: Any) -> dict[str, Any]:
    """The ``edgebatch-monitor`` entry of deployments/serve_config.yaml, for ``deploy_apps`` and tests;
    keyword arguments override its ``args`` (e.g. ``sample_interval_s=1``)."""
    import copy

    import yaml

    config = yaml.safe_load(Path(__file__).with_name("serve_config.yaml").read_text())
    for app in config.get("applications", []):
        if app.get("name") == MONITOR_APP:
            entry = copy.deepcopy(app)
            entry["args"] = {**(entry.get("args") or {}), **args}
            return entry
    raise Unavailable(f"deployments/serve_config.yaml has no '{MONITOR_APP}' application")


def monitor_status() -> str | None:
    """The monitor app's Serve status (``RUNNING``, ``DEPLOYING``...), None where it is not deployed."""
    if not ray.is_initialized():
        return None
    try:
        app = serve.status().applications.get(MONITOR_APP)
    except Exception:
        return None
    return None if app is None else str(getattr(app.status, "value", app.status))


def monitor_running() -> bool:
    """Does Serve run the monitor app now (on the Ray this process is connected to)?"""
    return monitor_status() == "RUNNING"


def _supervisor() -> Any:
    """A handle on the supervisor; a quick status check first, so a missing app fails at once
    instead of after the caller's whole timeout."""
    if not ray.is_initialized():
        raise Unavailable("not connected to Ray: call ray.init(address=...) or run `edgebatch up` first")
    status = monitor_status()
    if status != "RUNNING":
        state = "is not deployed" if status is None else f"is {status}"
        raise Unavailable(f"no node samples: the '{MONITOR_APP}' application {state}; deploy "
                          "deployments/serve_config.yaml (`edgebatch up`), which lists it")
    return serve.get_deployment_handle(SUPERVISOR, app_name=MONITOR_APP)


def latest_samples(timeout_s: float = 5.0) -> dict[str, NodeSample]:
    """The latest NodeSample of every node, from the ``edgebatch-monitor`` app's supervisor.

    Call it from a thread, not inside an event loop (there, await ``latest_samples_async``).
    Raises Unavailable naming the fix when Ray or the monitor app is not running.
    """
    handle = _supervisor()
    try:
        raw = handle.latest.remote(timeout_s=max(0.5, timeout_s * 0.6)).result(timeout_s=timeout_s)
    except Exception as exc:  # replica restarting, timeout: one clear error
        raise Unavailable(f"no node samples from {MONITOR_APP}/{SUPERVISOR}: {type(exc).__name__}: {exc}") from None
    return {node_id: NodeSample.from_dict(data) for node_id, data in raw.items()}


async def latest_samples_async(timeout_s: float = 5.0) -> dict[str, NodeSample]:
    """``latest_samples`` for callers inside an event loop (a Serve replica's async method)."""
    handle = await asyncio.to_thread(_supervisor)
    try:
        raw = await asyncio.wait_for(handle.latest.remote(timeout_s=max(0.5, timeout_s * 0.6)), timeout_s)
    except Exception as exc:
        raise Unavailable(f"no node samples from {MONITOR_APP}/{SUPERVISOR}: {type(exc).__name__}: {exc}") from None
    return {node_id: NodeSample.from_dict(data) for node_id, data in raw.items()}


def ray_metrics_targets() -> list[str]:
    """``host:port`` of the metrics export port of every alive Ray node (what Prometheus scrapes)."""
    targets = []
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if node.get("Alive") and port:
            targets.append(f"{node['NodeManagerAddress']}:{port}")
    return sorted(targets)


def ray_service_discovery_file() -> str | None:
    """Ray's Prometheus service discovery file of this session, if its dashboard writes one.

    It lives in the session dir (``/tmp/ray/session_latest`` for a default head, elsewhere for
    a test cluster); without the dashboard no file is written and static targets are needed.
    """
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    try:
        session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    except Exception:
        return None
    path = os.path.join(session_dir, PROMETHEUS_SERVICE_DISCOVERY_FILE)
    return path if os.path.exists(path) else None


def wait_for_samples(nodes: set[str], timeout_s: float = 60.0) -> dict[str, NodeSample]:
    """Poll latest_samples until every node in ``nodes`` has one (for the CLI after a deploy)."""
    deadline = time.monotonic() + timeout_s
    samples: dict[str, NodeSample] = {}
    while time.monotonic() < deadline:
        samples = latest_samples()
        if nodes <= set(samples):
            return samples
        time.sleep(0.5)  # polling a remote state with a deadline
    return samples
