"""`edgebatch bench sweep MODEL`: backend x batch size x concurrency, the multi-tenancy benchmarker.

MODEL is a model file (an ONNX export with a dynamic batch axis runs at every size;
``demo`` is the bundled demo detector) or a registered model name (one variant per
batch size from the registry). The core (app/bench/sweep.py) needs neither Ray nor
MLflow for a file, so the same command runs on a GPU box with only ONNX Runtime.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from app.bench.report import BenchReport
from app.bench.sweep import COLUMNS, MIN_RUNS, EngineFactory, SweepPoint, plot, sweep, write_csv
from app.commands.bench import common, parse_sizes
from app.engines import BACKENDS, Engine
from app.errors import ConfigError

DEMO_FILE = Path(__file__).resolve().parents[1] / "demo" / "assets" / "detector.onnx"


def add_bench_sweep(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("sweep", help="throughput/latency per backend, batch size and concurrency (CME); finds max k")
    p.add_argument("model", metavar="MODEL",
                   help="'demo', a model file (.onnx with a dynamic batch axis, .engine, .tflite) or a registered model")
    p.add_argument("--backends", default="onnx", help=f"comma-separated, from {', '.join(BACKENDS)}")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--max-concurrency", type=int, default=8, help="stop raising k here at the latest")
    p.add_argument("--runs", type=int, default=MIN_RUNS, help=f"measured batches per instance (>= {MIN_RUNS})")
    p.add_argument("--warmup", type=int, default=3, help="warm-up batches per instance")
    p.add_argument("--threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads per instance (default: ORT's own choice)")
    p.add_argument("--drop-tolerance", type=float, default=0.0,
                   help="stop when throughput falls more than this fraction below the best so far (noise margin)")
    p.add_argument("--alias", default="production", help="registry alias for a registered MODEL")
    p.add_argument("--csv", type=Path, default=None, help="also write every point to this CSV file")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of throughput against concurrency")
    common(p)
    p.set_defaults(func=cmd_sweep)


def _backends(text: str) -> list[str]:
    names = [b.strip() for b in text.split(",") if b.strip()]
    bad = [b for b in names if b not in BACKENDS]
    if not names or bad:
        raise ConfigError(f"--backends must be a comma-separated subset of {', '.join(BACKENDS)}, got {text!r}")
    return names


def engine_factory(model: str, threads: int | None, alias: str | None) -> tuple[EngineFactory, str]:
    """(factory, description): a file is loaded as is; a registered name per batch size from the registry."""
    from app.engines import create_engine

    options = {"intra_op_num_threads": threads} if threads else {}
    path = DEMO_FILE if model == "demo" else Path(model)
    if path.is_file():
        def from_file(backend: str, batch_size: int) -> Engine:
            return create_engine(backend, path, options={**options, "batch_size": batch_size})

        return from_file, str(path)
    if any(sep in model for sep in ("/", "\\")) or path.suffix in (".onnx", ".engine", ".plan", ".tflite"):
        raise ConfigError(f"model file {model} not found; pass an existing file, 'demo', or a registered model name")

    from app.state import StateDir
    from model_registry.repository import ModelRepository

    repo = ModelRepository.from_env(StateDir.default().ensure())
    if model == "demo-detector":
        from model_registry.demo import ensure_demo_model

        ensure_demo_model(repo)

    @functools.cache
    def variant_path(backend: str, batch_size: int):
        """One registry lookup (and hash check) per variant, not one per engine instance."""
        return repo.find(model, alias=alias, batch_size=batch_size, backend=backend).path

    def from_registry(backend: str, batch_size: int) -> Engine:
        return create_engine(backend, variant_path(backend, batch_size), options={**options, "batch_size": batch_size})

    return from_registry, f"{model}@{alias} from the registry"


def cmd_sweep(args: argparse.Namespace) -> int:
    if args.runs < MIN_RUNS:
        raise ConfigError(f"--runs must be at least {MIN_RUNS} (warm-up, then >= {MIN_RUNS} measured runs)")
    if args.max_concurrency < 1:
        raise ConfigError("--max-concurrency must be >= 1")
    if not 0.0 <= args.drop_tolerance < 1.0:
        raise ConfigError("--drop-tolerance must be in [0, 1), e.g. 0.05 for 5 %")
    backends = _backends(args.backends)
    sizes = parse_sizes(args.batch_sizes)
    factory, described = engine_factory(args.model, args.threads, args.alias)

    def progress(p: SweepPoint) -> None:
        if not args.json:
            state = f"{p.throughput:.1f} items/s" if p.ok else p.stop
            print(f"  {p.backend} batch {p.batch_size} k={p.concurrency}: {state}", flush=True)

    result = sweep(factory, backends, sizes, max_concurrency=args.max_concurrency, runs=args.runs,
                   warmup=args.warmup, drop_tolerance=args.drop_tolerance, on_point=progress)
    report = BenchReport("sweep", list(COLUMNS), [p.row() for p in result.points])
    best = result.best()
    report.summary = {
        "model": described,
        "best": best.row() if best else None,
        "best_configuration": (f"{best.backend} batch {best.batch_size} concurrency {best.concurrency}: "
                               f"{best.throughput:.1f} items/s, p99 {best.p99_ms:.1f} ms") if best else "none ran",
        "max_concurrency": result.max_concurrency(),
        "best_concurrency": result.best_concurrency(),
    }
    report.notes.append("throughput = k x batch x runs / wall time; k engine instances run at once (CME), "
                        f"each {args.runs} measured batches after {args.warmup} warm-up")
    if args.csv:
        write_csv(result, args.csv)
        report.notes.append(f"CSV: {args.csv}")
    if args.plot:
        plot(result, args.plot, f"bench sweep {Path(described).name}: throughput vs concurrency")
        report.notes.append(f"plot: {args.plot}")
    if result.points and all(p.device_util == "n/a" for p in result.points):
        report.notes.append("device utilisation n/a: NVML does not answer here (no NVIDIA GPU/driver; "
                            "on Jetson read tegrastats instead)")
    if best is None:
        report.notes.append("no configuration ran: see 'stopped because'")
    report.emit(args.json)
    return 0 if best is not None else 2
