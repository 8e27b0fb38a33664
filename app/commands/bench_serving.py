"""`edgebatch bench engine` and `edgebatch bench http`: bare pipeline vs the HTTP path."""

from __future__ import annotations

import argparse
import statistics

from app.bench.report import BenchReport, percentiles
from app.commands.bench import common, parse_sizes
from app.config import DetectorConfig
from app.errors import ConfigError, Unavailable
from app.readiness import require_ready

ENGINE_COLUMNS = [("batch_size", "batch"), ("images_per_s", "images/s"), ("p50_ms", "batch p50 ms"), ("p99_ms", "batch p99 ms"),
                  ("images", "images")]
HTTP_COLUMNS = [
    ("round", "round"), ("server", "server"), ("batch_size", "batch"), ("clients", "clients"), ("images_per_s", "images/s"),
    ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("failed", "failed"), ("bound_images_per_s", "bound images/s"),
    ("ratio", "http/bound"), ("ratio_to_peer", "vs peer"), ("p99_to_peer", "p99 vs peer"),
]
#: the replica's settings, which the pipelined bound reproduces: its engine instances (ORT on all cores
#: but one, shared among them) and ``engine_instances + 1`` batches in flight, so the next batch
#: decodes while the engines run
PIPELINED_SPARE_CORES = 1


def shipped_engine_instances() -> int:
    """The Detector's ``engine_instances`` in the shipped Serve config (what `edgebatch up` deploys)."""
    from deployments.config_file import DEFAULT_CONFIG, read_serve_config

    for app in read_serve_config(DEFAULT_CONFIG).get("applications", []):
        for dep in app.get("deployments", []):
            if dep.get("name") == "Detector":
                return int((dep.get("user_config") or {}).get("engine_instances", DetectorConfig().engine_instances))
    return DetectorConfig().engine_instances


def add_serving_benches(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("engine", help="images/s and latency per batch size for the replica's batch handler in one process")
    p.add_argument("--model", default="demo-detector")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--batches", type=int, default=30, help="measured batches per size (after 3 warm-up batches)")
    p.add_argument("--pipelined", action="store_true",
                   help="overlap the stages as the replica does (engine_instances + 1 batches in flight, ORT on all "
                        "cores but one): the best this machine does without a serving layer, the bound `bench http` "
                        "compares with")
    p.add_argument("--engine-instances", type=int, default=None,
                   help="engine instances for --pipelined (default: the shipped Serve config's)")
    common(p)
    p.set_defaults(func=cmd_engine)

    p = bsub.add_parser("http", help="images/s and latency through HTTP with N concurrent clients in a separate process")
    p.add_argument("--model", default="demo-detector")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--clients", default="8", help="closed-loop clients; a list (8,32) runs each in turn")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per batch size")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--url", default=None,
                   help="base URL of the running app (default: the address `edgebatch up` recorded for this instance)")
    p.add_argument("--protocol", choices=["v1", "v2"], default="v1", help="v1: JPEG to /v1/detect; v2: tensors to /v2 infer")
    p.add_argument("--external", action="store_true", help="target is not edgebatch (e.g. Triton): do not set batch sizes")
    p.add_argument("--no-bare", action="store_true", help="skip the pipelined bare reference run (the bound)")
    p.add_argument("--peer-url", default=None,
                   help="also load a peer server doing the same job (Triton from scripts/triton_peer.py) in the same run, "
                        "right after edgebatch at each size and client count, with the same images and client: v1 sends "
                        "each JPEG as a v2 BYTES input to the peer's full-job model <model>-jpeg (decode, engine, NMS); "
                        "v2 sends the same tensors to <model>")
    p.add_argument("--peer-model", default=None, help="the peer's model name (default: see --peer-url)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the whole alternation (bound, edgebatch, peer) this many times; the summary takes "
                        "medians over rounds, so a machine whose load drifts hits both servers alike")
    p.add_argument("--batches", type=int, default=30, help="bound (pipelined bare) batches per size")
    common(p)
    p.set_defaults(func=cmd_http)


def _local_detector(model: str, max_size: int, spare_cores: int = 0, engine_instances: int = 1):
    from app.state import StateDir
    from model_registry.demo import DEMO_MODEL, ensure_demo_model
    from model_registry.repository import ModelRepository
    from model_registry.source import local_detector

    if model == DEMO_MODEL:
        ensure_demo_model(ModelRepository.from_env(StateDir.default().ensure()))
    config = DetectorConfig(model=model, max_batch_size=max_size, batch_sizes=[1, 2, 4, 8, 16] if max_size <= 16 else [max_size],
                            engine_instances=engine_instances)
    detector, resolved, _ = local_detector(config, spare_cores=spare_cores)
    return detector, resolved


def engine_rows(model: str, sizes: list[int], batches: int, pipelined: bool = False,
                engine_instances: int = 1) -> tuple[list[dict], object]:
    """Per size: ``handle_batch`` one batch after another, or (``pipelined``) as the replica runs it, with
    ``engine_instances`` engines."""
    from app.bench.engine import run_pipeline
    from app.bench.images import sample_jpegs

    spare = PIPELINED_SPARE_CORES if pipelined else 0
    detector, resolved = _local_detector(model, max(sizes), spare, engine_instances if pipelined else 1)
    concurrency = detector.pool.instances + 1 if pipelined else 1
    jpegs = sample_jpegs()
    rows = []
    try:
        for n in sizes:
            run = run_pipeline(detector, jpegs, n, batches=batches, concurrency=concurrency)
            rows.append({"batch_size": n, "images_per_s": run.images_per_s, "images": run.images,
                         "concurrency": concurrency, **percentiles(run.batch_latencies_s)})
            detector.pool.retire([])  # one resident variant at a time: measure each alone
    finally:
        detector.close()
    return rows, resolved


def cmd_engine(args: argparse.Namespace) -> int:
    sizes = parse_sizes(args.batch_sizes)
    instances = args.engine_instances or shipped_engine_instances()
    if not 1 <= instances <= 16:
        raise ConfigError(f"--engine-instances must be between 1 and 16, got {instances}")
    rows, resolved = engine_rows(args.model, sizes, args.batches, args.pipelined, instances)
    best = max(rows, key=lambda r: r["images_per_s"])
    report = BenchReport("engine", ENGINE_COLUMNS, rows)
    how = (f"pipelined: {instances} engine instance(s), {rows[0]['concurrency']} batches in flight, ORT on all cores "
           f"but {PIPELINED_SPARE_CORES} shared among them (the replica's settings)" if args.pipelined
           else "one batch after another, ORT on all cores")
    report.notes.append(f"model {resolved.name} v{resolved.version}, input {resolved.input_size}, 1280x720 JPEG frames, "
                        f"Detector.handle_batch (the replica's batch handler: decode+letterbox, engine, NMS), {how}")
    report.summary = {"best_batch_size": best["batch_size"], "best_images_per_s": round(best["images_per_s"], 2),
                      "pipelined": args.pipelined}
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


def _clients(text: str) -> list[int]:
    try:
        counts = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--clients must be positive integers like 8 or 8,32, got {text!r}")
    return counts


def _row(server: str, size: int | None, clients: int, res) -> dict:
    return {"server": server, "batch_size": size, "clients": clients, "images_per_s": res.rps, "failed": res.failed,
            "ok": res.ok, **percentiles(res.latencies_s), **({"errors": res.errors} if res.errors else {})}


def _best_per_round(rows: list[dict]) -> list[dict]:
    by_round: dict[int, dict] = {}
    for r in rows:
        if r["round"] not in by_round or r["images_per_s"] > by_round[r["round"]]["images_per_s"]:
            by_round[r["round"]] = r
    return list(by_round.values())


def _median_best(rows: list[dict]) -> tuple[float, float]:
    """(images/s, p99 ms) of the best size in each round, medians over the rounds."""
    best = _best_per_round(rows)
    return statistics.median(r["images_per_s"] for r in best), statistics.median(r["p99_ms"] for r in best)


def cmd_http(args: argparse.Namespace) -> int:
    from app.bench.http_client import v2_body, v2_bytes_body
    from app.bench.images import sample_jpegs

    sizes = parse_sizes(args.batch_sizes)
    client_counts = _clients(args.clients)
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be 1 or more, got {args.rounds}")
    from app.instance import recorded_http_url

    base = (args.url or recorded_http_url()).rstrip("/")
    require_ready(base)
    if args.peer_url:
        require_ready(args.peer_url.rstrip("/"))
    jpegs = sample_jpegs()
    peer_bodies: list = []
    if args.protocol == "v1":
        url = f"{base}/v1/detect"
        bodies = [(j, {"Content-Type": "image/jpeg"}) for j in jpegs]
        peer_model = args.peer_model or f"{args.model}-jpeg"
        peer_bodies = [v2_bytes_body(j) for j in jpegs]  # the same JPEGs, as a v2 BYTES input
    else:
        from app.pipeline import prepare

        url = f"{base}/v2/models/{args.model}/infer"
        bodies = [v2_body(prepare(j, (320, 320)).tensor[None]) for j in jpegs[:4]]
        peer_model = args.peer_model or args.model
        peer_bodies = bodies

    handle = None
    if not args.external:
        from deployments import cluster

        if not cluster.ray_running():
            raise Unavailable("no edgebatch instance is running here; start it with `edgebatch up` "
                              "(or pass --external --url for another server)")
        from ray import serve

        from app.constants import DETECTOR_APP, DETECTOR_DEPLOYMENT

        handle = serve.get_deployment_handle(DETECTOR_DEPLOYMENT, app_name=DETECTOR_APP)
    # the bound runs with the replica's engine instances (the running one's, else the shipped config's)
    instances = (handle.info.remote().result(timeout_s=60).engine_instances if handle else None) or shipped_engine_instances()

    peer_url = f"{args.peer_url.rstrip('/')}/v2/models/{peer_model}/infer" if args.peer_url else None
    rows = []
    for rnd in range(1, args.rounds + 1):  # rounds alternate the servers again: drift hits both alike
        bound: dict[int, float] = {}
        if not args.no_bare:
            bound_rows, _ = engine_rows(args.model, sizes, args.batches, pipelined=True, engine_instances=instances)
            bound = {r["batch_size"]: r["images_per_s"] for r in bound_rows}
        for n in sizes if not args.external else sizes[:1]:
            if handle is not None:
                handle.set_batch_size.remote(n).result(timeout_s=120)
            for clients in client_counts:
                run = argparse.Namespace(**{**vars(args), "clients": clients})
                res = _load_or_fail(url, bodies, run)
                row = {"round": rnd, **_row("edgebatch" if handle is not None else base,
                                            n if handle is not None else None, clients, res)}
                if n in bound and handle is not None:
                    row["bound_images_per_s"] = bound[n]
                    row["ratio"] = res.rps / bound[n] if bound[n] else None
                rows.append(row)
                if peer_url:
                    peer = _load_or_fail(peer_url, peer_bodies, run)
                    rows.append({"round": rnd, **_row("peer", n if handle is not None else None, clients, peer),
                                 "peer_url": args.peer_url})
                    row["peer_images_per_s"] = peer.rps
                    row["peer_p99_ms"] = rows[-1]["p99_ms"]
                    row["ratio_to_peer"] = res.rps / peer.rps if peer.rps else None
                    row["p99_to_peer"] = row["p99_ms"] / row["peer_p99_ms"] if row["peer_p99_ms"] else None
    report = BenchReport("http", HTTP_COLUMNS, rows)
    job = "JPEG to /v1/detect (the whole job)" if args.protocol == "v1" else "letterboxed FP32 tensors to v2 infer"
    report.notes.append(f"{args.protocol}: {job}; closed-loop clients in a separate process, {args.duration:.0f} s per "
                        f"row after {args.warmup:.0f} s warm-up; bound = the same batch handler in one process with the "
                        "stages overlapped (`bench engine --pipelined`), same run")
    own = [r for r in rows if r["server"] != "peer"]
    best = max(own, key=lambda r: r["images_per_s"])
    report.summary = {"best_batch_size": best["batch_size"], "best_clients": best["clients"],
                      "best_images_per_s": round(best["images_per_s"], 2)}
    if best.get("ratio") is not None:
        report.summary["ratio_to_bound_at_best"] = round(best["ratio"], 3)
    for clients in client_counts:  # the stages-overlapped bound: median over rounds of each round's best size
        ratios = [r["ratio"] for r in _best_per_round([r for r in own if r["clients"] == clients]) if r.get("ratio")]
        if ratios:
            report.summary[f"ratio_to_bound_{clients}_clients"] = round(statistics.median(ratios), 3)
    if peer_url:
        report.summary["peer_model"] = peer_model
        for clients in client_counts:  # per client count: each side's best size per round, median over rounds
            mine = _median_best([r for r in own if r["clients"] == clients])
            theirs = _median_best([r for r in rows if r["server"] == "peer" and r["clients"] == clients])
            report.summary[f"ratio_to_peer_{clients}_clients"] = round(mine[0] / theirs[0], 3) if theirs[0] else None
            report.summary[f"images_per_s_{clients}_clients"] = f"{mine[0]:.1f} vs peer {theirs[0]:.1f}"
            report.summary[f"p99_ms_{clients}_clients"] = f"{mine[1]:.0f} vs peer {theirs[1]:.0f}"
        report.notes.append(f"peer = {peer_url}, loaded right after edgebatch at each size and client count, with the "
                            f"same images and the same client; {args.rounds} round(s), ratios of the medians over rounds")
    report.emit(args.json)
    return 0
