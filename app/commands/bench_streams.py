"""`edgebatch bench streams`: how many 30 fps streams the running service sustains, and their lag.

For k = 1, 2, ...: k looped streams of the sample video go through the running instance
(POST /v1/streams: Ray reader actors -> the detector through handles), with ``behind``
(default drop_oldest); after a warm-up their status is sampled for ``--seconds``. k is
sustained when the frames delivered reach 90 % of k x F. The lag (now - capture time of
the last delivered frame) is sampled throughout: with drop_oldest it must stay bounded by
the stream's queue (queue_bound / F, one batch interval at batch 8) plus d_batch, never grow.
The same run first measures the in-process reference, `edgebatch bench pipeline`'s streams
(no Ray), so the two counts are compared on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from app.commands.bench import common
from app.errors import ConfigError, EdgebatchError

COLUMNS = [("where", "where"), ("streams", "k"), ("fps_target", "target fps"), ("fps_out", "fps out"),
           ("drops", "drops"), ("errors", "failed frames"),
           ("lag_p50_s", "lag p50 s"), ("lag_max_s", "lag max s"), ("lag_bound_s", "lag bound s"),
           ("mean_batch", "mean batch"), ("sustained", "sustained")]


def add_bench_streams(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("streams", help="30 fps streams sustained through the running service, and their lag")
    p.add_argument("--url", default=None, help="base URL of the running app (default: the address `edgebatch up` recorded)")
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--max-streams", type=int, default=4, help="largest k tried (stops at the first k not sustained)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per k (after --warmup)")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--behind", choices=("drop_oldest", "queue"), default="drop_oldest")
    p.add_argument("--queue-bound", type=int, default=8)
    p.add_argument("--no-reference", action="store_true", help="skip the in-process reference (`bench pipeline`'s streams)")
    common(p)
    p.set_defaults(func=cmd_bench_streams)


def _sample(base: str, headers: dict[str, str], ids: list[str], fps: float, warmup: float, seconds: float) -> dict[str, Any]:
    from app.commands.streams import _call

    pause = threading.Event()  # paces the sampling (a benchmark's clock, not synchronisation)
    pause.wait(warmup)
    first = {i: _call("GET", f"{base}/{i}", headers=headers) for i in ids}
    t0 = time.monotonic()
    lags: list[float] = []
    last = first
    while time.monotonic() - t0 < seconds:
        pause.wait(0.5)
        last = {i: _call("GET", f"{base}/{i}", headers=headers) for i in ids}
        lags += [s["lag_s"] for s in last.values() if s.get("lag_s") is not None]
    span = time.monotonic() - t0
    out = sum(last[i]["frames_out"] - first[i]["frames_out"] for i in ids)
    drops = sum(last[i]["drops"] - first[i]["drops"] for i in ids)
    errors = sum(last[i]["errors"] - first[i]["errors"] for i in ids)  # delivered, but without detections
    d_batch = [s["d_batch_s"] for s in last.values() if s.get("d_batch_s") is not None]
    batches = [s["batch_size"] for s in last.values() if s.get("batch_size") is not None]
    failed = [f"{i}: {s.get('state')} {s.get('reason') or ''}".strip() for i, s in last.items()
              if s.get("state") in ("failed", "finished", "stopped")]
    return {"fps_out": round((out - errors) / span, 1), "drops": drops, "errors": errors,
            "lag_p50_s": round(statistics.median(lags), 3) if lags else None,
            "lag_max_s": round(max(lags), 3) if lags else None,
            "d_batch_s": round(max(d_batch), 4) if d_batch else None,
            "mean_batch": round(statistics.mean(batches), 2) if batches else None, "ended": failed}


def service_run(base: str, headers: dict[str, str], k: int, args: argparse.Namespace) -> dict[str, Any]:
    from app.commands.streams import _call

    ids: list[str] = []
    row: dict[str, Any] = {"where": "service", "streams": k, "fps_target": k * args.fps}
    try:
        for i in range(k):
            body = {"source": "sample.mp4", "fps": args.fps, "behind": args.behind, "queue_bound": args.queue_bound,
                    "loop": True, "id": f"bench-{k}-{i}"}
            try:
                ids.append(_call("POST", base, json=body, headers=headers)["id"])
            except EdgebatchError as exc:  # admission's 429 says how much capacity is left
                row.update({"sustained": False, "refused": exc.message})
                return row
        row.update(_sample(base, headers, ids, args.fps, args.warmup, args.seconds))
    finally:
        for i in ids:
            _call("DELETE", f"{base}/{i}", headers=headers)
    row["lag_bound_s"] = round(args.queue_bound / args.fps + (row.get("d_batch_s") or 0.0), 3)
    row["sustained"] = row["fps_out"] >= 0.9 * k * args.fps and not row["ended"] and not row["errors"]
    return row


def cmd_bench_streams(args: argparse.Namespace) -> int:
    from app.bench.report import BenchReport
    from app.commands.bench_pipeline import run_streams
    from app.commands.demo import ensure_sample_video
    from app.commands.streams import _auth_headers
    from app.instance import recorded_http_url
    from app.readiness import require_ready
    from app.state import StateDir

    if args.fps <= 0 or args.seconds <= 1 or args.max_streams < 1:
        raise ConfigError("--fps must be > 0, --seconds > 1 and --max-streams >= 1")
    root = (args.url or recorded_http_url()).rstrip("/")
    require_ready(root)
    base = root + "/v1/streams"
    headers = _auth_headers(args)
    video = ensure_sample_video(StateDir.default().ensure())  # the server's media folder on this machine
    rows: list[dict[str, Any]] = []
    reference = None
    if not args.no_reference:
        reference = 0
        for k in range(1, args.max_streams + 1):
            r = run_streams(Path(video), k, args.fps, max(args.seconds, 6.0), 8, None)
            rows.append({"where": "in-process", "streams": k, "fps_target": r["fps_target"], "fps_out": r["fps_out"],
                         "mean_batch": r["mean_batch"], "sustained": r["sustained"],
                         "lag_p50_s": r["latency_last_s"]})
            if not r["sustained"]:
                break
            reference = k
    sustained = 0
    for k in range(1, args.max_streams + 1):
        row = service_run(base, headers, k, args)
        rows.append(row)
        if not row["sustained"]:
            break
        sustained = k
    report = BenchReport("streams", COLUMNS, rows)
    report.notes.append(f"service: k looped {args.fps:g} fps streams of {Path(video).name} through POST /v1/streams "
                        f"(behind={args.behind}, queue_bound={args.queue_bound}), {args.seconds:g} s measured after "
                        f"{args.warmup:g} s; lag sampled every 0.5 s; lag bound = queue_bound / F + d_batch")
    report.notes.append("in-process: `edgebatch bench pipeline`'s streams (no Ray, queue policy), same run; "
                        "its lag column is the mean latency over the last third")
    for r in rows:
        if r.get("refused"):
            report.notes.append(f"k={r['streams']} refused: {r['refused']}")
        for e in r.get("ended") or []:
            report.notes.append(f"k={r['streams']} stream ended: {e}")
    service = [r for r in rows if r["where"] == "service" and r.get("lag_max_s") is not None]
    report.summary = {"streams_sustained": sustained, "reference_streams_sustained": reference,
                      "lag_max_s": max((r["lag_max_s"] for r in service), default=None),
                      "lag_within_bound": all(r["lag_max_s"] <= r["lag_bound_s"] for r in service) if service else None}
    report.emit(args.json)
    return 0
