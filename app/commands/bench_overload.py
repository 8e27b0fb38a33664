"""`edgebatch bench overload`: closed-loop clients well past capacity, each request with a deadline.

What issue 15 asks to see: the requests the server accepts keep their p99 within the deadline, and
the rest are refused in milliseconds (JSON 503 + Retry-After) instead of queueing for tens of
seconds. A refused client waits the Retry-After it was told, as a well-behaved client does;
``--no-backoff`` makes every refused client send again at once (the worst case for the server).
"""

from __future__ import annotations

import argparse

from app.bench.report import BenchReport, percentiles
from app.commands.bench import common
from app.config import DetectorConfig
from app.errors import ConfigError, Unavailable

COLUMNS = [("clients", "clients"), ("deadline_s", "deadline s"), ("served_per_s", "served/s"),
           ("served_p50_ms", "served p50 ms"), ("served_p99_ms", "served p99 ms"), ("within_deadline", "p99 ok"),
           ("gateway_p99_ms", "gateway p99 ms"),
           ("refused", "refused"), ("refused_p50_ms", "refused p50 ms"), ("refused_p99_ms", "refused p99 ms"),
           ("other_errors", "other errors")]


def add_bench_overload(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("overload", help="many clients with a deadline: accepted p99 vs refused latency")
    p.add_argument("--clients", default="50,200", help="comma-separated client counts, one run each")
    p.add_argument("--deadline", type=float, default=DetectorConfig().deadline_s,
                   help="seconds each request may take, sent as X-Request-Timeout (default: deadline_s's default)")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per client count")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--url", default=None, help="edgebatch base URL; default the running instance's")
    p.add_argument("--no-backoff", action="store_true",
                   help="refused clients send again at once instead of waiting the Retry-After they got")
    common(p)
    p.set_defaults(func=cmd_overload)


def _counts(text: str) -> list[int]:
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--clients must be comma-separated integers like 50,200, got {text!r}") from None
    if not counts or min(counts) < 1 or max(counts) > 2000:
        raise ConfigError(f"--clients must be between 1 and 2000, got {text!r}")
    return counts


def cmd_overload(args: argparse.Namespace) -> int:
    from app.bench.http_client import run_load
    from app.bench.images import sample_jpegs
    from app.instance import recorded_http_url
    from app.readiness import require_ready

    counts = _counts(args.clients)
    if not args.deadline > 0:
        raise ConfigError("--deadline must be > 0 seconds")
    base = (args.url or recorded_http_url()).rstrip("/")
    require_ready(base)
    deadline = args.deadline
    headers = {"Content-Type": "image/jpeg", "X-Request-Timeout": str(deadline)}
    bodies = [(j, headers) for j in sample_jpegs()]
    rows = []
    for n in counts:
        res = run_load(f"{base}/v1/detect", bodies, clients=n, duration_s=args.duration, warmup_s=args.warmup,
                       timeout_s=max(60.0, 4 * deadline), backoff=not args.no_backoff)
        if res.ok == 0 and res.refused == 0:
            top = ", ".join(f"{k}: {v}" for k, v in sorted(res.errors.items())) or "no reply"
            raise Unavailable(f"no request to {base} was served or refused ({top}); check the server and --url")
        served, refused = percentiles(res.latencies_s), percentiles(res.refused_latencies_s)
        inside = percentiles(res.server_latencies_s) if res.server_latencies_s else {"p99_ms": None}
        rows.append({"clients": n, "deadline_s": deadline, "served_per_s": res.rps, "served": res.ok,
                     "served_p50_ms": served["p50_ms"], "served_p99_ms": served["p99_ms"],
                     "within_deadline": bool(res.ok) and served["p99_ms"] <= deadline * 1000,
                     "gateway_p99_ms": inside["p99_ms"],
                     "refused": res.refused, "refused_p50_ms": refused["p50_ms"], "refused_p99_ms": refused["p99_ms"],
                     "other_errors": res.failed - res.refused, "errors": res.errors})
    report = BenchReport("overload", COLUMNS, rows)
    behaviour = "send again at once" if args.no_backoff else "wait the Retry-After"
    report.notes.append(f"POST /v1/detect (sample JPEGs) to {base}; closed-loop clients in a separate process that "
                        f"{behaviour} when refused; {args.duration:.0f} s measured per row after {args.warmup:.0f} s "
                        "warm-up; latency as the client sees it (proxy and gateway included); gateway p99: the "
                        "served requests' time inside the gateway (its Server-Timing header), the rest is the "
                        "proxy, the network and the client's own process, which shares this machine's cores")
    report.summary = {"deadline_s": deadline, "all_within_deadline": all(r["within_deadline"] for r in rows)}
    report.emit(args.json)
    return 0
