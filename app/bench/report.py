"""What every bench command prints: a table for people, then (with --json) one JSON object last."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def percentiles(values_s: Sequence[float]) -> dict[str, float]:
    """Latency summary in milliseconds."""
    if not values_s:
        return {"p50_ms": float("nan"), "p90_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Fixed-width table; ``columns`` are (key, header)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:
                return "-"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    cells = [[cell(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, (_, h) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for c in cells:
        lines.append("  ".join(v.rjust(w) for v, w in zip(c, widths)))
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import os

    return {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["edgebatch", *sys.argv[1:]]),
    }


@dataclass
class BenchReport:
    """Collects a bench's results; ``emit`` prints the table, notes, and the JSON line."""

    name: str
    columns: list[tuple[str, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def emit(self, as_json: bool) -> None:
        print(f"== edgebatch bench {self.name} ==")
        print(format_table(self.rows, self.columns))
        for note in self.notes:
            print(note)
        for k, v in self.summary.items():
            if not isinstance(v, (dict, list)):
                print(f"{k}: {v}")
        sys.stdout.flush()
        if as_json:
            obj = {"bench": self.name, "rows": self.rows, **self.summary, "environment": environment()}
            print(json.dumps(obj, default=_jsonable))
            sys.stdout.flush()


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)
