"""`edgebatch bench failover`: what clients see when a detector replica dies under load (issue 15).

Closed-loop clients (a separate process, honouring Retry-After) post to `/v1/detect`; part way
through, one RUNNING replica of the instance's `Detector` is killed with SIGKILL by its PID (read
from Serve, checked to be that replica's process on this machine). The bench reports how long
no request was served, how long until one sent after the kill was served, how many requests failed
and how (every one should be a JSON 503 with Retry-After), and when Serve had the replica back.
Run it once with the Detector's `num_replicas: 1` and once with 2 (a warm second replica) to see
what the second replica buys: the gateway retries the dead replica's requests on the live one.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time

from app.bench.report import BenchReport
from app.commands.bench import common
from app.constants import DETECTOR_APP, DETECTOR_DEPLOYMENT
from app.errors import ConfigError, Unavailable

COLUMNS = [("replicas", "replicas"), ("clients", "clients"), ("served_before_per_s", "served/s before"),
           ("longest_gap_s", "no service s"), ("served_again_s", "served again s"), ("failed", "failed"),
           ("failed_503", "of which JSON 503"), ("other_errors", "other errors"), ("replaced_s", "replica back s")]

#: how long the bench waits for Serve to report the killed replica replaced
REPLACE_WAIT_S = 120.0


def add_bench_failover(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("failover", help="kill one detector replica under load: outage, failures, recovery")
    p.add_argument("--clients", type=int, default=4, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=30.0, help="measured seconds (the kill falls inside)")
    p.add_argument("--kill-at", type=float, default=8.0, help="seconds into the measured window to kill")
    p.add_argument("--url", default=None, help="edgebatch base URL; default the running instance's")
    common(p)
    p.set_defaults(func=cmd_failover)


def _replicas() -> list[dict]:
    """RUNNING replicas of the edgebatch app's Detector, with their PIDs and nodes, as Serve reports them."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    dep = details.get("applications", {}).get(DETECTOR_APP, {}).get("deployments", {}).get(DETECTOR_DEPLOYMENT, {})
    return [r for r in dep.get("replicas", []) if r.get("state") == "RUNNING" and r.get("pid")]


def _own_replica_pid(replicas: list[dict]) -> int:
    """A replica process on this machine whose command line is that replica's (never any other process)."""
    marker = f"ServeReplica:{DETECTOR_APP}:{DETECTOR_DEPLOYMENT}"
    for r in replicas:
        pid = int(r["pid"])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker in f.read().decode(errors="replace"):
                    return pid
        except OSError:
            continue
    where = ", ".join(f"pid {r['pid']} on {r.get('node_ip')}" for r in replicas) or "none running"
    raise Unavailable(f"no {DETECTOR_DEPLOYMENT} replica of this instance runs on this machine ({where}); "
                      "run the bench on the node that hosts one")


def outage(timeline: list[tuple[float, float, int]], kill_s: float) -> dict:
    """From the load's (t_done, latency, status) records: the longest stretch around the kill with no
    request served, and when the first request sent after the kill was served (seconds after it)."""
    served = sorted(t for t, _, status in timeline if status == 200)
    before = [t for t in served if t <= kill_s]
    after = [t for t in served if t > kill_s]
    marks = ([before[-1]] if before else [kill_s]) + after
    gap = max((b - a for a, b in zip(marks, marks[1:])), default=None)
    again = min((t for t, latency, status in timeline if status == 200 and t - latency > kill_s), default=None)
    return {"longest_gap_s": None if gap is None else round(gap, 2),
            "served_again_s": None if again is None else round(again - kill_s, 2)}


def cmd_failover(args: argparse.Namespace) -> int:
    from app.bench.http_client import run_load
    from app.bench.images import sample_jpegs
    from app.instance import recorded_http_url
    from app.readiness import require_ready
    from deployments import cluster

    if not 1 <= args.clients <= 256:
        raise ConfigError("--clients must be between 1 and 256")
    if not 0 < args.kill_at < args.duration - 1:
        raise ConfigError("--kill-at must be inside the measured window: 0 < --kill-at < --duration - 1")
    base = (args.url or recorded_http_url()).rstrip("/")
    require_ready(base)
    cluster.require_cluster()
    replicas = _replicas()
    pid = _own_replica_pid(replicas)
    bodies = [(j, {"Content-Type": "image/jpeg"}) for j in sample_jpegs()]
    warmup = 3.0
    box: dict = {}

    def load() -> None:
        try:
            box["result"] = run_load(f"{base}/v1/detect", bodies, clients=args.clients, duration_s=args.duration,
                                     warmup_s=warmup, backoff=True)
        except Exception as exc:  # reported below, in one line
            box["error"] = exc

    runner = threading.Thread(target=load, daemon=True)
    runner.start()
    # the load's child process starts (spawn) before it measures: wait for its window by wall clock
    time.sleep(warmup + args.kill_at + 1.0)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    replaced = None
    limit = killed_at + REPLACE_WAIT_S
    while time.time() < limit:
        now_running = [r for r in _replicas() if int(r["pid"]) != pid]
        if len(now_running) >= len(replicas):
            replaced = time.time() - killed_at
            break
        time.sleep(0.5)
    runner.join()
    if "error" in box:
        raise Unavailable(f"the load did not run: {box['error']}")
    res = box["result"]
    kill_s = killed_at - res.started_at_wall
    served_before = sum(1 for t, _, s in res.timeline if s == 200 and t <= kill_s)
    failed_503 = res.errors.get("HTTP 503", 0)
    row = {"replicas": len(replicas), "clients": args.clients, "killed_pid": pid, "kill_at_s": round(kill_s, 2),
           "served_before_per_s": round(served_before / kill_s, 1) if kill_s > 0 else None,
           **outage(res.timeline, kill_s), "served": res.ok, "failed": res.failed, "failed_503": failed_503,
           "other_errors": res.failed - failed_503, "errors": res.errors,
           "replaced_s": None if replaced is None else round(replaced, 1)}
    report = BenchReport("failover", COLUMNS, [row])
    report.notes.append(f"POST /v1/detect to {base}, {args.clients} closed-loop clients (separate process, honouring "
                        f"Retry-After), {args.duration:.0f} s measured; SIGKILL to Detector replica pid {pid} "
                        f"{kill_s:.1f} s in; no service: the longest stretch with no request served, from the last one "
                        "before the kill; served again: the first request sent after the kill, served; replica back: "
                        "Serve reports as many RUNNING replicas as before")
    report.summary = {"longest_gap_s": row["longest_gap_s"], "failed": row["failed"],
                      "all_failures_503": row["other_errors"] == 0}
    report.emit(args.json)
    return 0
