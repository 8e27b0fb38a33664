"""What the console's JSON endpoints answer, built from plain data (no Ray): Ray's node table,
the collectors' samples, Serve's deployment details, the detectors' own reports.

The Serve side (``deployments/console.py``) only fetches those inputs; everything a view
derives (kind tags, replica placement, pending reasons, the real-time criterion) is here,
so it is tested without a cluster. Nothing here adds data a GET of the existing JSON
endpoints or `edgebatch status` does not already show (no tokens, no file paths).
"""

from __future__ import annotations

from typing import Any

from app.constants import DETECTOR_DEPLOYMENT

NODE_TAG_SUFFIX = "_node"  # tenancy's node-tag resources: gpu_node, jetson_node, edgetpu_node, cpu_node, ...
KNOWN_NODE_KINDS = ("gpu_node", "jetson_node", "edgetpu_node", "cpu_node")
HIDDEN_RESOURCE_PREFIXES = ("node:", "accelerator_type:")  # Ray's per-node address pseudo-resources


def node_views(nodes: list[dict[str, Any]], samples: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per Ray node: id, address, alive, kind tags, resources and its collector's latest sample."""
    out = []
    for n in sorted(nodes, key=lambda n: (not n.get("Alive"), n.get("NodeManagerAddress") or "", n.get("NodeID") or "")):
        resources = {k: v for k, v in (n.get("Resources") or {}).items() if not k.startswith(HIDDEN_RESOURCE_PREFIXES)}
        node_id = str(n.get("NodeID") or "")
        kinds = sorted(k for k in resources if k.endswith(NODE_TAG_SUFFIX))
        out.append({
            "node_id": node_id,
            "address": n.get("NodeManagerAddress"),
            "hostname": n.get("NodeManagerHostname"),
            "alive": bool(n.get("Alive")),
            "head": "node:__internal_head__" in (n.get("Resources") or {}),
            "kinds": kinds or ["untagged"],
            "resources": dict(sorted(resources.items())),
            "sample": sample_view(samples.get(node_id)),
        })
    return out


def sample_view(sample: dict[str, Any] | None) -> dict[str, Any] | None:
    """A collector's reading in the units the charts plot: percents, and memory as used/total bytes."""
    if not sample:
        return None
    cpu = sample.get("cpu_percent")
    return {
        "timestamp": sample.get("timestamp"),
        "cpu_percent": None if cpu is None or cpu != cpu else cpu,  # NaN: no host probe read it
        "ram_used_bytes": sample.get("ram_used_bytes"),
        "ram_total_bytes": sample.get("ram_total_bytes"),
        "devices": [{k: d.get(k) for k in ("kind", "index", "name", "util_percent", "mem_used_bytes", "mem_total_bytes",
                                           "note")} for d in sample.get("devices") or []],
        "notes": list(sample.get("notes") or []),
    }


def placement_views(details: dict[str, Any], pending: dict[str, dict[str, str]],
                    nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per Serve deployment: which model, its replicas (state and node), engine instances (CME) and,
    where replicas are missing, why (the missing resource tag, a lost node, Serve's own message)."""
    names = {str(n.get("NodeID")): n.get("NodeManagerAddress") or n.get("NodeManagerHostname") for n in nodes}
    alive = {str(n.get("NodeID")) for n in nodes if n.get("Alive")}
    out = []
    for app_name, app in sorted((details.get("applications") or {}).items()):
        for dep_name, dep in sorted((app.get("deployments") or {}).items()):
            config = dep.get("deployment_config") or {}
            user = config.get("user_config") or {}
            replicas = []
            for r in dep.get("replicas") or []:
                node = str(r.get("node_id") or "")
                replicas.append({"replica_id": r.get("replica_id"), "state": _text(r.get("state")), "node_id": node or None,
                                 "node": names.get(node), "node_alive": (node in alive) if node else None,
                                 "pid": r.get("pid")})
            reasons = []
            if pending.get(app_name, {}).get(dep_name):
                reasons.append(pending[app_name][dep_name])
            lost = [r for r in replicas if r["node_alive"] is False]
            if lost:
                reasons.append(f"{len(lost)} replica(s) were on a node that is gone: "
                               + ", ".join(sorted({r['node'] or r['node_id'] for r in lost})))
            status = _text(dep.get("status"))
            if status not in ("HEALTHY", "RUNNING") and dep.get("message"):
                reasons.append(str(dep["message"]).splitlines()[0][:300])
            running = sum(1 for r in replicas if r["state"] == "RUNNING")
            out.append({
                "app": app_name, "deployment": dep_name, "status": status,
                "route_prefix": app.get("route_prefix"),
                "detector": dep_name == DETECTOR_DEPLOYMENT or "model" in user,
                "model": user.get("model"), "backend": user.get("backend"),
                "engine_instances": user.get("engine_instances", 1) if "model" in user else None,
                "target_replicas": dep.get("target_num_replicas"), "running_replicas": running,
                "resources": _resources(config.get("ray_actor_options") or {}),
                "replicas": replicas, "problems": reasons,
            })
    return out


def _text(value: Any) -> str:
    """Serve's details hold enums (``DeploymentStatus.HEALTHY``): their value."""
    return str(getattr(value, "value", value) or "")


def _resources(options: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in (options.get("resources") or {}).items()}
    for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        if options.get(key):
            out[name] = float(options[key])
    return out


def detector_view(app: str, info: dict[str, Any], stats: dict[str, Any], control: dict[str, Any] | None) -> dict[str, Any]:
    """One detector: what it serves (model, version, alias, backend, variants, batch size), the controller's
    policy and last decision, and the window figures the charts plot (throughput, d_batch against N/F,
    queue length, the batch sizes that formed)."""
    m = stats.get("metrics") or {}
    fps = (control or {}).get("stream_fps") or m.get("stream_fps")
    mean_n = m.get("mean_batch_size") or 0.0
    criterion = mean_n / fps if fps and m.get("batches") else None
    d_batch = m.get("d_batch_s") if m.get("batches") else None
    return {
        "app": app,
        "model": info.get("model"), "version": info.get("version"), "alias": info.get("alias"),
        "pinned_version": info.get("pinned_version"), "backend": info.get("backend"),
        "max_batch_size": info.get("max_batch_size"), "batch_sizes": stats.get("batch_sizes") or [],
        "batch_wait_timeout_s": info.get("batch_wait_timeout_s"),
        "engine_instances": info.get("engine_instances"), "resident_variants": info.get("resident_variants"),
        "loaded_variants": info.get("loaded_variants") or {},
        "counters": info.get("counters") or {},
        "last_swap": info.get("last_swap"), "last_load_failure": info.get("last_load_failure"),
        "config_refused": (info.get("config_refused") or {}).get("reason") if info.get("config_refused") else None,
        "node_id": stats.get("node_id"),
        "policy": (control or {}).get("policy"),
        "pin": (control or {}).get("pin"),
        "last_decision": (control or {}).get("last_decision"),
        "controller_failure": (control or {}).get("last_failure"),
        "window": {
            "window_s": m.get("window_s"), "batches": m.get("batches", 0),
            "throughput": m.get("throughput"), "d_batch_s": d_batch, "stream_fps": fps,
            "criterion_s": criterion, "margin_s": None if criterion is None or d_batch is None else criterion - d_batch,
            "queue_len_mean": m.get("queue_len_mean"), "queue_len_max": m.get("queue_len_max"),
            "mean_batch_size": mean_n if m.get("batches") else None, "batch_sizes": m.get("batch_sizes") or {},
            "drops": m.get("drops") or {},
        },
    }


def registry_view(models: list[Any], descriptions: dict[str, Any]) -> list[dict[str, Any]]:
    """Models, versions, aliases, and every variant (backend, batch size, input, precision, size, hash);
    the MLflow artifact locations stay out (server-side paths)."""
    out = []
    for m in models:
        d = descriptions.get(m.name)
        versions = []
        for v in (d.versions if d else ()):
            versions.append({
                "version": v.version, "created": v.created, "aliases": list(v.aliases), "description": v.description,
                "in_use": sorted(v.in_use),
                "variants": [{"backend": x.backend, "batch_size": x.batch_size, "input_shape": list(x.input_shape),
                              "precision": x.precision, "size_bytes": x.size_bytes, "sha256": x.sha256}
                             for x in sorted(v.variants, key=lambda x: (x.backend, x.batch_size))],
            })
        out.append({"name": m.name, "description": m.description, "latest_version": m.latest_version,
                    "aliases": dict(sorted(m.aliases.items())),
                    "versions": sorted(versions, key=lambda v: -int(v["version"]) if str(v["version"]).isdigit() else 0)})
    return out
