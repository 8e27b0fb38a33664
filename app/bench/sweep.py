"""The multi-tenancy benchmarker (Hao, Subedi, Ramaswamy, Kim): backend x batch size x concurrency.

For each backend and batch size, k engine instances of the model run concurrently
(one thread each, like CME: k instances on one device). Each point warms every
instance up, then measures ``runs`` (>= 30) batches per instance:
throughput = k x batch x runs / wall time; latency p50/p99 per batch. k is raised
until a run fails (out of memory, the engine refuses) or throughput falls, and the
best configuration and the largest k that ran are reported.

Plain Python over ``app.engines``: no Ray, no registry, so it runs on a GPU machine
that has only ONNX Runtime (and torch) installed. Engines release the GIL while
they run, so threads give real concurrency.
"""

from __future__ import annotations

import csv
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.bench.report import percentiles
from app.engines.base import Engine

# (backend, batch_size) -> one loaded engine instance; called k times for concurrency k
EngineFactory = Callable[[str, int], Engine]

MIN_RUNS = 30


@dataclass
class SweepPoint:
    """One (backend, batch size, concurrency) measurement, or why it could not run."""

    backend: str
    batch_size: int
    concurrency: int
    runs: int = 0
    seconds: float = 0.0
    throughput: float = 0.0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    cpu_percent: float = float("nan")
    memory_mb: float = float("nan")
    device_util: str = "n/a"
    device_memory_mb: str = "n/a"
    ok: bool = True
    stop: str = ""

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("seconds", "throughput", "p50_ms", "p99_ms", "cpu_percent", "memory_mb"):
            d[k] = round(d[k], 3) if d[k] == d[k] else None
        return d


@dataclass
class SweepResult:
    points: list[SweepPoint] = field(default_factory=list)
    device: str = "cpu"

    def ok_points(self) -> list[SweepPoint]:
        return [p for p in self.points if p.ok]

    def best(self) -> SweepPoint | None:
        ok = self.ok_points()
        return max(ok, key=lambda p: p.throughput) if ok else None

    def max_concurrency(self) -> dict[str, int]:
        """Largest k that ran, per backend/batch size ("onnx/b8": 3)."""
        out: dict[str, int] = {}
        for p in self.ok_points():
            key = f"{p.backend}/b{p.batch_size}"
            out[key] = max(out.get(key, 0), p.concurrency)
        return out

    def best_concurrency(self) -> dict[str, int]:
        """k with the highest throughput, per backend/batch size: the CME level to configure."""
        best: dict[str, SweepPoint] = {}
        for p in self.ok_points():
            key = f"{p.backend}/b{p.batch_size}"
            if key not in best or p.throughput > best[key].throughput:
                best[key] = p
        return {k: p.concurrency for k, p in best.items()}


class UsageSampler:
    """CPU %, process memory and (where NVML answers) GPU utilisation, sampled in a thread."""

    def __init__(self, interval_s: float = 0.1, gpu_index: int = 0) -> None:
        self.interval_s = interval_s
        self.gpu_index = gpu_index
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.gpu: list[float] = []
        self.gpu_mem: list[float] = []
        self.nvml_error: str | None = None
        self._nvml: Any = None
        self._handle: Any = None

    def _init_nvml(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
            self._nvml = pynvml
        except Exception as exc:  # no library (CPU host), no GPU, Jetson (no NVML there)
            self.nvml_error = f"{type(exc).__name__}"

    def __enter__(self) -> UsageSampler:
        import psutil

        self._proc = psutil.Process()
        self._proc.cpu_percent(None)
        psutil.cpu_percent(None)
        self._init_nvml()
        self._thread = threading.Thread(target=self._loop, name="edgebatch-sweep-usage", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        """One reading; also taken on exit, so a point shorter than the interval still has one."""
        import psutil

        self.cpu.append(psutil.cpu_percent(None))
        self.rss.append(self._proc.memory_info().rss / 1e6)
        if self._nvml is not None:
            try:
                self.gpu.append(float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu))
                self.gpu_mem.append(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used / 1e6)
            except Exception:
                pass

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._sample()
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass

    def summary(self) -> dict[str, Any]:
        return {
            "cpu_percent": statistics.fmean(self.cpu) if self.cpu else float("nan"),
            "memory_mb": max(self.rss) if self.rss else float("nan"),
            "device_util": f"{statistics.fmean(self.gpu):.0f}%" if self.gpu else "n/a",
            "device_memory_mb": f"{max(self.gpu_mem):.0f}" if self.gpu_mem else "n/a",
        }


def run_point(
    factory: EngineFactory, backend: str, batch_size: int, concurrency: int, *, runs: int = MIN_RUNS,
    warmup: int = 3, seed: int = 0,
) -> SweepPoint:
    """k engine instances, one thread each, ``runs`` timed batches per instance after warm-up."""
    if runs < MIN_RUNS:
        raise ValueError(f"runs must be >= {MIN_RUNS} (the papers' protocol), got {runs}")
    point = SweepPoint(backend, batch_size, concurrency)
    engines: list[Engine] = []
    try:
        for _ in range(concurrency):
            engines.append(factory(backend, batch_size))
        shape = engines[0].input_shape
        if shape and shape[0] != batch_size:
            raise ValueError(f"engine batch size {shape[0]} != requested {batch_size}")
        batch = np.random.default_rng(seed).random(shape, dtype=np.float32)
        for engine in engines:
            for _ in range(warmup):
                engine.run(batch)
        latencies: list[list[float]] = [[] for _ in engines]
        errors: list[BaseException] = []
        start = threading.Barrier(concurrency + 1)

        def work(i: int) -> None:
            try:
                start.wait()
                for _ in range(runs):
                    t0 = time.perf_counter()
                    engines[i].run(batch)
                    latencies[i].append(time.perf_counter() - t0)
            except BaseException as exc:  # any error: reported as the stop reason
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(concurrency)]
        for t in threads:
            t.start()
        with UsageSampler() as usage:  # the measured runs only: loading and warm-up are not the point's load
            start.wait()
            t_begin = time.perf_counter()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t_begin
        if errors:
            raise errors[0]
        flat = [x for lat in latencies for x in lat]
        pct = percentiles(flat)
        point.runs, point.seconds = runs, elapsed
        point.throughput = concurrency * batch_size * runs / elapsed if elapsed > 0 else 0.0
        point.p50_ms, point.p99_ms = pct["p50_ms"], pct["p99_ms"]
        s = usage.summary()
        point.cpu_percent, point.memory_mb = s["cpu_percent"], s["memory_mb"]
        point.device_util, point.device_memory_mb = s["device_util"], s["device_memory_mb"]
    except Exception as exc:  # out of memory, engine refused the size: the end of this sweep line
        point.ok = False
        point.stop = f"failed: {getattr(exc, 'message', None) or f'{type(exc).__name__}: {exc}'}"[:300]
    finally:
        for engine in engines:
            try:
                engine.close()
            except Exception:
                pass
    return point


def sweep(
    factory: EngineFactory, backends: Sequence[str], batch_sizes: Sequence[int], *, max_concurrency: int = 8,
    runs: int = MIN_RUNS, warmup: int = 3, drop_tolerance: float = 0.0,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Raise k = 1, 2, ... per (backend, batch size) until a run fails, throughput falls
    (below the best so far by more than ``drop_tolerance``), or ``max_concurrency``."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    result = SweepResult()
    for backend in backends:
        for bs in batch_sizes:
            best = 0.0
            for k in range(1, max_concurrency + 1):
                point = run_point(factory, backend, bs, k, runs=runs, warmup=warmup)
                if point.ok and point.throughput < best * (1.0 - drop_tolerance):
                    point.stop = f"throughput fell: {point.throughput:.1f} < best {best:.1f} items/s"
                elif point.ok and k == max_concurrency:
                    point.stop = f"reached --max-concurrency {max_concurrency}"
                result.points.append(point)
                if on_point:
                    on_point(point)
                if point.stop:
                    break
                best = max(best, point.throughput)
    return result


COLUMNS = [
    ("backend", "backend"), ("batch_size", "batch"), ("concurrency", "k"), ("runs", "runs/inst"),
    ("throughput", "items/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"), ("cpu_percent", "cpu %"),
    ("memory_mb", "rss MB"), ("device_util", "device"), ("stop", "stopped because"),
]


def write_csv(result: SweepResult, path: Path) -> None:
    rows = [p.row() for p in result.points]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [c for c, _ in COLUMNS])
        writer.writeheader()
        writer.writerows(rows)


def plot(result: SweepResult, path: Path, title: str) -> None:
    """Throughput against concurrency, one line per backend/batch size (matplotlib, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    lines: dict[tuple[str, int], list[SweepPoint]] = {}
    for p in result.ok_points():
        lines.setdefault((p.backend, p.batch_size), []).append(p)
    for (backend, bs), pts in sorted(lines.items()):
        pts.sort(key=lambda p: p.concurrency)
        ax.plot([p.concurrency for p in pts], [p.throughput for p in pts], marker="o", label=f"{backend} batch {bs}")
    best = result.best()
    if best is not None:
        ax.annotate("best", (best.concurrency, best.throughput), textcoords="offset points", xytext=(6, 6))
    ax.set_xlabel("concurrency k (engine instances at once)")
    ax.set_ylabel("throughput (items/s)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if lines:
        ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
