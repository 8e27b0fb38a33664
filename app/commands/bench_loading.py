"""``edgebatch bench loading``: layer-loading policies under a memory budget, measured (issue 7).

For a set of models (the demo detector and bigger synthetic conv nets written offline)
and one or more budgets, a queue of requests (every model, ``--requests`` times, all
arriving at once) runs under each loading policy and request order. Each request loads
its model's stages from disk and frees them again (a cold device that cannot keep the
models, EdgeCaffe's setting). Reported per policy: total run time of the queue, per-request
latency (completion minus arrival: the order matters) and the peak resident memory
MEASURED by the kernel's high-water mark over the run, beside the ledger's accounted peak.
Each (budget, policy, order) runs in a fresh process, so memory freed by an earlier run
cannot hide new allocations. A policy whose plan does not fit the budget is refused before
it starts and shown so. No Ray needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import BadRequest

DEMO = Path(__file__).resolve().parents[1] / "demo" / "assets" / "detector.onnx"
# name -> (channels, layers, spatial size) of the synthetic conv chains
SYNTHETIC = {"conv-m": (384, 6, 24), "conv-l": (512, 6, 16)}
MODELS = ("demo", *SYNTHETIC)
RUNS = (("bulk", "fcfs"), ("linear", "fcfs"), ("partial", "fcfs"), ("interleaved", "fcfs"),
        ("partial", "masa"), ("interleaved", "masa"))


@dataclass
class BenchModel:
    name: str
    file_bytes: int
    staged: Any  # StagedModel
    inputs: dict[str, np.ndarray]


def _prepare(names: list[str], stages: int, root: Path) -> list[BenchModel]:
    import onnx

    from app.layered.executor import profile_stages_isolated
    from app.layered.synthetic import write_conv_chain
    from model_registry.split import cut_points, split_onnx

    out = []
    for name in names:
        if name == "demo":
            path, inputs = DEMO, {"images": np.random.default_rng(0).random((1, 3, 320, 320), dtype=np.float32)}
        else:
            channels, layers, size = SYNTHETIC[name]
            path = write_conv_chain(root / f"{name}.onnx", layers=layers, channels=channels, size=size)
            inputs = {"x": np.random.default_rng(0).random((1, channels, size, size), dtype=np.float32)}
        k = min(stages, len(cut_points(onnx.load(str(path)))) + 1)
        files = split_onnx(path, k, root / f"{name}-k{k}")
        print(f"  {name}: {path.stat().st_size / 1e6:.1f} MB file, {k} stages, profiling...", file=sys.stderr)
        out.append(BenchModel(name, path.stat().st_size, profile_stages_isolated(name, [f.path for f in files], inputs),
                              inputs))
    return out


def run_queue(models: list[BenchModel], requests: int, policy: str, order: str, budget_bytes: int) -> dict:
    """Serve the queue one request at a time in the chosen order; measured time and memory.

    Meant to run in a fresh process (``isolated``): a process that already ran other
    policies keeps freed pages resident and reuses them, which hides new memory from
    the high-water mark. ONNX Runtime's one-time start-up is paid first, outside the measurement.
    """
    from app.layered.executor import LayeredExecutor, MemoryBudgetError, MemoryLedger, PeakRss, release_heap, warm_runtime
    from policies.loading import Request, order_requests

    warm_runtime()
    executor = LayeredExecutor(MemoryLedger(budget_bytes))
    try:
        plans = {m.name: executor.plan(m.staged, policy) for m in models}  # refused before anything runs
    except MemoryBudgetError as exc:
        return {"status": "refused", "reason": exc.message.split(";")[0], "needed_mb": exc.needed_bytes / 1e6}
    by_name = {m.name: m for m in models}
    queue = [Request(f"{m.name}#{i}", m.name, 0.0, plans[m.name].est_makespan_s, plans[m.name].peak_bytes)
             for i in range(requests) for m in models]  # round robin, all arrive at t=0
    latencies: dict[str, list[float]] = {m.name: [] for m in models}
    service: list[float] = []
    release_heap()
    with PeakRss() as peak:
        t0 = time.perf_counter()
        while queue:
            now = time.perf_counter() - t0
            admitted = order_requests(queue, policy=order, now=now, resident_bytes=executor.memory.resident_bytes,
                                      budget_bytes=budget_bytes)
            if not admitted:
                raise BadRequest("no queued request fits the budget")  # cannot happen: plans were checked
            req = admitted[0]
            queue.remove(req)
            model = by_name[req.model]
            try:
                result = executor.run(model.staged, policy, model.inputs, request_id=req.request_id)
            except MemoryBudgetError as exc:  # the ledger saw more resident than planned: stopped, not overrun
                return {"status": "stopped", "reason": exc.message.split(";")[0], "needed_mb": exc.needed_bytes / 1e6}
            service.append(result.total_s)
            latencies[req.model].append(time.perf_counter() - t0)  # arrival at t0
        total = time.perf_counter() - t0
    every = [x for v in latencies.values() for x in v]
    return {
        "status": "ok", "total_s": total, "mean_latency_ms": 1000 * statistics.fmean(every),
        "p90_latency_ms": 1000 * float(np.percentile(every, 90)),
        "service_p50_ms": 1000 * statistics.median(service),
        "latency_ms_by_model": {k: round(1000 * statistics.fmean(v), 1) for k, v in latencies.items()},
        "measured_peak_mb": peak.delta_bytes / 1e6, "accounted_peak_mb": executor.memory.peak_bytes / 1e6,
        "planned_peak_mb": max(p.peak_bytes for p in plans.values()) / 1e6, "measure": peak.method,
    }


def _combine(runs: list[dict]) -> dict:
    """Median of times over repeats, the largest measured peak."""
    failed = [r for r in runs if r["status"] != "ok"]
    if failed:
        return {**failed[0], "failed_runs": len(failed), "runs": len(runs)}
    out = dict(runs[len(runs) // 2])
    for key in ("total_s", "mean_latency_ms", "p90_latency_ms", "service_p50_ms"):
        out[key] = statistics.median(r[key] for r in runs)
    out["total_s_runs"] = [round(r["total_s"], 3) for r in runs]
    out["measured_peak_mb"] = max(r["measured_peak_mb"] for r in runs)
    out["accounted_peak_mb"] = max(r["accounted_peak_mb"] for r in runs)
    return out


def _plot(rows: list[dict], budgets: list[float], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, axes = plt.subplots(2, len(budgets), figsize=(5.5 * len(budgets), 7), squeeze=False)
    for col, budget in enumerate(budgets):
        mine = [r for r in rows if r["budget_mb"] == budget]
        labels = [f"{r['policy']}\n{r['order']}" for r in mine]
        ok = [r["status"] == "ok" for r in mine]
        times = [r["total_s"] if r["status"] == "ok" else 0 for r in mine]
        peaks = [r["measured_peak_mb"] if r["status"] == "ok" else 0 for r in mine]
        colors = ["tab:blue" if r["policy"] != "interleaved" else "tab:orange" for r in mine]
        ax = axes[0][col]
        ax.bar(labels, times, color=colors)
        for i, good in enumerate(ok):
            if not good:
                ax.text(i, 0, f"{mine[i]['status']}:\nover\nbudget", ha="center", va="bottom", fontsize=8, color="red")
        ax.set_title(f"budget {budget:g} MB: queue run time")
        ax.set_ylabel("seconds (lower is better)")
        ax.tick_params(axis="x", labelsize=7)
        ax = axes[1][col]
        ax.bar(labels, peaks, color=colors)
        ax.axhline(budget, color="red", linestyle="--", label="budget")
        ax.set_ylim(0, max(max(peaks, default=0), budget) * 1.15)
        ax.set_title("measured peak resident memory")
        ax.set_ylabel("MB (VmHWM delta)")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
    fig.suptitle("edgebatch bench loading (2 shared CPU cores, ONNX Runtime CPU)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _cmd_bench_loading(args: argparse.Namespace) -> int:
    from app.bench.report import BenchReport

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise BadRequest(f"--models: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}")
    try:
        budgets = [float(x) for x in args.budget_mb.split(",") if x.strip()]
    except ValueError:
        raise BadRequest(f"--budget-mb must be comma-separated numbers of MB, e.g. 1000,128; got {args.budget_mb!r}") from None
    if not budgets or min(budgets) <= 0:
        raise BadRequest(f"--budget-mb must be positive, got {args.budget_mb!r}")
    if args.stages < 2 or args.requests < 1 or args.repeats < 1:
        raise BadRequest("--stages must be >= 2, --requests and --repeats >= 1")
    with tempfile.TemporaryDirectory(prefix="edgebatch-bench-loading-") as tmp:
        print("writing, splitting and profiling models...", file=sys.stderr)
        models = _prepare(names, args.stages, Path(tmp))
        from app.layered.executor import isolated
        samples: dict[tuple[float, str, str], list[dict]] = {}
        for repeat in range(args.repeats):  # policies alternate, so a burst of load on the box hits all
            for budget in budgets:
                for policy, order in RUNS:
                    print(f"  [{repeat + 1}/{args.repeats}] budget {budget:g} MB: {policy} / {order}...",
                          file=sys.stderr)
                    samples.setdefault((budget, policy, order), []).append(
                        isolated(run_queue, models, args.requests, policy, order, int(budget * 1e6)))
        rows = [{"budget_mb": b, "policy": p, "order": o, **_combine(runs)} for (b, p, o), runs in samples.items()]
    report = BenchReport("loading", [
        ("budget_mb", "BUDGET MB"), ("policy", "POLICY"), ("order", "ORDER"), ("status", "STATUS"), ("needed_mb", "NEEDS MB"),
        ("total_s", "TOTAL s"), ("mean_latency_ms", "MEAN LAT ms"), ("p90_latency_ms", "P90 LAT ms"),
        ("service_p50_ms", "SERVICE p50 ms"), ("planned_peak_mb", "PLANNED MB"),
        ("accounted_peak_mb", "ACCOUNTED MB"), ("measured_peak_mb", "MEASURED MB")])
    report.rows = rows
    report.summary["models"] = [{"name": m.name, "file_mb": round(m.file_bytes / 1e6, 2),
                                 "stages": len(m.staged.stages),
                                 "stage_resident_mb": [round(s.load_bytes / 1e6, 1) for s in m.staged.stages],
                                 "stage_load_ms": [round(s.load_s * 1000, 1) for s in m.staged.stages],
                                 "stage_exec_ms": [round(s.exec_s * 1000, 1) for s in m.staged.stages]}
                                for m in models]
    report.summary["requests_per_model"] = args.requests
    for budget in budgets:
        by = {(r["policy"], r["order"]): r for r in rows if r["budget_mb"] == budget}
        inter, bulk = by[("interleaved", "fcfs")], by[("bulk", "fcfs")]
        if inter["status"] == "ok" and bulk["status"] != "ok":
            verdict = f"interleaved runs in {inter['total_s']:.2f} s; bulk is refused ({bulk['reason']})"
        elif inter["status"] == "ok":
            verdict = (f"interleaved {inter['total_s']:.2f} s vs bulk {bulk['total_s']:.2f} s, measured peak "
                       f"{inter['measured_peak_mb']:.0f} vs {bulk['measured_peak_mb']:.0f} MB")
        else:
            verdict = f"interleaved refused ({inter['reason']})"
        report.notes.append(f"budget {budget:g} MB: {verdict}")
    for r in rows:
        if r["status"] != "ok":
            report.notes.append(f"budget {r['budget_mb']:g} MB, {r['policy']}/{r['order']} {r['status']}: {r['reason']}")
    report.notes.append("measured = kernel resident high-water mark (VmHWM) delta over the run; accounted = the "
                        "ledger's reserved stage costs plus freed-but-unreturned heap")
    if not args.no_plot:
        problem = _plot(rows, budgets, Path(args.plot))
        if problem:
            report.notes.append(problem)
        report.summary["plot"] = None if problem else str(args.plot)
    report.emit(args.json)
    return 0


def add_bench_loading(bench_subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench loading`` to the shared ``bench`` group."""
    p = bench_subparsers.add_parser(
        "loading", help="layer-loading policies (bulk/linear/partial/interleaved, FCFS/MASA) under a memory budget",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated from {', '.join(MODELS)} "
                   "(conv-m: 6 x 5.3 MB layers, conv-l: 6 x 9.4 MB layers)")
    p.add_argument("--budget-mb", default="1000,128", help="comma-separated budgets in MB (default 1000,128)")
    p.add_argument("--stages", type=int, default=6, help="stages per model (fewer where a model has fewer cuts)")
    p.add_argument("--requests", type=int, default=3, help="requests per model in the queue (default 3)")
    p.add_argument("--repeats", type=int, default=1, help="runs of each policy (median time, max peak reported)")
    p.add_argument("--plot", default="docs/img/loading.png", help="PNG to write (default docs/img/loading.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=_cmd_bench_loading)
