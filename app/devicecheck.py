"""`python -m app.devicecheck --out DIR`: the GPU path on a real device, with only torch, NVML and numpy.

What it does, in one process (no Ray, no MLflow, no install of this project: run it from the repo root):

1. reads the NVML collector (``app.monitoring.collectors.NvmlProbe``) before, during and after the run;
2. builds the demo detector's torch variants (``torch.export``, one per batch size, the committed ONNX
   weights when the ``onnx`` package is there, else seeded random weights of the same shapes) and
   measures images/s and latency per batch size through the torch engine, with and without CUDA
   graphs, checking the outputs against the CPU;
3. replays the batch-size policies on the measured curve (``app.simulation``: simulated streams,
   the same policies the controller runs) and reports the size each settles on against the best
   static size.

Writes ``devicecheck.json`` (its ``profile`` is a device profile for ``edgebatch bench adapt --profile``)
and ``devicecheck.md`` into DIR and prints the Markdown. On a machine without a GPU it runs on the CPU
and says so; ``--batch-sizes 1,2 --iterations 3`` keeps that short (CI).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from app.engines.torchrt import TorchEngine, export_program, import_torch
from app.errors import EdgebatchError
from app.monitoring.collectors import DeviceSample, NvmlProbe
from app.simulation import DeviceProfile, SimulationSettings, SizePoint, compare

DEMO_ONNX = Path(__file__).resolve().parent / "demo" / "assets" / "detector.onnx"
DEFAULT_SIZES = "1,2,4,8,16,32,64"
INPUT = (3, 320, 320)


@dataclass
class CurvePoint:
    """One batch size through one engine mode: throughput and per-batch latency (host to host)."""

    batch_size: int
    images_per_s: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    memory_bytes: int
    memory_source: str
    gpu_util_max: float | None = None  # NVML while this size ran
    gpu_mem_used_max: int | None = None
    error: str = ""


@dataclass
class NvmlSampler:
    """Reads the NVML probe every ``interval_s`` in a thread, so utilisation is seen while batches run."""

    probe: NvmlProbe
    interval_s: float = 0.2
    samples: list[tuple[float, list[DeviceSample]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> NvmlSampler:
        self._thread = threading.Thread(target=self._run, name="devicecheck-nvml", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), self.probe.read().devices))
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def peak(self, t0: float, t1: float, index: int) -> tuple[float | None, int | None]:
        seen = [d for t, devices in list(self.samples) if t0 <= t <= t1 for d in devices if d.index == index]
        utils = [d.util_percent for d in seen if d.util_percent is not None]
        mems = [d.mem_used_bytes for d in seen if d.mem_used_bytes is not None]
        return (max(utils) if utils else None), (max(mems) if mems else None)


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated positive integers, e.g. {DEFAULT_SIZES}")
    return sizes


def measure(engine: TorchEngine, iterations: int, warmup: int, rng: np.random.Generator) -> tuple[list[float], float]:
    """Per-batch seconds of ``iterations`` timed runs after ``warmup``, and the wall time they took."""
    batch = rng.random(engine.input_shape, dtype=np.float32)
    for _ in range(warmup):
        engine.run(batch)
    times = []
    t_all = time.perf_counter()
    for _ in range(iterations):
        t0 = time.perf_counter()
        engine.run(batch)
        times.append(time.perf_counter() - t0)
    return times, time.perf_counter() - t_all


def _point(n: int, times: list[float], wall: float, engine: TorchEngine, nvml: tuple[float | None, int | None]) -> CurvePoint:
    ordered = sorted(times)
    report = engine.memory_report()
    return CurvePoint(
        batch_size=n, images_per_s=round(n * len(times) / wall, 2), mean_ms=round(statistics.fmean(times) * 1000, 3),
        p50_ms=round(ordered[len(ordered) // 2] * 1000, 3),
        p99_ms=round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000, 3),
        memory_bytes=engine.memory_bytes(), memory_source=report.source if report else "",
        gpu_util_max=nvml[0], gpu_mem_used_max=nvml[1],
    )


def _weights() -> tuple[str | None, str]:
    try:
        import onnx  # noqa: F401 - only to read the committed weights
    except ImportError:
        return None, "the onnx package is not installed"
    return str(DEMO_ONNX), ""


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    torch = import_torch()
    from app.demo.network import demo_export_module

    out = Path(args.out)
    (out / "variants").mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = (args.device if args.device.startswith("cuda:") else "cuda:0") if cuda else "cpu"
    gpu_index = int(device.split(":")[1]) if cuda else 0
    probe = NvmlProbe()
    before = probe.read()
    sampler = NvmlSampler(probe).start()
    onnx_path, why_random = _weights()
    module, weights = demo_export_module(onnx_path)
    if why_random:
        weights += f" ({why_random})"
    rng = np.random.default_rng(0)
    modes = ["torch", "torch+cuda_graphs"] if cuda else ["torch"]
    curves: dict[str, list[CurvePoint]] = {m: [] for m in modes}
    correctness: dict[str, Any] = {}
    started = time.perf_counter()
    for n in args.batch_sizes:
        path = out / "variants" / f"demo_b{n}.pt2"
        t0 = time.perf_counter()
        export_program(module, (n, *INPUT), path)
        export_s = time.perf_counter() - t0
        for mode in modes:
            options = {"device": device, "cuda_graphs": mode.endswith("cuda_graphs")}
            engine = TorchEngine(options)
            try:
                engine.load(path)
                t0 = time.perf_counter()
                times, wall = measure(engine, args.iterations, args.warmup, rng)
                point = _point(n, times, wall, engine, sampler.peak(t0, time.perf_counter(), gpu_index))
                if n == args.batch_sizes[0]:
                    correctness[mode] = _check_outputs(engine, path, rng, trained=onnx_path is not None)
            except (EdgebatchError, RuntimeError) as exc:  # CUDA out of memory is a RuntimeError
                message = exc.message if isinstance(exc, EdgebatchError) else f"{type(exc).__name__}: {exc}"
                point = CurvePoint(n, 0.0, 0.0, 0.0, 0.0, 0, "", error=message[:300])
            finally:
                engine.close()
                if cuda:
                    torch.cuda.empty_cache()
            curves[mode].append(point)
        print(f"  batch {n}: exported in {export_s:.1f} s; "
              + "; ".join(f"{m} {curves[m][-1].images_per_s} images/s" for m in modes), file=sys.stderr, flush=True)
    sampler.stop()
    after = probe.read()
    probe.close()
    best_mode = max(modes, key=lambda m: max((p.images_per_s for p in curves[m]), default=0.0))
    gpu_name = next((d.name for d in before.devices if d.index == gpu_index), None) if cuda else None
    profile = _profile(curves[best_mode], args, device, gpu_name, best_mode, before.devices, gpu_index)
    replays = _replays(profile, args) if profile is not None else []
    return {
        "kind": "edgebatch-devicecheck",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"python": platform.python_version(), "torch": str(torch.__version__),
                    "cuda": bool(cuda), "device": device, "gpu_name": gpu_name, "host": platform.node(),
                    "cuda_version": getattr(torch.version, "cuda", None)},
        "gpu_found": bool(cuda),
        "weights": weights,
        "nvml": {"before": [d.to_dict() for d in before.devices], "after": [d.to_dict() for d in after.devices],
                 "notes": before.notes + after.notes, "samples": len(sampler.samples)},
        "iterations": args.iterations, "warmup": args.warmup, "seconds": round(time.perf_counter() - started, 1),
        "curves": {m: [asdict(p) for p in pts] for m, pts in curves.items()},
        "correctness": correctness,
        "profile": profile.to_dict() if profile is not None else None,
        "policies": replays,
    }


def _check_outputs(engine: TorchEngine, path: Path, rng: np.random.Generator, *, trained: bool) -> dict[str, Any]:
    """The engine's outputs against the same program on the CPU, and against ONNX Runtime running the
    committed ONNX file where it is installed and the program carries those (trained) weights."""
    batch = rng.random(engine.input_shape, dtype=np.float32)
    ours = engine.run(batch)[0]
    cpu = TorchEngine({"device": "cpu"})
    cpu.load(path)
    result: dict[str, Any] = {"max_abs_diff_vs_torch_cpu": float(np.abs(ours - cpu.run(batch)[0]).max())}
    cpu.close()
    if not trained:
        result["onnxruntime"] = "not compared: random weights"
        return result
    try:
        import onnxruntime as ort

        session = ort.InferenceSession(str(DEMO_ONNX), providers=["CPUExecutionProvider"])
        result["max_abs_diff_vs_onnxruntime_cpu"] = float(np.abs(ours - session.run(None, {"images": batch})[0]).max())
    except ImportError:
        result["onnxruntime"] = "not installed"
    return result


def _profile(points: list[CurvePoint], args: argparse.Namespace, device: str, gpu_name: str | None, mode: str,
             devices: list[DeviceSample], gpu_index: int) -> DeviceProfile | None:
    ok = [p for p in points if not p.error and p.images_per_s > 0]
    if not ok:
        return None
    total = next((d.mem_total_bytes for d in devices if d.index == gpu_index), None) if device != "cpu" else None
    where = gpu_name or device
    return DeviceProfile(
        name=f"devicecheck-{device.replace(':', '')}", kind="measured",
        description=f"demo detector at 320x320, torch engine ({mode}) on {where}",
        source=f"python -m app.devicecheck, {time.strftime('%Y-%m-%d', time.gmtime())}: p50 per batch as d_batch, "
               "host-to-host (copies included)",
        points=tuple(SizePoint(p.batch_size, p.p50_ms / 1000.0, p.images_per_s,
                               p.memory_bytes if total else None) for p in ok),
        fps=args.fps, streams=1, mem_total_bytes=total,
    )


def _replays(profile: DeviceProfile, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The policies on the measured curve, at one stream and at the most streams the best size can carry."""
    top = max(p.capacity for p in profile.points)
    loads = sorted({1, max(1, int(top * 0.9 // args.fps))})
    settings = SimulationSettings(windows=args.windows, tail_windows=max(5, args.windows // 3))
    out = []
    for streams in loads:
        c = compare(profile.with_load(streams=streams), settings=settings)
        out.append({"streams": streams, "rate_fps": args.fps * streams,
                    "best_static": c.best_static.to_dict(), "policies": [r.to_dict() for r in c.policies]})
    return out


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"# edgebatch device check, {result['date']}", ""]
    if not result["gpu_found"]:
        lines += ["**No GPU was found**: torch sees no CUDA device, so this ran on the CPU and there is no CUDA",
                  "graph curve. These figures say nothing about a GPU.", ""]
    lines += [f"- machine: {m['gpu_name'] or m['device']} (python {m['python']}, torch {m['torch']}, "
              f"CUDA {m['cuda_version'] or 'none'}), host {m['host']}",
              f"- weights: {result['weights']}",
              f"- {result['iterations']} timed batches per point after {result['warmup']} warm-up; "
              "latency is host to host (copy in, run, copy out)", ""]
    lines += ["## NVML collector", ""]
    if result["nvml"]["before"]:
        lines += ["| when | GPU | name | util % | memory used MiB | memory total MiB |", "|---|---|---|---|---|---|"]
        for when in ("before", "after"):
            for d in result["nvml"][when]:
                mib = [None if d[k] is None else round(d[k] / 2**20) for k in ("mem_used_bytes", "mem_total_bytes")]
                lines.append(f"| {when} | {d['index']} | {d['name']} | {d['util_percent']} | {mib[0]} | {mib[1]} |")
    lines += [f"- {note}" for note in dict.fromkeys(result["nvml"]["notes"])]
    lines += ["", "## Batch-size curve (demo detector, torch engine)", "",
              "| mode | batch | images/s | mean ms | p50 ms | p99 ms | memory MiB (source) | NVML util % max | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    for mode, points in result["curves"].items():
        for p in points:
            lines.append(f"| {mode} | {p['batch_size']} | {p['images_per_s']} | {p['mean_ms']} | {p['p50_ms']} | "
                         f"{p['p99_ms']} | {p['memory_bytes'] / 2**20:.1f} ({p['memory_source']}) | "
                         f"{p['gpu_util_max'] if p['gpu_util_max'] is not None else 'n/a'} | {p['error']} |")
    for mode, check in result["correctness"].items():
        lines.append(f"- outputs ({mode}): " + ", ".join(f"{k} {v}" for k, v in check.items()))
    lines += ["", "## Batch-size policies replayed on this curve (simulated streams)", ""]
    if not result["policies"]:
        lines.append("no batch size ran, so there is no curve to replay")
    for replay in result["policies"]:
        b = replay["best_static"]
        lines += [f"{replay['streams']} stream(s), {replay['rate_fps']:g} frames/s: best static size "
                  f"{b['settled_size']} ({b['images_per_s']} images/s)", "",
                  "| policy | settled size | probes | images/s | vs best static | margin ms |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['policy']} | {r['settled_size']} | {r['probes']} | {r['images_per_s']} | "
                  f"{r['ratio_to_best_static']} | {r['margin_ms']} |" for r in replay["policies"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app.devicecheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for devicecheck.json, devicecheck.md and the variants")
    parser.add_argument("--batch-sizes", type=_parse_sizes, default=_parse_sizes(DEFAULT_SIZES))
    parser.add_argument("--iterations", type=int, default=50, help="timed batches per point")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches per point")
    parser.add_argument("--device", default="auto", help="auto (CUDA when there is one), cpu or cuda:N")
    parser.add_argument("--fps", type=float, default=30.0, help="stream rate for the policy replay")
    parser.add_argument("--windows", type=int, default=60, help="policy windows per simulated replay")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.windows < 6:
        parser.error("--iterations must be >= 1, --warmup >= 0, --windows >= 6")
    try:
        result = run_check(args)
    except EdgebatchError as exc:
        print(f"devicecheck: error: {exc.message}", file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "devicecheck.json").write_text(json.dumps(result, indent=1) + "\n")
    text = markdown(result)
    (out / "devicecheck.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
