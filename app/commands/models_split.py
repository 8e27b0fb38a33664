"""``edgebatch models split NAME[@alias|/version] --stages K``: register a model's split form.

The stages are consecutive groups of layers, one ONNX file each, stored beside the whole
model in the same registry version (``model_registry.split``), so a replica whose memory
budget cannot hold the whole model runs it stage by stage (``edgebatch bench loading``).
"""

from __future__ import annotations

import argparse
import json
import sys

from app.errors import BadRequest


def _cmd_split(args: argparse.Namespace) -> int:
    from app.commands.models import _repo, _size, _table
    from model_registry.repository import parse_model_ref
    from model_registry.split import register_split, split_summary

    if args.stages < 2:
        raise BadRequest(f"--stages {args.stages}: a split needs at least 2 stages (1 stage is the whole model)")
    if args.batch_size < 1:
        raise BadRequest(f"--batch-size must be >= 1, got {args.batch_size}")
    name, version, alias = parse_model_ref(args.ref)
    repo = _repo(args)
    repo.check_available()
    print(f"splitting {args.ref} (batch {args.batch_size}) into {args.stages} stages...", file=sys.stderr)
    info = register_split(repo, name, args.stages, version=version, alias=alias, batch_size=args.batch_size)
    rows = split_summary(info)
    if args.json:
        print(json.dumps({"name": info.name, "version": info.version, "batch_size": info.batch_size,
                          "stages": info.stages, "records": list(info.records)}))
        return 0
    print(f"{info.name} version {info.version}: batch {info.batch_size} split into {info.stages} stages "
          "(stored beside the whole model)")
    print(_table(["STAGE", "FILE SIZE", "WEIGHTS", "INPUT", "OUTPUT", "SHA256"], [
        [r["stage"], _size(r["size_bytes"]), _size(r["initializer_bytes"]), ",".join(r["inputs"]),
         ",".join(r["outputs"]), r["sha256"]] for r in rows]))
    return 0


def add_models_split(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``models split`` to the ``models`` group."""
    split = sub.add_parser(
        "split", parents=[common], help="cut a version into K stages (separate ONNX files) and register them",
        description="Cuts the version's ONNX variant for --batch-size into K consecutive stages where a single "
                    "tensor flows between layers, balancing weight bytes, and stores them beside the whole model.")
    split.add_argument("ref", metavar="NAME[@alias|/version]", help="default: the latest version")
    split.add_argument("--stages", type=int, required=True, metavar="K", help="number of stages (>= 2)")
    split.add_argument("--batch-size", type=int, default=1, help="which fixed-batch variant to split (default 1)")
    split.add_argument("--json", action="store_true", help="print JSON")
    split.set_defaults(func=_cmd_split)
