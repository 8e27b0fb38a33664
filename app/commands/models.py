"""``edgebatch models build|list|show|promote`` and ``edgebatch bench registry``.

The model repository is MLflow's registry (``model_registry``), imported inside
handlers so ``edgebatch --help`` stays fast and the CLI works without MLflow
for other groups.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from app.errors import BadRequest
from app.state import StateDir

_BUILD_EPILOG = """\
backends:
  onnx      re-batch SOURCE.onnx (dynamic or fixed batch axis) into one fixed-batch
            file per --batch-sizes entry, each checked with ONNX Runtime.
  tensorrt  one TensorRT plan per batch size from SOURCE.onnx (needs TensorRT and a GPU
            here); each plan is tagged with the GPU and TensorRT version it is valid for.
  tflite    register already-converted .tflite files, one per batch size.
  edgetpu   register already-compiled *_edgetpu.tflite files (edgetpu_compiler output).
  torch     one torch.export program (.pt2) per batch size, run by PyTorch (CUDA when the node
            has it, else the CPU); SOURCE is a program saved with torch.export.save, or none
            for the demo detector (app/demo/network.py with the committed ONNX weights).
            Needs torch: pip install 'edgebatch[torch]'.

  tflite/edgetpu files are given as --variant BATCH=FILE (repeatable), or as a folder
  in SOURCE whose files are named *_b<N>.tflite / *_b<N>_edgetpu.tflite:
    edgebatch models build --name det --backend edgetpu \\
        --variant 1=det_b1_edgetpu.tflite --variant 8=det_b8_edgetpu.tflite
    edgebatch models build compiled/ --name det --backend edgetpu

examples:
  edgebatch models build yolov8n.onnx --name yolov8n --batch-sizes 1,2,4,8,16
  edgebatch models build --name demo-detector --backend tensorrt --alias gpu   # on a GPU node: plans of the demo
  edgebatch models build --name second-detector --alias production            # the demo export as a second model
  edgebatch models promote yolov8n 3 --alias production
  edgebatch models build --backend torch --name demo-torch --batch-sizes 1,2,4,8 --alias production

The registry is SQLite in the state folder unless MLFLOW_TRACKING_URI points at
an `mlflow server`. The new version number is the last line printed.
"""


def _repo(args: argparse.Namespace):
    from model_registry.repository import ModelRepository

    return ModelRepository(getattr(args, "tracking_uri", None) or None, state=StateDir.default())


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def _variant_json(v) -> dict:
    return {"backend": v.backend, "batch_size": v.batch_size, "input_shape": list(v.input_shape),
            "precision": v.precision, "size_bytes": v.size_bytes, "sha256": v.sha256, "tags": v.tags}


# ---------------------------------------------------------------- handlers
def _previous_labels(repo, name: str) -> list[str] | None:
    """The labels of the newest version of ``name`` (None when it has none, or no version yet)."""
    from app.errors import NotFound

    try:
        found = repo.list_variants(name)
    except NotFound:
        return None
    tagged = [v.tags["labels"] for v in found if v.tags.get("labels")]
    return list(json.loads(tagged[0])) if tagged else None


def _labels_for(args: argparse.Namespace, repo, source: Path | None) -> tuple[list[str] | None, str]:
    """Labels for the new version and where they came from: --labels, the export's `names`, the previous version."""
    from model_registry.builders import export_metadata, read_labels

    if args.labels:
        return read_labels(Path(args.labels)), f"from {args.labels}"
    if args.backend == "torch" and source is None:
        from model_registry.torch_build import DEMO_ASSETS

        return read_labels(DEMO_ASSETS / "detector.json"), "from the demo detector (detector.json)"
    if source is not None and source.is_file() and source.suffix == ".onnx":
        names = export_metadata(source).names
        if names:
            return names, f"from {source.name}'s metadata (names)"
    previous = _previous_labels(repo, args.name)
    if previous:
        return previous, f"kept from the previous version of {args.name}"
    return None, "none (pass --labels FILE)"


def _cmd_build(args: argparse.Namespace) -> int:
    from model_registry.builders import build_variants, parse_batch_sizes, parse_imgsz, parse_variant_args, scan_variant_folder, with_labels
    from model_registry.repository import validate_name

    validate_name(args.name)
    if args.backend == "torch":  # the optional extra: one line with the fix before MLflow opens
        from app.engines.torchrt import import_torch

        import_torch()
    repo = _repo(args)
    repo.check_available()  # fail before a long build, not after it
    source = Path(args.source) if args.source else None
    demo_labels = None
    if source is None and args.backend in ("onnx", "tensorrt"):
        from model_registry.demo import demo_export

        source, demo_labels = demo_export()
        print(f"no SOURCE: building the demo detector's export {source}", file=sys.stderr)
    files = None
    if args.backend in ("tflite", "edgetpu"):
        files = parse_variant_args(args.variant or [])
        if source is not None:
            files = {**scan_variant_folder(source, args.backend), **files}
        if not files:
            raise BadRequest(f"--backend {args.backend} needs --variant BATCH=FILE or a folder SOURCE; "
                             "see `edgebatch models build --help`")
    elif args.variant:
        raise BadRequest(f"--variant is for tflite/edgetpu files; --backend {args.backend} builds from SOURCE.onnx")
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    imgsz = parse_imgsz(args.imgsz, "--imgsz") if args.imgsz else None
    labels, labels_from = _labels_for(args, repo, source)
    if labels is None and demo_labels:
        labels, labels_from = demo_labels, "the demo detector's"
    with tempfile.TemporaryDirectory(prefix="edgebatch-build-") as tmp:
        print(f"building {args.backend} variants of {args.name}...", file=sys.stderr)
        variants = build_variants(args.backend, batch_sizes, Path(tmp), source=source, files=files, fp16=args.fp16,
                                  imgsz=imgsz)
        variants = [with_labels(v, labels) for v in variants]
        version = repo.register_version(args.name, variants, description=args.description or "",
                                        progress=not args.no_progress)
    if args.alias:
        repo.set_alias(args.name, args.alias, version)
    for v in variants:
        print(f"  {v.backend} batch {v.batch_size}: {tuple(v.input_shape)} {v.precision} "
              f"{_size(v.size_bytes)} sha256 {v.sha256[:16]}", file=sys.stderr)
    print(f"  labels: {len(labels or [])} {labels_from}", file=sys.stderr)
    print(f"registered {args.name} version {version}" + (f" (@{args.alias})" if args.alias else ""),
          file=sys.stderr)
    print(version)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    repo = _repo(args)
    if args.name:
        return _cmd_show(argparse.Namespace(**{**vars(args), "ref": args.name, "variants": False}))
    models = repo.list_models()
    if args.json:
        print(json.dumps([m.__dict__ for m in models]))
        return 0
    if not models:
        print("no models registered; add one with `edgebatch models build SOURCE.onnx --name NAME`")
        return 0
    print(_table(["NAME", "VERSIONS", "LATEST", "ALIASES"], [
        [m.name, m.version_count, m.latest_version or "-",
         ", ".join(f"{a}->{v}" for a, v in sorted(m.aliases.items())) or "-"] for m in models]))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    repo = _repo(args)
    described = repo.describe(args.ref)
    if args.json:
        print(json.dumps({
            "name": described.name, "description": described.description, "aliases": described.aliases,
            "versions": [{"version": v.version, "created": v.created, "aliases": list(v.aliases),
                          "description": v.description, "in_use": v.in_use, "tags": v.tags,
                          "source": v.source, "variants": [_variant_json(x) for x in v.variants]}
                         for v in described.versions],
        }))
        return 0
    aliases = ", ".join(f"{a}->{v}" for a, v in sorted(described.aliases.items())) or "none"
    print(f"{described.name}  aliases: {aliases}")
    single = "/" in args.ref or "@" in args.ref or getattr(args, "variants", True)
    for v in described.versions:
        in_use = ", ".join(sorted(v.in_use)) or "-"
        print(f"\nversion {v.version}  created {v.created}  aliases: {', '.join(v.aliases) or '-'}  "
              f"in use by: {in_use}")
        if v.description:
            print(f"  {v.description}")
        rows = [[x.backend, x.batch_size, "x".join(map(str, x.input_shape)) or "?", x.precision,
                 _size(x.size_bytes), x.sha256 if single else x.sha256[:12]] for x in v.variants]
        print(_table(["BACKEND", "BATCH", "INPUT", "PRECISION", "SIZE", "SHA256"], rows))
        extra = {k: x.tags[k] for x in v.variants for k in ("gpu_name", "tensorrt_version") if k in x.tags}
        if extra:
            print("  valid for: " + ", ".join(f"{k}={val}" for k, val in extra.items()))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    repo = _repo(args)
    repo.set_alias(args.name, args.alias, args.version)
    print(f"{args.name}@{args.alias} -> version {repo.resolve(args.name, alias=args.alias)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models build|list|show|promote``."""
    models = subparsers.add_parser("models", help="versioned models in the MLflow model repository")
    sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    sub.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI, else SQLite "
                                               "in the state folder)")

    build = sub.add_parser("build", parents=[common], help="build fixed-batch variants and register a version",
                           epilog=_BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("source", nargs="?", metavar="SOURCE",
                       help="ONNX export (onnx, tensorrt; default the demo detector's export), a folder of "
                            ".tflite files (tflite, edgetpu), a torch.export .pt2 file or nothing for the demo "
                            "network (torch)")
    build.add_argument("--name", required=True, help="model name: letters, digits, '.', '_', '-'")
    build.add_argument("--batch-sizes", default="1,2,4,8,16", help="comma-separated (default 1,2,4,8,16)")
    build.add_argument("--backend", default="onnx", choices=["onnx", "tensorrt", "tflite", "edgetpu", "torch"])
    build.add_argument("--variant", action="append", metavar="BATCH=FILE",
                       help="a precompiled tflite/edgetpu file for one batch size (repeatable)")
    build.add_argument("--fp16", action="store_true", help="TensorRT: build FP16 plans")
    build.add_argument("--labels", metavar="FILE", help="class labels recorded on each variant: JSON list, "
                                                         "JSON object with 'labels' (detector.json) or one per line; "
                                                         "default: the export's own `names`, else the previous version's")
    build.add_argument("--imgsz", metavar="H[,W]", help="image size to build at, e.g. 640 or 480,640: needed when the "
                                                       "export's height and width are dynamic and its metadata names "
                                                       "no imgsz; overrides the metadata's")
    build.add_argument("--alias", help="also point this alias (e.g. production) at the new version")
    build.add_argument("--description", default="", help="text stored on the version")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_build)

    listing = sub.add_parser("list", parents=[common], help="models, or the versions of one model")
    listing.add_argument("name", nargs="?", metavar="NAME")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_cmd_list)

    show = sub.add_parser("show", parents=[common], help="versions, aliases, variants and deployments of a model")
    show.add_argument("ref", metavar="NAME[@alias|/version]")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=_cmd_show, variants=True)

    promote = sub.add_parser("promote", parents=[common], help="point an alias at a version")
    promote.add_argument("name", metavar="NAME")
    promote.add_argument("version", metavar="VERSION")
    promote.add_argument("--alias", default="production", help="alias to set (default production)")
    promote.set_defaults(func=_cmd_promote)

    from app.commands.models_split import add_models_split  # `models split` (issue 7)
    add_models_split(sub, common)


# ---------------------------------------------------------------- bench registry
def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def bench_registry(source: Path | None, *, tracking_uri: str | None, batch_sizes: list[int],
                   repeats: int) -> dict:
    """Time register (all variants), cold find (download + verify) and warm find (cache hit)."""
    import uuid

    from model_registry.builders import build_onnx_variants
    from model_registry.demo import write_synthetic_detector
    from model_registry.repository import ModelRepository

    with tempfile.TemporaryDirectory(prefix="edgebatch-bench-") as tmp:
        root = Path(tmp)
        state = StateDir(root / "state").ensure()
        note = "demo detector"
        if source is None:
            demo = Path(__file__).resolve().parents[1] / "demo" / "assets" / "detector.onnx"
            if demo.is_file():
                source = demo
            else:
                note = "synthetic detector (app/demo/assets/detector.onnx not found)"
                source = write_synthetic_detector(root / "synthetic.onnx", width=64)
        else:
            note = str(source)
        repo = ModelRepository(tracking_uri, state=state, cache_dir=root / "cache")
        t = time.perf_counter()
        repo.check_available()
        open_s = time.perf_counter() - t
        t = time.perf_counter()
        variants = build_onnx_variants(Path(source), batch_sizes, root / "variants")
        build_s = time.perf_counter() - t
        name = f"bench-{uuid.uuid4().hex[:8]}"
        t = time.perf_counter()
        version = repo.register_version(name, variants)
        register_s = time.perf_counter() - t
        repo.set_alias(name, "production", version)
        rows = []
        for v in variants:
            t = time.perf_counter()
            repo.find(name, alias="production", batch_size=v.batch_size)
            cold = time.perf_counter() - t
            warm_alias, warm_version = [], []
            for _ in range(repeats):
                t = time.perf_counter()
                repo.find(name, alias="production", batch_size=v.batch_size)
                warm_alias.append(time.perf_counter() - t)
                t = time.perf_counter()
                repo.find(name, version=version, batch_size=v.batch_size)
                warm_version.append(time.perf_counter() - t)
            rows.append({"batch_size": v.batch_size, "size_bytes": v.size_bytes, "cold_find_ms": _ms(cold),
                         "warm_find_alias_ms": _ms(statistics.median(warm_alias)),
                         "warm_find_version_ms": _ms(statistics.median(warm_version))})
        t = time.perf_counter()
        for _ in range(repeats):
            repo.resolve(name, alias="production")
        resolve_ms = _ms((time.perf_counter() - t) / repeats)
        if tracking_uri is not None:  # leave a shared server as it was
            repo.client.delete_registered_model(name)
    return {"bench": "registry", "registry": "sqlite (state folder)" if tracking_uri is None else tracking_uri,
            "source": note, "variants": len(variants), "open_registry_ms": _ms(open_s),
            "build_variants_ms": _ms(build_s), "register_ms": _ms(register_s),
            "resolve_alias_ms": resolve_ms, "repeats": repeats, "per_variant": rows}


def _cmd_bench_registry(args: argparse.Namespace) -> int:
    from model_registry.builders import parse_batch_sizes

    result = bench_registry(Path(args.source) if args.source else None, tracking_uri=args.tracking_uri,
                            batch_sizes=parse_batch_sizes(args.batch_sizes), repeats=args.repeats)
    print(f"registry: {result['registry']}   source: {result['source']}")
    print(f"open registry {result['open_registry_ms']} ms, build {result['variants']} variants "
          f"{result['build_variants_ms']} ms, register {result['register_ms']} ms, "
          f"resolve alias {result['resolve_alias_ms']} ms")
    print(_table(["BATCH", "SIZE", "COLD FIND ms", "WARM FIND @alias ms", "WARM FIND /version ms"], [
        [r["batch_size"], _size(r["size_bytes"]), r["cold_find_ms"], r["warm_find_alias_ms"],
         r["warm_find_version_ms"]] for r in result["per_variant"]]))
    if args.json:
        print(json.dumps(result))
    return 0


def add_bench_registry(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench registry`` to the shared ``bench`` group (wired by the lead)."""
    bench = bench_subparsers.add_parser(
        "registry", help="time register, cold find (download + verify) and warm find (cache hit)",
        description="Registers the variants in a throw-away registry (temporary SQLite unless "
                    "--tracking-uri) and times the repository's operations.")
    bench.add_argument("--source", help="ONNX export (default: the demo detector)")
    bench.add_argument("--batch-sizes", default="1,2,4,8,16")
    bench.add_argument("--repeats", type=int, default=20, help="warm finds per variant (median reported)")
    bench.add_argument("--tracking-uri", help="bench against this MLflow server instead of a temporary SQLite")
    bench.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    bench.set_defaults(func=_cmd_bench_registry)
