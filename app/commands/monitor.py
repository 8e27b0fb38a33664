"""`edgebatch monitor nodes | prometheus-config | query`: what the nodes have and how busy they are."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from app.bench.report import format_table
from app.errors import BadRequest
from app.monitoring.collectors import NodeCollector, NodeSample

GIB = 1024**3


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="node resources (CPU, RAM, GPUs, Jetson, EdgeTPU) and Prometheus")
    msub = p.add_subparsers(dest="monitor_command", metavar="SUBCOMMAND")
    msub.required = True

    n = msub.add_parser("nodes", help="latest resource sample of every node (this machine when no monitor app runs)")
    n.add_argument("--local", action="store_true", help="sample this machine only, without Ray")
    n.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the supervisor's answer")
    n.add_argument("--json", action="store_true", help="print one JSON object (node id -> sample) last")
    n.set_defaults(func=cmd_nodes)

    c = msub.add_parser("prometheus-config", help="print a prometheus.yml scraping this Ray cluster's metrics ports")
    c.add_argument("--scrape-interval", type=float, default=10.0, help="seconds between scrapes (default 10)")
    c.add_argument("--output", type=Path, default=None, help="write the file here instead of stdout")
    c.set_defaults(func=cmd_prometheus_config)

    q = msub.add_parser("query", help="run one PromQL query against a Prometheus server")
    q.add_argument("expr", help="PromQL, e.g. 'ray_edgebatch_node_cpu_percent'")
    q.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL (default http://127.0.0.1:9090)")
    q.add_argument("--json", action="store_true", help="print one JSON list last")
    q.set_defaults(func=cmd_query)


def _gib(value: int | None) -> float | None:
    return None if value is None else value / GIB


def node_rows(samples: dict[str, NodeSample]) -> list[dict]:
    """One row per device of every node (every node has at least its CPU)."""
    rows = []
    for node_id, s in sorted(samples.items(), key=lambda kv: (kv[1].hostname, kv[0])):
        for d in s.devices or []:
            rows.append({
                "node": node_id[:12], "hostname": s.hostname, "device": d.label, "name": d.name[:32],
                "util_pct": d.util_percent, "mem_used_gib": _gib(d.mem_used_bytes),
                "mem_total_gib": _gib(d.mem_total_bytes), "note": d.note,
            })
        if not s.devices:
            rows.append({"node": node_id[:12], "hostname": s.hostname, "device": "-", "name": "no devices read",
                         "util_pct": s.cpu_percent, "mem_used_gib": _gib(s.ram_used_bytes),
                         "mem_total_gib": _gib(s.ram_total_bytes), "note": ""})
    return rows


COLUMNS = [("node", "node"), ("hostname", "host"), ("device", "device"), ("name", "name"),
           ("util_pct", "util %"), ("mem_used_gib", "mem used GiB"), ("mem_total_gib", "mem total GiB"),
           ("note", "note")]


def _samples_from_cluster(timeout_s: float) -> tuple[dict[str, NodeSample], str] | None:
    """The supervisor's samples when Ray and the monitor app run here, else None."""
    from deployments import cluster

    if not cluster.ray_running():
        return None
    from deployments.collectors import MONITOR_APP, alive_node_ids, monitor_running, wait_for_samples

    if not monitor_running():
        return None
    samples = wait_for_samples(set(alive_node_ids()), timeout_s=timeout_s)
    return samples, f"from the {MONITOR_APP} application ({len(samples)} nodes)"


def cmd_nodes(args: argparse.Namespace) -> int:
    found = None if args.local else _samples_from_cluster(args.timeout)
    if found is None:
        collector = NodeCollector()
        try:
            sample = collector.sample()
        finally:
            collector.close()
        samples = {sample.node_id: sample}
        source = "this machine (no edgebatch-monitor app running; a local NodeCollector)"
    else:
        samples, source = found
    print(f"== edgebatch monitor nodes: {source} ==")
    print(format_table(node_rows(samples), COLUMNS))
    for node_id, s in sorted(samples.items()):
        cpu = "-" if s.cpu_percent != s.cpu_percent else f"{s.cpu_percent:.1f}%"
        print(f"node {node_id[:12]} ({s.hostname}): CPU {cpu}, RAM {s.ram_used_bytes / GIB:.2f}/{s.ram_total_bytes / GIB:.2f} GiB")
        for note in s.notes:
            print(f"  - {note}")
    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in samples.items()}))
    return 0


def cmd_prometheus_config(args: argparse.Namespace) -> int:
    from deployments import cluster

    if args.scrape_interval <= 0:
        raise BadRequest("--scrape-interval must be > 0 seconds")
    cluster.require_cluster()
    from app.monitoring.promql import prometheus_config
    from deployments.collectors import ray_metrics_targets, ray_service_discovery_file

    sd_file = ray_service_discovery_file()
    # Ray's discovery file follows nodes joining and leaving; static targets are the fallback
    # when the dashboard (which writes it) is off.
    targets = [] if sd_file else ray_metrics_targets()
    text = prometheus_config(targets, service_discovery_files=[sd_file] if sd_file else [],
                             scrape_interval_s=args.scrape_interval)
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}; run: prometheus --config.file={args.output}")
    else:
        print(text, end="")
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from app.monitoring.promql import PromQLClient

    samples = PromQLClient(args.prometheus).query(args.expr)
    rows = [{"labels": ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())
                                if k not in ("SessionName", "WorkerId", "Version", "Component") and not k.startswith("otel_")),
             "value": s.value} for s in samples]
    print(format_table(rows, [("labels", "series"), ("value", "value")]))
    if args.json:
        print(json.dumps([{"labels": s.labels, "value": s.value, "timestamp": s.timestamp} for s in samples]))
    return 0
