"""`edgebatch up | down | status`: the Serve application's lifecycle."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from app.errors import Unavailable
from app.state import StateDir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start (or join) Ray, register the demo model, deploy the detector")
    p.add_argument("--config", type=Path, default=None, help="Serve config YAML (default deployments/serve_config.yaml)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default from the config, 8000)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a new local Ray head")
    p.add_argument("--ray-port", type=int, default=6379, help="GCS port of a new local Ray head (default 6379)")
    p.add_argument("--no-dashboard", action="store_true", help="start the local head without the dashboard (no `serve deploy`)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the app to run")
    p.add_argument("--direct-ingress", action="store_true",
                   help="also serve HTTP straight from each ingress replica (Ray Serve's experimental direct "
                        "ingress; ports from 30000, see `edgebatch status`): skips the proxy hop, about 20%% more "
                        "images/s measured on 2 cores. Needs a head started by this `up`")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the Serve application and the local Ray head started by `up`")
    p.add_argument("--keep-ray", action="store_true", help="only remove the Serve application")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("status", help="deployments, replicas and the loaded model variant")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_status)


def _http_ready(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.3)
    raise Unavailable(f"{url} not ready after {timeout_s:.0f} s ({last})")


def cmd_up(args: argparse.Namespace) -> int:
    from deployments import launcher
    from model_registry import ModelRepository
    from model_registry.demo import ensure_demo_model

    state = StateDir.default().ensure()
    t0 = time.perf_counter()
    if args.direct_ingress or launcher.head_has_direct_ingress(state):
        # read by Serve's controller and replicas at import: set before the head and the driver start
        os.environ[launcher.DIRECT_INGRESS_ENV] = "1"
    config = launcher.load_serve_config(args.config, state, port=args.port)  # a bad field fails here, before Ray starts
    repo = ModelRepository.from_env(state)
    repo.check_available()
    version = ensure_demo_model(repo)
    print(f"model repository: {repo.tracking_uri}  demo-detector v{version} (alias production)")

    recorded = launcher.cluster_address(state)
    if os.environ.get("RAY_ADDRESS"):
        if not launcher.ray_running(os.environ["RAY_ADDRESS"]):
            raise Unavailable(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set but no Ray cluster answers there; "
                              "check the address or unset it to start a local head")
        print(f"Ray: joined the cluster at {os.environ['RAY_ADDRESS']}")
    elif recorded != "auto" and launcher.ray_running(recorded):
        print(f"Ray: using the local head started earlier at {recorded}")
        if args.direct_ingress and not launcher.head_has_direct_ingress(state):
            print("note: this head was started without --direct-ingress; `edgebatch down`, then "
                  "`edgebatch up --direct-ingress` to serve without the proxy hop")
    else:
        state.ray_head_file.unlink(missing_ok=True)  # a head recorded earlier that is gone
        address = launcher.start_local_head(state, args.num_cpus, dashboard=not args.no_dashboard, port=args.ray_port)
        if not launcher.ray_running(address):
            launcher.stop_local(state)
            raise Unavailable(f"started a local Ray head at {address} but cannot connect to it (stopped it again); "
                              "see /tmp/ray/session_latest/logs")
        launcher.record_session(state, direct_ingress=args.direct_ingress)
        print(f"Ray: started a local head at {address} (`edgebatch down` stops it)")
    launcher.deploy(config)
    summary = launcher.wait_running(timeout_s=args.timeout)
    http = config.get("http_options", {})
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    _http_ready(f"{base}/v2/health/ready", timeout_s=60)
    det = summary["applications"].get(launcher.APP_NAME, {}).get("detector", {})
    print(f"serving {det.get('model')} v{det.get('version')} at {base}  (max batch {det.get('max_batch_size')}, "
          f"variants loaded {list(det.get('loaded_variants', {}))}) in {time.perf_counter() - t0:.1f} s")
    print(f"try: curl -s -X POST --data-binary @image.jpg -H 'Content-Type: image/jpeg' {base}/v1/detect")
    for url in launcher.direct_ingress_urls(launcher.APP_NAME):
        print(f"direct ingress (no proxy hop): {url}/v1/detect")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from deployments import launcher

    if launcher.ray_running():
        launcher.shutdown_serve()
        print("Serve application removed")
        import ray

        ray.shutdown()  # disconnect before the head goes, or Ray logs errors about the lost driver
    if not args.keep_ray and not os.environ.get("RAY_ADDRESS"):
        print(launcher.stop_local(StateDir.default()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deployments import launcher

    if not launcher.ray_running():
        raise Unavailable("no Ray cluster is running here; start one with `edgebatch up` (or set RAY_ADDRESS)")
    summary = launcher.serve_summary()
    if args.json:
        print(json.dumps(summary, default=str))
        return 0
    if not summary["applications"]:
        print("no Serve applications are deployed; run `edgebatch up`")
        return 0
    for app_name, app in summary["applications"].items():
        print(f"application {app_name}: {app['status']} {app.get('message') or ''}".rstrip())
        for name, d in app["deployments"].items():
            reps = ", ".join(f"{k}={v}" for k, v in d["replicas"].items()) or "none"
            print(f"  deployment {name}: {d['status']}  replicas: {reps}")
            if d.get("message"):
                print(f"    {d['message']}")
        det = app.get("detector")
        if det and "error" not in det:
            print(f"  model {det['model']} v{det['version']} (alias {det['alias']}, backend {det['backend']})")
            print(f"  batch: max {det['max_batch_size']}, wait {det['batch_wait_timeout_s']} s; "
                  f"loaded variants {list(det['loaded_variants'])}; batches seen {det['batch_sizes_seen']}")
            if det.get("controller"):
                c = det["controller"]
                if c.get("action"):
                    print(f"  controller: policy {c.get('policy')}, size {c.get('current_batch_size')}, last decision "
                          f"{c.get('action')} -> {c.get('batch_size')}: {c.get('reason')}")
                else:
                    print(f"  controller: policy {c.get('policy')}, size {c.get('current_batch_size')}, no decision yet"
                          + (" (`edgebatch batch auto MODEL` turns a policy on)" if c.get("policy") == "manual" else ""))
        elif det:
            print(f"  detector info unavailable: {det['error']}")
        for url in app.get("direct_ingress", []):
            print(f"  direct ingress (no proxy hop): {url}")
    return 0
