"""`edgebatch bench engine` and `edgebatch bench http`: bare pipeline vs the HTTP path."""

from __future__ import annotations

import argparse

from app.bench.report import BenchReport, percentiles
from app.commands.bench import common, parse_sizes
from app.config import DetectorConfig
from app.errors import ConfigError, Unavailable
from app.readiness import require_ready

ENGINE_COLUMNS = [("batch_size", "batch"), ("images_per_s", "images/s"), ("p50_ms", "batch p50 ms"), ("p99_ms", "batch p99 ms"),
                  ("images", "images")]
HTTP_COLUMNS = [
    ("batch_size", "batch"), ("clients", "clients"), ("images_per_s", "http images/s"), ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"), ("failed", "failed"), ("bare_images_per_s", "bare images/s"), ("ratio", "http/bare"),
    ("ratio_to_peer", "vs peer"),
]


def add_serving_benches(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("engine", help="images/s and latency per batch size for the replica's batch handler in one process")
    p.add_argument("--model", default="demo-detector")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--batches", type=int, default=30, help="measured batches per size (after 3 warm-up batches)")
    common(p)
    p.set_defaults(func=cmd_engine)

    p = bsub.add_parser("http", help="images/s and latency through HTTP with N concurrent clients in a separate process")
    p.add_argument("--model", default="demo-detector")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per batch size")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--url", default=None,
                   help="base URL of the running app (default: the address `edgebatch up` recorded for this instance)")
    p.add_argument("--protocol", choices=["v1", "v2"], default="v1", help="v1: JPEG to /v1/detect; v2: tensors to /v2 infer")
    p.add_argument("--external", action="store_true", help="target is not edgebatch (e.g. Triton): do not set batch sizes")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-pipeline reference run")
    p.add_argument("--peer-url", default=None,
                   help="also load a peer server answering the same v2 request (e.g. Triton from scripts/triton_peer.py) "
                        "in the same run, after each edgebatch size; needs --protocol v2")
    p.add_argument("--batches", type=int, default=30, help="bare-pipeline batches per size")
    common(p)
    p.set_defaults(func=cmd_http)


def _local_detector(model: str, max_size: int):
    from app.state import StateDir
    from model_registry.demo import DEMO_MODEL, ensure_demo_model
    from model_registry.repository import ModelRepository
    from model_registry.source import local_detector

    if model == DEMO_MODEL:
        ensure_demo_model(ModelRepository.from_env(StateDir.default().ensure()))
    config = DetectorConfig(model=model, max_batch_size=max_size, batch_sizes=[1, 2, 4, 8, 16] if max_size <= 16 else [max_size])
    detector, resolved, _ = local_detector(config)
    return detector, resolved


def engine_rows(model: str, sizes: list[int], batches: int) -> tuple[list[dict], object]:
    from app.bench.engine import run_pipeline
    from app.bench.images import sample_jpegs

    detector, resolved = _local_detector(model, max(sizes))
    jpegs = sample_jpegs()
    rows = []
    for n in sizes:
        run = run_pipeline(detector, jpegs, n, batches=batches)
        rows.append({"batch_size": n, "images_per_s": run.images_per_s, "images": run.images, **percentiles(run.batch_latencies_s)})
        detector.pool.retire([])  # one resident variant at a time: measure each alone
    return rows, resolved


def cmd_engine(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.batch_sizes)
    rows, resolved = engine_rows(args.model, sizes, args.batches)
    best = max(rows, key=lambda r: r["images_per_s"])
    report = BenchReport("engine", ENGINE_COLUMNS, rows)
    report.notes.append(f"model {resolved.name} v{resolved.version}, input {resolved.input_size}, 1280x720 JPEG frames, "
                        "Detector.handle_batch (the replica's batch handler: decode+letterbox, engine, NMS), one batch after another")
    report.summary = {"best_batch_size": best["batch_size"], "best_images_per_s": round(best["images_per_s"], 2)}
    report.emit(args.json)
    return 0


def _load_or_fail(url: str, bodies: list, args: argparse.Namespace):
    """One closed-loop run; a run in which nothing succeeded is an error, not a row of zeros."""
    from app.bench.http_client import run_load

    res = run_load(url, bodies, clients=args.clients, duration_s=args.duration, warmup_s=args.warmup)
    if res.ok == 0:
        top = max(res.errors.items(), key=lambda kv: kv[1])[0] if res.errors else "no answer"
        raise Unavailable(f"none of {res.failed} requests to {url} succeeded ({top}); check the server and --url")
    return res


def cmd_http(args: argparse.Namespace) -> int:
    from app.bench.http_client import v2_body
    from app.bench.images import sample_jpegs

    sizes = parse_sizes(args.batch_sizes)
    if args.peer_url and args.protocol != "v2":  # before any load: a wrong flag costs nothing
        raise ConfigError("--peer-url compares v2 tensor requests: add --protocol v2")
    from app.instance import recorded_http_url

    base = (args.url or recorded_http_url()).rstrip("/")
    require_ready(base)
    if args.peer_url:
        require_ready(args.peer_url.rstrip("/"))
    jpegs = sample_jpegs()
    if args.protocol == "v1":
        url = f"{base}/v1/detect"
        bodies = [(j, {"Content-Type": "image/jpeg"}) for j in jpegs]
    else:
        from app.pipeline import prepare

        url = f"{base}/v2/models/{args.model}/infer"
        bodies = [v2_body(prepare(j, (320, 320)).tensor[None]) for j in jpegs[:4]]

    handle = None
    if not args.external:
        from deployments import cluster

        if not cluster.ray_running():
            raise Unavailable("no edgebatch instance is running here; start it with `edgebatch up` "
                              "(or pass --external --url for another server)")
        from ray import serve

        from app.constants import DETECTOR_APP, DETECTOR_DEPLOYMENT

        handle = serve.get_deployment_handle(DETECTOR_DEPLOYMENT, app_name=DETECTOR_APP)

    bare: dict[int, float] = {}
    if not args.no_bare:
        bare_rows, _ = engine_rows(args.model, sizes, args.batches)
        bare = {r["batch_size"]: r["images_per_s"] for r in bare_rows}

    peer_url = f"{args.peer_url.rstrip('/')}/v2/models/{args.model}/infer" if args.peer_url else None
    rows = []
    for n in sizes if not args.external else sizes[:1]:
        if handle is not None:
            handle.set_batch_size.remote(n).result(timeout_s=120)
        res = _load_or_fail(url, bodies, args)
        row = {"batch_size": n if handle is not None else None, "clients": args.clients, "images_per_s": res.rps,
               "failed": res.failed, "ok": res.ok, **percentiles(res.latencies_s)}
        if n in bare and handle is not None:
            row["bare_images_per_s"] = bare[n]
            row["ratio"] = res.rps / bare[n] if bare[n] else None
        if res.errors:
            row["errors"] = res.errors
        rows.append(row)
        if peer_url:
            peer = _load_or_fail(peer_url, bodies, args)
            rows.append({"batch_size": "peer", "clients": args.clients, "images_per_s": peer.rps, "failed": peer.failed,
                         "ok": peer.ok, "peer_url": args.peer_url, **percentiles(peer.latencies_s),
                         **({"errors": peer.errors} if peer.errors else {})})
            row["peer_images_per_s"] = peer.rps
            row["ratio_to_peer"] = res.rps / peer.rps if peer.rps else None
    report = BenchReport("http", HTTP_COLUMNS, rows)
    report.notes.append(f"{args.protocol} protocol, {args.clients} closed-loop clients in a separate process, "
                        f"{args.duration:.0f} s per size after {args.warmup:.0f} s warm-up; bare = same pipeline in one process, same run")
    own = [r for r in rows if r["batch_size"] != "peer"]
    best = max(own, key=lambda r: r["images_per_s"])
    report.summary = {"best_batch_size": best["batch_size"], "best_images_per_s": round(best["images_per_s"], 2)}
    if best.get("ratio") is not None:
        report.summary["ratio_at_best"] = round(best["ratio"], 3)
    if best.get("ratio_to_peer") is not None:
        report.summary["peer_images_per_s"] = round(best["peer_images_per_s"], 2)
        report.summary["ratio_to_peer_at_best"] = round(best["ratio_to_peer"], 3)
        report.notes.append(f"peer = {args.peer_url}, loaded right after each edgebatch size with the same bodies and clients")
    report.emit(args.json)
    return 0
