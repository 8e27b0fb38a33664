"""Sample camera videos of moving shapes, with a per-frame ground-truth sidecar.

The sidecar lets stream tests and benchmarks score detections on a real decoded video file.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2

from app.demo.synthetic import GroundTruth, MovingScene


def ground_truth_path(video_path: str | Path) -> Path:
    """``clip.mp4`` -> ``clip.mp4.gt.jsonl``."""
    video_path = Path(video_path)
    return video_path.with_name(video_path.name + ".gt.jsonl")


def write_sample_video(
    path: str | Path,
    seconds: float = 10.0,
    fps: int = 30,
    width: int = 1280,
    height: int = 720,
    seed: int = 0,
    n_objects: int = 12,
) -> Path:
    """Write an mp4 (mp4v) of a ``MovingScene`` and its ``<path>.gt.jsonl`` sidecar; return the video path.

    Both files are first written under temporary names and renamed at the end, so a crash
    never leaves a video whose sidecar disagrees with it.
    """
    path = Path(path)
    if seconds <= 0 or fps <= 0 or width <= 0 or height <= 0:
        raise ValueError(f"seconds, fps, width and height must be positive (got {seconds}, {fps}, {width}, {height})")
    path.parent.mkdir(parents=True, exist_ok=True)
    n_frames = max(1, round(seconds * fps))
    scene = MovingScene(seed=seed, width=width, height=height, n_objects=n_objects)
    tmp_video = path.with_name(path.name + ".partial" + path.suffix)
    tmp_gt = path.with_name(path.name + ".gt.jsonl.partial")
    writer = open_video_writer(tmp_video, fps, (width, height))
    try:
        with tmp_gt.open("w") as sidecar:
            for i in range(n_frames):
                image, gts = scene.frame(i)
                writer.write(image)
                sidecar.write(json.dumps({"frame": i, "objects": [g.to_json() for g in gts]}) + "\n")
    finally:
        writer.release()
    tmp_video.replace(path)
    tmp_gt.replace(ground_truth_path(path))
    return path


def read_ground_truth(path: str | Path) -> list[list[GroundTruth]]:
    """Ground truth per frame from a video's sidecar (pass the video path or the sidecar path)."""
    path = Path(path)
    sidecar = path if path.name.endswith(".gt.jsonl") else ground_truth_path(path)
    if not sidecar.exists():
        raise FileNotFoundError(f"no ground-truth sidecar {sidecar}; videos from write_sample_video have one")
    frames: list[list[GroundTruth]] = []
    with sidecar.open() as lines:
        for expected, line in enumerate(lines):
            record = json.loads(line)
            if record["frame"] != expected:
                raise ValueError(f"{sidecar}: line {expected + 1} holds frame {record['frame']}, expected {expected}")
            frames.append([GroundTruth.from_json(o) for o in record["objects"]])
    return frames


def open_video_writer(path: Path, fps: float, size: tuple[int, int]):
    """An OpenCV writer for ``path`` (mp4v for .mp4, MJPG otherwise), checked: OpenCV itself
    returns a writer that silently writes nothing when the codec or the folder is missing."""
    codec = "mp4v" if Path(path).suffix.lower() == ".mp4" else "MJPG"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*codec), float(fps), size)
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV could not open a {codec} writer for {path}; check that the folder is writable")
    return writer
