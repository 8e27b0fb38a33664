"""`edgebatch bench ...`: product benchmarks. Each prints a table and, with --json, one JSON object last."""

from __future__ import annotations

import argparse
import importlib

from app.errors import ConfigError


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated integers like 1,2,4,8,16, got {text!r}") from None
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


def common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


# bench sub-commands contributed by other modules: (module, function) pairs called with the bench subparsers
EXTENSIONS = (
    ("app.commands.bench_serving", "add_serving_benches"),
    ("app.commands.models", "add_bench_registry"),
    ("app.commands.bench_adapt", "add_bench_adapt"),
    ("app.commands.bench_pipeline", "add_bench_pipeline"),
    ("app.commands.bench_streams", "add_bench_streams"),
    ("app.commands.bench_sweep", "add_bench_sweep"),
    ("app.commands.bench_loading", "add_bench_loading"),
    ("app.commands.bench_overload", "add_bench_overload"),
    ("app.commands.bench_failover", "add_bench_failover"),
)


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: engine, http, registry, adapt, pipeline, streams, sweep, loading, overload, failover")
    bsub = bench.add_subparsers(dest="bench", metavar="BENCH")
    bsub.required = True
    for module_name, fn in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                continue
            raise
        getattr(module, fn)(bsub)
