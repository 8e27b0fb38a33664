"""`edgebatch up | down | status | env | config export`: one instance's lifecycle.

An instance is a state folder (``EDGEBATCH_HOME``): its registry, its Ray token, the
ports and address `up` chose (``app.instance``). Every command here works on that
instance only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

from app.constants import DETECTOR_APP
from app.errors import ConfigError, Unavailable
from app.instance import (
    RAY_AUTH_MODE_ENV,
    RAY_AUTH_TOKEN_PATH_ENV,
    InstancePorts,
    InstanceRecord,
    ensure_ray_token,
    plan_ports,
    ray_auth_env,
)
from app.readiness import wait_ready
from app.state import StateDir

PORT_FLAGS = InstancePorts.OPTIONS
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start (or join) Ray, register the demo model, deploy the detector")
    p.add_argument("--config", type=Path, default=None, help="Serve config YAML (default deployments/serve_config.yaml)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a new local Ray head")
    for name, flag in PORT_FLAGS.items():
        what = "HTTP port of the Serve proxy (default from the config, 8000)" if name == "http" else \
            f"{name.replace('_', ' ')} port of a new local Ray head"
        p.add_argument(flag, type=int, default=None, dest=f"port_{name}", metavar="PORT",
                       help=f"{what}; when left out, Ray's default if free, else a free port (recorded; see `status`)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local head without the dashboard (no `serve deploy`)")
    p.add_argument("--api-token", action="store_true",
                   help="create this instance's API bearer token if it has none (<state>/api_token, 0600): every "
                        "state-changing endpoint then needs it, and HTTP may bind other interfaces than 127.0.0.1 "
                        "(docs/security.md)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app to run")
    p.add_argument("--direct-ingress", action="store_true",
                   help="also serve HTTP straight from each ingress replica (Ray Serve's experimental direct "
                        "ingress; ports from 30000, see `edgebatch status`): skips the proxy hop, about 20%% more "
                        "images/s measured on 2 cores. Needs a head started by this `up`")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the Serve application and the local Ray head started by `up`")
    p.add_argument("--keep-ray", action="store_true", help="only remove the Serve application")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="deployments, replicas, the loaded model variant and this instance's ports")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("env", help="shell exports that point Ray's own CLIs (serve, ray) at this instance: "
                                   "eval \"$(edgebatch env)\"")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("token", help="create (if missing) this instance's Ray token and print its path: for "
                                     "cluster.yaml's file_mounts, so every node of a cluster shares it")
    p.set_defaults(func=cmd_token)

    cfg = sub.add_parser("config", help="the Serve config as this instance applies it")
    csub = cfg.add_subparsers(dest="config_cmd", metavar="CMD")
    csub.required = True
    p = csub.add_parser("export", help="print the exact YAML `edgebatch up` applies (for `serve deploy`)")
    p.add_argument("--config", type=Path, default=None, help="Serve config YAML (default deployments/serve_config.yaml)")
    p.add_argument("--out", type=Path, default=None, help="write to this file instead of standard output")
    p.set_defaults(func=cmd_config_export)


def _wanted_ports(args: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(args, f"port_{name}") for name in PORT_FLAGS}


def _join_or_start(args: argparse.Namespace, state: StateDir, http_default: int) -> tuple[InstanceRecord, bool]:
    """Connect to this instance's cluster: RAY_ADDRESS, the head recorded here, or a new local head.
    Returns the record and whether this call started the head."""
    from deployments import cluster

    wanted = _wanted_ports(args)
    record = InstanceRecord.load(state)
    joining = os.environ.get("RAY_ADDRESS")
    if joining and not (record is not None and record.address == joining):  # (`edgebatch env` exports our own)
        address = joining
        if not cluster.ray_running(address):
            raise Unavailable(f"RAY_ADDRESS={address} is set but no Ray cluster answers there; "
                              "check the address or unset it to start a local head")
        ports = plan_ports({"http": wanted["http"]}, http_default=http_default, head=False) \
            if record is None or record.ports is None else record.ports
        record = InstanceRecord(address=address, started_head=False, ports=ports)
        record.save(state)
        print(f"Ray: joined the cluster at {address}")
        return record, False
    if record is not None and cluster.ray_running(record.address):
        given = {n: p for n, p in wanted.items() if p is not None}
        clash = {n: p for n, p in given.items() if record.ports and getattr(record.ports, n) != p}
        if clash:
            name, port = next(iter(clash.items()))
            raise ConfigError(f"this instance already runs with {PORT_FLAGS[name]} {getattr(record.ports, name)}; "
                              f"`edgebatch down` first to move it to {port}")
        print(f"Ray: using this instance's head at {record.address}")
        if args.direct_ingress and not record.direct_ingress:
            print("note: this head was started without --direct-ingress; `edgebatch down`, then "
                  "`edgebatch up --direct-ingress` to serve without the proxy hop")
        return record, False
    if record is not None:
        print(cluster.stop_local(state))  # a head recorded earlier that is gone: clear what is left of it
    ports = plan_ports(wanted, http_default=http_default)
    record = cluster.start_local_head(state, ports, num_cpus=args.num_cpus, dashboard=not args.no_dashboard,
                                      direct_ingress=args.direct_ingress)
    if not cluster.ray_running(record.address):
        cluster.stop_local(state)
        raise Unavailable(f"started a local Ray head at {record.address} but cannot connect to it (stopped it again)")
    cluster.record_session(state, record)
    print(f"Ray: started a local head at {record.address} (`edgebatch down` stops it)")
    return record, True


def cmd_up(args: argparse.Namespace) -> int:
    from deployments import config_file, launcher
    from deployments.cluster import alive_node_ips, registry_reach_warning
    from deployments.status import direct_ingress_urls
    from model_registry import ModelRepository
    from model_registry.demo import ensure_demo_model

    state = StateDir.default().ensure()
    t0 = time.perf_counter()
    previous = InstanceRecord.load(state)
    direct_ingress = args.direct_ingress or bool(previous and previous.direct_ingress)
    if direct_ingress:
        # read by Serve's controller and replicas at import: set before the head and the driver start
        os.environ[config_file.DIRECT_INGRESS_ENV] = "1"
    where = args.config or config_file.DEFAULT_CONFIG
    config = config_file.load_serve_config(args.config, state)  # a bad field fails here, before Ray starts
    token_note = _check_exposure(args, state, config)
    repo = ModelRepository.from_env(state)
    repo.check_available()
    version = ensure_demo_model(repo)
    print(f"model repository: {repo.tracking_uri}  demo-detector v{version} (alias production)")

    http_default = int(config.get("http_options", {}).get("port", 8000))
    record, started = _join_or_start(args, state, http_default)
    warning = registry_reach_warning(repo.tracking_uri, repo.host_local, *alive_node_ips())
    if warning:
        print(warning)
    try:
        assert record.ports is not None
        config = config_file.load_serve_config(args.config, state, port=record.ports.http)
        submitted = launcher.deploy(config)
        deadline = time.monotonic() + args.timeout
        for app in config["applications"]:  # every app of this config, not only the detector's
            summary = launcher.wait_running(app["name"], timeout_s=max(1.0, deadline - time.monotonic()),
                                            since=submitted)
        host = config.get("http_options", {}).get("host", "127.0.0.1")
        base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{record.ports.http}"
        if any(app["name"] == DETECTOR_APP for app in config["applications"]):
            wait_ready(base, timeout_s=60)
    except BaseException as exc:
        if started:  # a failed first `up` leaves no Ray process behind
            import ray

            from deployments import cluster

            ray.shutdown()
            cluster.stop_local(state)
            if isinstance(exc, Unavailable):
                raise Unavailable(f"{exc.message}\n(stopped the Ray head this `up` had started; fix {where} and "
                                  "run `edgebatch up` again)") from None
        raise
    record.http_url = base
    record.save(state)
    det = summary["applications"].get(DETECTOR_APP, {}).get("detector")
    if det is not None:
        print(f"serving {det.get('model')} v{det.get('version')} at {base}  (max batch {det.get('max_batch_size')}, "
              f"variants loaded {list(det.get('loaded_variants', {}))}) in {time.perf_counter() - t0:.1f} s")
        print(f"try: curl -s -X POST --data-binary @image.jpg -H 'Content-Type: image/jpeg' {base}/v1/detect")
        print(f"console: {base}/ui  (nodes, placements, detectors, streams, registry; docs/console.md)")
    else:
        names = ", ".join(f"{a['name']} ({a.get('route_prefix') or 'no route'})" for a in config["applications"])
        print(f"serving {names} at {base} in {time.perf_counter() - t0:.1f} s")
    print(token_note)
    for url in direct_ingress_urls(DETECTOR_APP):
        print(f"direct ingress (no proxy hop): {url}/v1/detect")
    print("Ray's own CLIs for this instance: eval \"$(edgebatch env)\"; then `serve status`, "
          "`serve deploy` a YAML from `edgebatch config export`")
    return 0


def _check_exposure(args: argparse.Namespace, state: StateDir, config: dict) -> str:
    """HTTP on another interface than loopback needs an API token (else anyone on the site network
    could add streams or move batch sizes); says what the instance is exposed with."""
    from app.security.auth import ensure_api_token, load_api_token, token_path

    if args.api_token:
        ensure_api_token(state)
    host = str(config.get("http_options", {}).get("host", "127.0.0.1"))
    if load_api_token(state) is None:
        if host not in LOOPBACK_HOSTS:
            raise ConfigError(f"http_options.host {host} would expose the API without a token; run "
                              "`edgebatch up --api-token` (or set EDGEBATCH_API_TOKEN), or bind 127.0.0.1")
        return ("API: no token configured, so HTTP listens on 127.0.0.1 only; `edgebatch up --api-token` "
                "creates one (needed to bind other interfaces)")
    return (f"API: state-changing endpoints need `Authorization: Bearer <token>` (the token is in "
            f"{token_path(state)} or EDGEBATCH_API_TOKEN)")


def cmd_down(args: argparse.Namespace) -> int:
    from deployments import cluster, launcher

    state = StateDir.default()
    record = InstanceRecord.load(state)
    if record is None and not os.environ.get("RAY_ADDRESS"):
        print(f"no edgebatch instance is recorded in {state.root}; nothing to stop")
        return 0
    if cluster.ray_running(state=state):
        launcher.shutdown_serve()
        print("Serve applications removed")
        import ray

        ray.shutdown()  # disconnect before the head goes, or Ray logs errors about the lost driver
    if not args.keep_ray:
        print(cluster.stop_local(state))
    return 0


def _ports_line(record: InstanceRecord | None) -> str | None:
    if record is None or record.ports is None:
        return None
    p = record.ports
    parts = [f"http {p.http}"]
    if record.started_head:
        parts += [f"gcs {p.gcs}", f"dashboard {p.dashboard}", f"client server {p.client_server}",
                  f"dashboard agent {p.dashboard_agent_http}/{p.dashboard_agent_grpc}",
                  f"metrics export {p.metrics_export}"]
        parts += [f"{n.replace('_', ' ')} {getattr(p, n)}" for n in ("node_manager", "object_manager", "runtime_env_agent")
                  if getattr(p, n)]
    return ", ".join(parts)


def cmd_status(args: argparse.Namespace) -> int:
    from deployments import cluster
    from deployments.status import serve_summary

    state = StateDir.default()
    cluster.require_cluster(state)
    record = InstanceRecord.load(state)
    summary = serve_summary()
    summary["instance"] = {"state": str(state.root), "address": cluster.cluster_address(state),
                           "http_url": record.http_url if record else None,
                           "started_head": record.started_head if record else False,
                           "ports": asdict(record.ports) if record and record.ports else None}
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    print(f"instance {state.root}: Ray at {summary['instance']['address']}"
          + (f", serving {record.http_url}" if record and record.http_url else ""))
    ports = _ports_line(record)
    if ports:
        print(f"  ports: {ports}")
    if not summary["applications"]:
        print("no Serve applications are deployed; run `edgebatch up`")
        return 0
    for app_name, app in summary["applications"].items():
        print(f"application {app_name}: {app['status']} {app.get('message') or ''}".rstrip())
        for name, d in app["deployments"].items():
            reps = ", ".join(f"{k}={v}" for k, v in d["replicas"].items()) or "none"
            print(f"  deployment {name}: {d['status']}  replicas: {reps}")
            for r in d.get("replica_nodes", []):
                where = f"{r.get('node_ip') or '?'} (node {str(r.get('node_id') or '?')[:8]}"
                print(f"    {r.get('state')} pid {r.get('pid')} on {where}, {', '.join(r.get('tags') or []) or 'no tags'})")
            if d.get("message"):
                print(f"    {d['message']}")
        det = app.get("detector")
        if det and "error" not in det:
            _print_detector(det)
        elif det:
            print(f"  detector info unavailable: {det['error']}")
        for url in app.get("direct_ingress", []):
            print(f"  direct ingress (no proxy hop): {url}")
    return 0


def _print_detector(det: dict) -> None:
    follows = f"pinned version {det['pinned_version']}" if det.get("pinned_version") else f"alias {det['alias']}"
    print(f"  model {det['model']} v{det['version']} ({follows}, backend {det['backend']})")
    print(f"  batch: max {det['max_batch_size']}, wait {det['batch_wait_timeout_s']} s; "
          f"loaded variants {list(det['loaded_variants'])}; batches seen {det['batch_sizes_seen']}")
    refused = det.get("config_refused")
    if refused:
        print(f"  config REFUSED, still serving the last good one: {refused.get('reason', refused)}")
    if det.get("controller"):
        c = det["controller"]
        if c.get("action"):
            print(f"  controller: policy {c.get('policy')}, size {c.get('current_batch_size')}, last decision "
                  f"{c.get('action')} -> {c.get('batch_size')}: {c.get('reason')}")
        else:
            print(f"  controller: policy {c.get('policy')}, size {c.get('current_batch_size')}, no decision yet"
                  + (" (`edgebatch batch auto MODEL` turns a policy on)" if c.get("policy") == "manual" else ""))


def cmd_env(args: argparse.Namespace) -> int:
    state = StateDir.default()
    record = InstanceRecord.load(state)
    if record is None and not os.environ.get("RAY_ADDRESS"):
        raise Unavailable(f"no edgebatch instance is recorded in {state.root}; start one with `edgebatch up`")
    env = {"EDGEBATCH_HOME": str(state.root), **ray_auth_env(state)}
    for key in (RAY_AUTH_MODE_ENV, RAY_AUTH_TOKEN_PATH_ENV):  # as the CLI resolved them at start (`app.cli`)
        if os.environ.get(key):
            env[key] = os.environ[key]
    if record is not None:
        env["RAY_ADDRESS"] = record.address
        if record.started_head and record.ports is not None:
            env["RAY_DASHBOARD_ADDRESS"] = f"http://127.0.0.1:{record.ports.dashboard}"
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    print(ensure_ray_token(StateDir.default().ensure()))
    return 0


def cmd_config_export(args: argparse.Namespace) -> int:
    from deployments import config_file

    state = StateDir.default()
    record = InstanceRecord.load(state)
    port = record.ports.http if record and record.ports else None
    config = config_file.load_serve_config(args.config, state, port=port,
                                           direct_ingress=bool(record and record.direct_ingress))
    text = config_file.export_yaml(config)
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0
