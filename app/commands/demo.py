"""`edgebatch sample-video` and `edgebatch demo`: the project's own video, through the running detector."""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from pathlib import Path

from app.errors import ConfigError
from app.instance import recorded_http_url
from app.readiness import require_ready
from app.state import StateDir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample-video", help="write the synthetic sample video (known moving shapes) and its ground truth")
    p.add_argument("--out", type=Path, default=None, help="output .mp4 (default .edgebatch/videos/sample.mp4)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=720)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_sample_video)

    p = sub.add_parser("demo", help="send the sample video's frames to the running detector and score them")
    p.add_argument("--url", default=None,
                   help="base URL of the running app (default: the address `edgebatch up` recorded for this instance)")
    p.add_argument("--video", type=Path, default=None, help="video to send (default: the generated sample)")
    p.add_argument("--frames", type=int, default=150, help="frames to send")
    p.add_argument("--clients", type=int, default=8, help="concurrent requests (so the batcher forms batches)")
    p.set_defaults(func=cmd_demo)


def default_video(state: StateDir) -> Path:
    return state.videos / "sample.mp4"


def ensure_sample_video(state: StateDir) -> Path:
    from app.demo.video import write_sample_video

    path = default_video(state)
    if not path.exists() or not Path(str(path) + ".gt.jsonl").exists():
        state.ensure()
        write_sample_video(path)
    return path


def cmd_sample_video(args: argparse.Namespace) -> int:
    from app.demo.video import write_sample_video

    state = StateDir.default().ensure()
    out = args.out or default_video(state)
    if out.suffix.lower() not in (".mp4", ".avi"):
        raise ConfigError(f"--out must end in .mp4 or .avi, got {out.name}")
    if args.seconds <= 0 or args.fps <= 0:
        raise ConfigError("--seconds and --fps must be positive")
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    path = write_sample_video(out, seconds=args.seconds, fps=args.fps, width=args.width, height=args.height, seed=args.seed)
    print(f"wrote {path} ({int(args.seconds * args.fps)} frames, {args.width}x{args.height} @ {args.fps} fps) "
          f"and {path}.gt.jsonl in {time.perf_counter() - t0:.1f} s")
    return 0


async def _send_frames(url: str, jpegs: list[bytes], clients: int) -> list[tuple[int, dict | None, float]]:
    import aiohttp

    results: list[tuple[int, dict | None, float]] = [(0, None, 0.0)] * len(jpegs)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jpegs)):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                t0 = time.perf_counter()
                async with session.post(url, data=jpegs[i], headers={"Content-Type": "image/jpeg"}) as r:
                    body = await r.json()
                    results[i] = (r.status, body, time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def cmd_demo(args: argparse.Namespace) -> int:
    import cv2

    from app.bench.report import percentiles
    from app.demo.video import read_ground_truth
    from app.evaluation import MatchCounts, match

    state = StateDir.default().ensure()
    video = args.video or ensure_sample_video(state)
    if not video.exists():
        raise ConfigError(f"video {video} does not exist; make one with `edgebatch sample-video`")
    args.url = (args.url or recorded_http_url(state)).rstrip("/")
    require_ready(args.url)
    cap = cv2.VideoCapture(str(video))
    frames, jpegs = [], []
    while len(jpegs) < args.frames:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
        jpegs.append(cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    cap.release()
    if not jpegs:
        raise ConfigError(f"could not read frames from {video}")
    gt_path = Path(str(video) + ".gt.jsonl")
    gts = read_ground_truth(video) if gt_path.exists() else None

    t0 = time.perf_counter()
    results = asyncio.run(_send_frames(f"{args.url}/v1/detect", jpegs, args.clients))
    wall = time.perf_counter() - t0
    failed = [r for r in results if r[0] != 200]
    counts = MatchCounts()
    batch_items: Counter[int] = Counter()
    n_dets = 0
    for i, (status, body, _) in enumerate(results):
        if status != 200 or body is None:
            continue
        batch_items[body.get("items_in_batch", 0)] += 1
        dets = [(d["box"], d["class_id"]) for d in body["detections"]]
        n_dets += len(dets)
        if gts is not None:
            counts.add(match(dets, [(g.box, g.class_id) for g in gts[i]]))
    lat = percentiles([r[2] for r in results if r[0] == 200])
    first = results[0][1] or {}
    print(f"sent {len(jpegs)} frames of {video.name} to {args.url}/v1/detect with {args.clients} concurrent clients")
    print(f"model {first.get('model')} v{first.get('version')} ({first.get('backend')}), variant batch size {first.get('batch_size')}")
    print(f"{len(jpegs) - len(failed)} ok, {len(failed)} failed; {len(jpegs) / wall:.1f} frames/s; "
          f"latency p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms")
    print(f"detections: {n_dets} ({n_dets / max(1, len(jpegs) - len(failed)):.1f} per frame); "
          f"items per formed batch: {dict(sorted(batch_items.items()))}")
    if gts is not None:
        print(f"against ground truth (IoU >= 0.5, same class): recall {counts.recall:.3f}, precision {counts.precision:.3f}")
    if results[0][0] == 200:
        img = frames[0].copy()
        for d in results[0][1]["detections"]:
            x1, y1, x2, y2 = (int(v) for v in d["box"])
            cv2.rectangle(img, (x1, y1), (x2, y2), (0, 255, 0), 2)
            cv2.putText(img, f"{d['label']} {d['score']:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
        out = state.videos / "demo_frame0_annotated.jpg"
        cv2.imwrite(str(out), img)
        print(f"annotated first frame: {out}")
    return 1 if failed else 0
