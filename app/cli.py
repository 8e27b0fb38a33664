"""The ``edgebatch`` command line.

Each command group lives in ``app/commands/<group>.py`` and exposes
``register(subparsers)``; handlers take the parsed ``argparse.Namespace`` and
return an exit code. An ``EdgebatchError`` becomes one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from app.errors import EdgebatchError

COMMAND_MODULES = (
    "app.commands.serve",
    "app.commands.models",
    "app.commands.bench",
    "app.commands.demo",
    "app.commands.batch",
    "app.commands.streams",
    "app.commands.monitor",
)


def _quiet_env() -> None:
    """Defaults set before Ray is imported (Ray reads them once, at import): this instance's Ray
    token (`ray start` in Ray 2.60 turns token auth on; a driver sends the token only in this mode),
    quieter logs."""
    from app.instance import ray_auth_env
    from app.state import StateDir

    for key, value in ray_auth_env(StateDir.default()).items():
        os.environ.setdefault(key, value)
    for key, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("MLFLOW_DISABLE_TELEMETRY", "true"),
        ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"),
    ):
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgebatch",
        description="Adaptive batched inference on edge clusters, on Ray Serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_env()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgebatchError as exc:
        print(f"edgebatch: error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
