"""`edgebatch bench pipeline --video FILE`: the paper's delay table and how many streams keep up.

Part 1, per batch size N: pre-processing (decode + letterbox of N frames), inference (one batch
of N), post-processing (boxes + NMS of N), their sum d_batch, the real-time condition N / F and
the margin N / F - d_batch (negative: output lags ever further behind).
Part 2: k paced streams of the video through the Ray-free staged pipeline, k = 1, 2, ...: a k
is sustained when the output keeps up (fps out >= 90 % of k x F) and the latency does not grow
between the first and the last third of the run. No Ray needed: the demo detector runs in-process.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

from app.commands.bench import common, parse_sizes
from app.errors import ConfigError


def add_bench_pipeline(bsub: argparse._SubParsersAction) -> None:
    p = bsub.add_parser("pipeline", help="per-stage batch delays vs the real-time condition N/F; streams sustained")
    p.add_argument("--video", type=Path, default=None, help="video file (default: the generated sample video)")
    p.add_argument("--fps", type=float, default=30.0, help="F: the camera frame rate of the real-time condition")
    p.add_argument("--batch-sizes", default="1,2,4,8,16")
    p.add_argument("--repeats", type=int, default=5, help="batches timed per size (median reported)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--max-streams", type=int, default=8, help="largest k tried for sustained streams (0 = skip)")
    p.add_argument("--seconds", type=float, default=6.0, help="run length per k")
    p.add_argument("--stream-batch", type=int, default=8, help="largest batch the stream pipeline forms")
    common(p)
    p.set_defaults(func=cmd_bench_pipeline)


def _frames(video: Path, n: int) -> tuple[list, float]:
    """Decode ``n`` frames (looping a short file); returns them and the median decode time per frame."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise ConfigError(f"OpenCV cannot open {video}; give a video file (make one with `edgebatch sample-video`)")
    frames, times = [], []
    while len(frames) < n:
        t0 = time.perf_counter()
        ok, img = cap.read()
        if not ok:
            if not frames:
                raise ConfigError(f"{video} has no readable frames")
            cap.release()
            cap = cv2.VideoCapture(str(video))
            continue
        times.append(time.perf_counter() - t0)
        frames.append(img)
    cap.release()
    return frames, statistics.median(times)


def delay_table(video: Path, sizes: list[int], fps: float, repeats: int, threads: int | None) -> list[dict]:
    from app.pipeline import prepare, to_input
    from app.streams.pipeline import demo_engine_stage

    stage, post, size = demo_engine_stage(max(sizes), threads)
    frames, decode_s = _frames(video, max(sizes))
    rows = []
    for n in sizes:
        pre, inf, pst = [], [], []
        for r in range(repeats + 1):  # the first round warms the engine for this shape
            t0 = time.perf_counter()
            items = [prepare(frames[i], size) for i in range(n)]
            t1 = time.perf_counter()
            out = stage.run_batch(to_input([it.image for it in items]))  # normalised as one batch
            t2 = time.perf_counter()
            post.decode(out, [it.letterbox for it in items])
            t3 = time.perf_counter()
            if r:
                pre.append(t1 - t0 + n * decode_s)
                inf.append(t2 - t1)
                pst.append(t3 - t2)
        p, i, q = (statistics.median(x) * 1000 for x in (pre, inf, pst))
        total = p + i + q
        budget = n / fps * 1000
        rows.append({"batch": n, "pre_ms": round(p, 2), "infer_ms": round(i, 2), "post_ms": round(q, 2),
                     "d_batch_ms": round(total, 2), "budget_ms": round(budget, 2), "margin_ms": round(budget - total, 2),
                     "realtime": budget >= total, "images_per_s": round(n / total * 1000, 1)})
    return rows


class _LatencySink:
    """Records (delivered, latency) per frame: the lag trend decides whether k streams keep up."""

    needs_image = False

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def write(self, result) -> None:
        with self._lock:
            self.samples.append((result.delivered_ts, result.delivered_ts - result.capture_ts))

    def close(self) -> None:
        pass


def run_streams(video: Path, k: int, fps: float, seconds: float, max_batch: int, threads: int | None) -> dict:
    from app.streams.pipeline import StreamOptions, StreamPipeline, demo_engine_stage

    stage, post, size = demo_engine_stage(max_batch, threads)
    pipe = StreamPipeline(stage, input_size=size, post=post, batch_wait_s=0.005, preprocess_workers=2)
    sinks = [_LatencySink() for _ in range(k)]
    ids = []
    try:
        t_start = time.time()
        for s in sinks:
            ids.append(pipe.add_stream(str(video), StreamOptions(fps=fps, behind="queue", queue_bound=256, loop=True),
                                       sinks=[s]))
        done = threading.Event()
        done.wait(seconds)  # the run length: a benchmark duration, not synchronisation
        statuses = [pipe.status(i) for i in ids]
    finally:
        pipe.close()
    samples = sorted(x for s in sinks for x in s.samples if x[0] >= t_start)
    span = seconds / 3
    first = [lat for t, lat in samples if t < t_start + 1 + span]
    last = [lat for t, lat in samples if t >= t_start + seconds - span]
    out_frames = sum(st["frames_out"] for st in statuses)
    fps_out = out_frames / max(1e-6, samples[-1][0] - t_start) if samples else 0.0
    lat_first = statistics.mean(first) if first else float("nan")
    lat_last = statistics.mean(last) if last else float("nan")
    growth = lat_last - lat_first
    sizes = {}
    for st in statuses:
        for b, c in st["batch_sizes_seen"].items():
            sizes[int(b)] = sizes.get(int(b), 0) + c
    mean_batch = sum(b * c for b, c in sizes.items()) / max(1, sum(sizes.values()))
    sustained = bool(first) and bool(last) and fps_out >= 0.9 * k * fps and growth < 0.25
    def r3(x: float) -> float | None:
        return None if x != x else round(x, 3)  # NaN (no frames in a third) is not JSON

    return {"streams": k, "fps_target": k * fps, "fps_out": round(fps_out, 1), "latency_first_s": r3(lat_first),
            "latency_last_s": r3(lat_last), "lag_growth_s": r3(growth), "mean_batch": round(mean_batch, 2),
            "sustained": sustained}


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from app.bench.report import BenchReport

    video = args.video
    if video is None:
        from app.commands.demo import ensure_sample_video
        from app.state import StateDir

        video = ensure_sample_video(StateDir.default().ensure())
    if not Path(video).is_file():
        raise ConfigError(f"--video {video} does not exist; make one with `edgebatch sample-video`")
    if args.fps <= 0 or args.repeats < 1 or args.seconds <= 1:
        raise ConfigError("--fps must be > 0, --repeats >= 1 and --seconds > 1")
    sizes = parse_sizes(args.batch_sizes)
    rows = delay_table(Path(video), sizes, args.fps, args.repeats, args.threads)
    report = BenchReport(
        name="pipeline",
        columns=[("batch", "N"), ("pre_ms", "pre ms"), ("infer_ms", "infer ms"), ("post_ms", "post ms"),
                 ("d_batch_ms", "d_batch ms"), ("budget_ms", f"N/F ms (F={args.fps:g})"), ("margin_ms", "margin ms"),
                 ("realtime", "real-time"), ("images_per_s", "img/s")],
        rows=rows,
    )
    streams = []
    best = 0
    for k in range(1, args.max_streams + 1):
        r = run_streams(Path(video), k, args.fps, args.seconds, args.stream_batch, args.threads)
        streams.append(r)
        report.notes.append(f"streams k={k}: target {r['fps_target']:g} fps, out {r['fps_out']} fps, latency "
                            f"{r['latency_first_s']} -> {r['latency_last_s']} s, mean batch {r['mean_batch']}: "
                            f"{'sustained' if r['sustained'] else 'NOT sustained (lag grows)'}")
        if not r["sustained"]:
            break
        best = k
    report.summary = {"video": str(video), "fps": args.fps, "streams_sustained": best, "streams": streams,
                      "pre_includes_decode": True}
    report.notes.append("pre = decode + letterbox of N frames; d_batch = pre + infer + post; margin = N/F - d_batch")
    report.emit(args.json)
    return 0
