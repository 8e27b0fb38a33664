"""`edgebatch bench adapt`: the controller against every static batch size, in the same run.

Phases under one steady closed-loop HTTP load (``--clients`` clients sending camera frames):

1. static sweep: each allowed size pinned in turn, ``--step`` seconds measured per size;
2. adaptive: start from the smallest size, turn the policy on, let it converge for
   ``--converge`` seconds, then measure ``--measure`` seconds with the controller in charge;
3. swap: pin a size whose variant is not resident while the load runs, and compare the
   p99 of requests that overlapped the swap with the steady p99 before it; count failures.

The load client runs in this process (an asyncio loop in a thread) so request start
times share one clock with the swap; the server runs in Ray's workers.

With ``--profile NAME|FILE`` nothing is served: the policies run against a simulated device
(``app.simulation``: a device profile's per-batch delays, stream rate and memory), every static
size and every adaptive policy on the same simulated streams, and the table says SIMULATED.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from app.bench.report import BenchReport, percentiles
from app.commands.bench import common, parse_sizes
from app.errors import ConfigError, Unavailable

COLUMNS = [
    ("phase", "phase"), ("batch_size", "batch"), ("images_per_s", "images/s"), ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"), ("ok", "ok"), ("failed", "failed"), ("note", "note"),
]


SIM_COLUMNS = [
    ("policy", "policy"), ("settled_size", "settled"), ("settle_window", "settled at window"), ("probes", "probes"),
    ("images_per_s", "images/s"), ("ratio_to_best_static", "vs best static"), ("margin_ms", "margin ms"),
    ("mean_latency_ms", "latency ms"), ("dropped_per_s", "dropped/s"),
]


def add_bench_adapt(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("adapt", help="adaptive batch controller vs every static size, plus a swap under load "
                                      "(or, with --profile, simulated on a device profile)")
    p.add_argument("--model", default="demo-detector")
    p.add_argument("--policy", default="throughput_aware", choices=["throughput_aware", "algorithm1", "aimd"])
    p.add_argument("--fps", type=float, default=None,
                   help="stream rate F of the real-time criterion N/F (default 30, or the profile's)")
    p.add_argument("--profile", metavar="NAME|FILE", default=None,
                   help="simulate instead of serving: a shipped device profile (see --list-profiles) or a JSON file "
                        "(a profile, `python -m app.devicecheck` output, `bench sweep --json` output)")
    p.add_argument("--list-profiles", action="store_true", help="list the shipped device profiles and exit")
    p.add_argument("--streams", type=int, default=None, help="simulated: streams of F fps (default: the profile's)")
    p.add_argument("--windows", type=int, default=60, help="simulated: policy windows per run")
    p.add_argument("--window-s", type=float, default=2.0, help="simulated: seconds per policy window")
    p.add_argument("--batch-sizes", default=None, help="sizes to sweep (default: the detector's batch_sizes)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop HTTP clients")
    p.add_argument("--step", type=float, default=10.0, help="measured seconds per static size")
    p.add_argument("--settle", type=float, default=3.0, help="seconds of load after each change before measuring")
    p.add_argument("--converge", type=float, default=60.0, help="seconds the controller gets to converge")
    p.add_argument("--measure", type=float, default=15.0, help="measured seconds with the controller in charge")
    p.add_argument("--swap-window", type=float, default=8.0, help="steady seconds before (and after) the forced swap")
    p.add_argument("--url", default=None, help="server base URL (default from the Serve config)")
    p.add_argument("--port", type=int, default=None, help="HTTP port when this bench deploys the app")
    p.add_argument("--own-ray", action="store_true",
                   help="start a private Ray in this process (never join a running cluster) and deploy the app there")
    common(p)
    p.set_defaults(func=cmd_adapt)


@dataclass
class ClosedLoop:
    """``clients`` workers, each sending its next frame as soon as the last answered."""

    url: str
    bodies: list[bytes]
    clients: int
    records: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, status; 0 = no answer)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ClosedLoop:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="bench-adapt-load", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(120)

    async def _main(self) -> None:
        import aiohttp

        conn = aiohttp.TCPConnector(limit=self.clients)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:

            async def worker(i: int) -> None:
                while not self._stop.is_set():
                    body = self.bodies[i % len(self.bodies)]
                    i += self.clients
                    t0 = time.perf_counter()
                    try:
                        async with session.post(self.url, data=body, headers={"Content-Type": "image/jpeg"}) as r:
                            await r.read()
                            status = r.status
                    except (aiohttp.ClientError, asyncio.TimeoutError):
                        status = 0
                    self.records.append((t0, time.perf_counter(), status))

            await asyncio.gather(*(worker(w) for w in range(self.clients)))

    def between(self, t0: float, t1: float) -> dict[str, Any]:
        """Requests that started in [t0, t1): images/s (answers completed in the span), latency, failures."""
        recs = [r for r in list(self.records) if t0 <= r[0] < t1]
        ok = [r for r in recs if r[2] == 200]
        done_in = sum(1 for r in self.records if r[2] == 200 and t0 <= r[1] < t1)
        return {"images_per_s": done_in / max(t1 - t0, 1e-9), "ok": len(ok), "failed": len(recs) - len(ok),
                **percentiles([r[1] - r[0] for r in ok])}

    def count(self) -> int:
        return len(self.records)


def _ensure_app(args: argparse.Namespace) -> str:
    """Join the running app, or start Ray in this process and deploy the Serve config; the base URL."""
    from app.constants import DETECTOR_APP
    from app.instance import recorded_http_url
    from app.state import StateDir
    from deployments import cluster, launcher
    from deployments.config_file import load_serve_config

    state = StateDir.default().ensure()
    if not args.own_ray and cluster.ray_running(state=state):
        from ray import serve

        if DETECTOR_APP not in serve.status().applications:
            raise Unavailable("Ray runs but the edgebatch app is not deployed; run `edgebatch up` first")
        return args.url or recorded_http_url(state)
    import ray

    from model_registry import ModelRepository
    from model_registry.demo import ensure_demo_model

    ensure_demo_model(ModelRepository.from_env(state))
    ray.init(address="local", logging_level="ERROR", log_to_driver=False, include_dashboard=False)
    port = args.port
    if port is None and args.own_ray:
        import socket

        with socket.socket() as sock:  # a private Ray must not fight a running app for :8000
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    config = load_serve_config(None, state, port=port)
    launcher.deploy(config)
    launcher.wait_running(timeout_s=300)
    launcher.wait_running("edgebatch-controller", timeout_s=120)
    http = config.get("http_options", {})
    return args.url or f"http://127.0.0.1:{http.get('port', 8000)}"


def _result(ref: Any, timeout_s: float = 180.0) -> dict[str, Any]:
    """A controller call's answer; its refusals arrive as app.errors exceptions with their message."""
    return ref.result(timeout_s=timeout_s)


def _wait(seconds: float) -> None:
    """The bench's pacing: load keeps running while the driver waits (not a synchronisation)."""
    time.sleep(max(seconds, 0.0))


def cmd_adapt_simulated(args: argparse.Namespace) -> int:
    """Every static size and policy on a device profile; no Ray, no model, clearly labelled SIMULATED."""
    from app.simulation import SimulationSettings, compare, load_profile, shipped_profiles
    from policies.batch_size import DEFAULT_POLICY

    if args.list_profiles:
        for name, path in shipped_profiles().items():
            profile = load_profile(str(path))
            print(f"{name}  [{profile.kind}]  {profile.description}")
        return 0
    if args.windows < 10 or args.window_s <= 0 or (args.streams is not None and args.streams < 1):
        raise ConfigError("--windows must be >= 10, --window-s > 0 and --streams >= 1")
    profile = load_profile(args.profile).with_load(fps=args.fps, streams=args.streams)
    settings = SimulationSettings(windows=args.windows, window_s=args.window_s, tail_windows=max(5, args.windows // 3))
    result = compare(profile, settings=settings)
    rows = [{**r.to_dict(), "phase": "static"} for r in result.statics]
    rows += [{**r.to_dict(), "phase": "policy"} for r in result.policies]
    default = next(r for r in result.policies if r.policy == DEFAULT_POLICY)
    report = BenchReport("adapt (SIMULATED)", SIM_COLUMNS, rows)
    report.notes += [
        f"SIMULATED: no model ran. Device profile {profile.name} [{profile.kind}]: {profile.description}",
        f"numbers from: {profile.source}",
        f"load: {profile.streams} stream(s) x {profile.fps:g} fps = {profile.rate:g} frames/s; {settings.windows} "
        f"windows of {settings.window_s:g} s, figures over the last {settings.tail_windows}; margin = N/F - d_batch",
    ]
    report.summary = {
        "simulated": True,
        "profile": profile.to_dict(),
        "best_static_batch_size": result.best_static.settled_size,
        "best_static_images_per_s": result.best_static.images_per_s,
        "default_policy": DEFAULT_POLICY,
        "default_settled_size": default.settled_size,
        "default_ratio_to_best_static": default.ratio_to_best_static,
        "default_probes": default.probes,
        "default_within_5_percent": default.ratio_to_best_static >= 0.95,
    }
    report.emit(args.json)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    if args.profile or args.list_profiles:
        return cmd_adapt_simulated(args)
    args.fps = 30.0 if args.fps is None else args.fps
    import httpx
    from ray import serve

    from app.bench.images import sample_jpegs
    from deployments.controller import APP_NAME, DEPLOYMENT_NAME, MANUAL

    if args.clients < 1 or min(args.step, args.converge, args.measure, args.swap_window) <= 0:
        raise ConfigError("--clients, --step, --converge, --measure and --swap-window must be positive")
    base = _ensure_app(args).rstrip("/")
    if APP_NAME not in serve.status().applications:
        raise Unavailable(f"the batch controller ({APP_NAME}) is not deployed; it is in deployments/serve_config.yaml")
    controller = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    from app.constants import DETECTOR_APP, DETECTOR_DEPLOYMENT

    detector = serve.get_deployment_handle(DETECTOR_DEPLOYMENT, app_name=DETECTOR_APP)
    try:
        httpx.get(f"{base}/v2/health/ready", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise Unavailable(f"the detector at {base} is not ready ({exc}); pass --url or --port") from None
    stats = detector.stats.remote().result(timeout_s=60)
    allowed = sorted(stats.batch_sizes)
    sizes = parse_sizes(args.batch_sizes) if args.batch_sizes else allowed
    if set(sizes) - set(allowed):
        raise ConfigError(f"--batch-sizes {sizes} must be among the detector's variant sizes {allowed}")
    original = stats.max_batch_size
    rows: list[dict[str, Any]] = []
    load = ClosedLoop(f"{base}/v1/detect", sample_jpegs(n=16), args.clients).start()
    try:
        # 1. every static size, same run, same load
        for n in sizes:
            _result(controller.set_fixed.remote(args.model, n))
            _wait(args.settle)
            t0 = time.perf_counter()
            _wait(args.step)
            rows.append({"phase": "static", "batch_size": n, **load.between(t0, time.perf_counter())})
        best = max(rows, key=lambda r: r["images_per_s"])

        # 2. the controller from the smallest size
        _result(controller.set_fixed.remote(args.model, sizes[0]))
        _result(controller.set_policy.remote(args.model, args.policy, fps=args.fps))
        t_conv = time.perf_counter()
        _wait(args.converge)
        t0 = time.perf_counter()
        size_before = detector.info.remote().result(timeout_s=60).max_batch_size
        _wait(args.measure)
        t1 = time.perf_counter()
        ctl = _result(controller.status.remote(), 60)["detectors"][args.model]
        adaptive_size = ctl["current_batch_size"]
        moves = [h for h in ctl["history"] if h["action"] != "keep" and h["policy"] != "operator"]
        note = f"{args.policy}; {len(moves)} moves in {t1 - t_conv:.0f} s" + (
            f"; moved {size_before}->{adaptive_size} while measured" if adaptive_size != size_before else "")
        adaptive = {"phase": "adaptive", "batch_size": adaptive_size, **load.between(t0, t1), "note": note}
        rows.append(adaptive)

        # 3. a forced swap to a size whose variant is not resident
        _result(controller.set_policy.remote(args.model, MANUAL))
        resident = sorted(detector.info.remote().result(timeout_s=60).loaded_variants)
        target = next((s for s in reversed(allowed) if s not in resident), next(s for s in allowed if s != adaptive_size))
        t_steady = time.perf_counter()
        _wait(args.swap_window)
        t_swap0 = time.perf_counter()
        _result(controller.set_fixed.remote(args.model, target))
        t_swap1 = time.perf_counter()
        _wait(args.swap_window)
        t_end = time.perf_counter()
        steady = load.between(t_steady, t_swap0)
        during = load.between(t_swap0, t_swap1 + 1.0)
        whole = load.between(t_steady, t_end)
        rows.append({"phase": "steady", "batch_size": adaptive_size, **steady, "note": "before the swap"})
        rows.append({"phase": "swap", "batch_size": target, **during,
                     "note": f"{adaptive_size}->{target} took {t_swap1 - t_swap0:.2f} s; requests started then +1 s"})
    finally:
        load.stop()
        try:
            controller.set_fixed.remote(args.model, original).result(timeout_s=180)
            controller.set_policy.remote(args.model, MANUAL).result(timeout_s=60)
        except Exception:  # restoring is best effort; the figures are already taken
            pass

    ratio = adaptive["images_per_s"] / best["images_per_s"] if best["images_per_s"] else None
    report = BenchReport("adapt", COLUMNS, rows)
    report.notes.append(f"{args.clients} closed-loop HTTP clients (in the bench process) posting 1280x720 JPEG frames to "
                        f"{base}/v1/detect; {args.step:.0f} s per static size after {args.settle:.0f} s settle; "
                        f"controller {args.policy} at F={args.fps:g} fps, {args.converge:.0f} s to converge, "
                        f"{args.measure:.0f} s measured")
    report.summary = {
        "best_static_batch_size": best["batch_size"],
        "best_static_images_per_s": round(best["images_per_s"], 2),
        "adaptive_batch_size": adaptive_size,
        "adaptive_images_per_s": round(adaptive["images_per_s"], 2),
        "ratio_to_best_static": None if ratio is None else round(ratio, 3),
        "swap_from": adaptive_size,
        "swap_to": target,
        "swap_seconds": round(t_swap1 - t_swap0, 3),
        "swap_failed_requests": whole["failed"],
        "swap_p99_ms": round(during["p99_ms"], 2),
        "steady_p99_ms": round(steady["p99_ms"], 2),
        "swap_p99_over_steady": round(during["p99_ms"] / steady["p99_ms"], 3) if steady["p99_ms"] else None,
        "policy": args.policy,
        "controller_last_reason": ctl.get("reason"),
    }
    report.emit(args.json)
    return 0
