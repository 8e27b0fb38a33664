"""Where a stream's per-frame results go: live subscribers (SSE), JSON Lines files, annotated video.

Sinks see results in frame order, one call at a time per stream. A slow live subscriber
never slows the pipeline: its bounded queue drops its own oldest results and counts them.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.errors import BadRequest
from app.pipeline import Detection


@dataclass
class FrameResult:
    """One frame's outcome: detections (or the error that replaced them), in the source's pixels."""

    stream_id: str
    seq: int
    frame_index: int
    capture_ts: float
    detections: list[Detection]
    error: str | None = None
    batch_size: int = 0
    delivered_ts: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, repr=False)  # kept only for the annotated video

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stream": self.stream_id,
            "frame": self.frame_index,
            "seq": self.seq,
            "capture_ts": round(self.capture_ts, 6),
            "latency_ms": round((self.delivered_ts - self.capture_ts) * 1000, 2) if self.delivered_ts else None,
            "batch_size": self.batch_size,
            "detections": [d.to_json() for d in self.detections],
        }
        if self.error:
            out["error"] = self.error
        return out


class Sink(Protocol):
    needs_image: bool

    def write(self, result: FrameResult) -> None: ...

    def close(self) -> None: ...


END = object()  # what a subscription yields once its stream is over


class Subscription:
    """A live follower's bounded queue; ``get`` returns a FrameResult, END, or None on timeout."""

    def __init__(self, maxsize: int = 256) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize)
        self.dropped = 0
        self.end_reason = ""
        self._lock = threading.Lock()

    def offer(self, item: Any) -> None:
        with self._lock:
            while True:
                try:
                    self._q.put_nowait(item)
                    return
                except queue.Full:
                    try:
                        self._q.get_nowait()
                        self.dropped += 1
                    except queue.Empty:
                        pass

    def get(self, timeout: float) -> Any:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


class SubscriberHub:
    """Fans results out to live followers (SSE); ``close`` ends every follower with a reason."""

    needs_image = False

    def __init__(self) -> None:
        self._subs: list[Subscription] = []
        self._lock = threading.Lock()
        self.closed = False
        self.end_reason = ""

    def subscribe(self, maxsize: int = 256) -> Subscription:
        sub = Subscription(maxsize)
        with self._lock:
            if self.closed:
                sub.end_reason = self.end_reason
                sub.offer(END)
            else:
                self._subs.append(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def write(self, result: FrameResult) -> None:
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            s.offer(result)

    def close(self, reason: str = "") -> None:
        with self._lock:
            self.closed, self.end_reason = True, reason
            subs, self._subs = self._subs, []
        for s in subs:
            s.end_reason = reason
            s.offer(END)


def _writable(path: Path, what: str) -> Path:
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        raise BadRequest(f"{what} path {path} is a folder; give a file name")
    if not path.parent.is_dir():
        raise BadRequest(f"{what} folder {path.parent} does not exist; create it first")
    return path


class JsonlSink:
    """One JSON object per frame, flushed per line so `tail -f` and tests see it at once."""

    needs_image = False

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        """``append``: a resumed stream goes on writing where its earlier reader stopped."""
        self.path = _writable(Path(path), "jsonl")
        try:
            self._f = self.path.open("a" if append else "w", encoding="utf-8")
        except OSError as exc:
            raise BadRequest(f"cannot write jsonl file {self.path}: {exc.strerror}") from None
        self.lines = 0

    def write(self, result: FrameResult) -> None:
        self._f.write(json.dumps(result.to_json()) + "\n")
        self._f.flush()
        self.lines += 1

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    @property
    def closed(self) -> bool:
        return self._f.closed


def draw_detections(image: np.ndarray, detections: list[Detection]) -> np.ndarray:
    """Boxes and labels on a copy of the frame."""
    import cv2

    img = image.copy()
    for d in detections:
        x1, y1, x2, y2 = (int(round(v)) for v in d.box)
        cv2.rectangle(img, (x1, y1), (x2, y2), (0, 255, 0), 2)
        cv2.putText(img, f"{d.label} {d.score:.2f}", (x1, max(12, y1 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 255, 0), 1)
    return img


class AnnotatedVideoSink:
    """An mp4/avi of the stream with boxes drawn; opened at the first frame (its size decides the video's)."""

    needs_image = True

    def __init__(self, path: str | Path, fps: float) -> None:
        self.path = _writable(Path(path), "annotated video")
        if self.path.suffix.lower() not in (".mp4", ".avi"):
            raise BadRequest(f"annotated video {self.path.name} must end in .mp4 or .avi")
        self.fps = fps if fps > 0 else 30.0
        self._writer = None
        self.frames = 0
        self._closed = False

    def write(self, result: FrameResult) -> None:
        if result.image is None or self._closed:
            return
        if self._writer is None:
            from app.demo.video import open_video_writer

            h, w = result.image.shape[:2]
            try:
                self._writer = open_video_writer(self.path, self.fps, (w, h))
            except RuntimeError:
                self._closed = True  # said once (the pipeline logs it), not retried on every frame
                raise
        self._writer.write(draw_detections(result.image, result.detections))
        self.frames += 1

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    @property
    def closed(self) -> bool:
        return self._closed


class LatestFrame:
    """The stream's newest frame with its boxes, for the console's live preview. It holds one frame
    (a reference, never a backlog) and draws and encodes a JPEG only when someone asks for it, at most
    once per frame, scaled to ``PREVIEW_MAX_WIDTH``: an unwatched stream pays nothing but keeping its
    frames until post-processing (as ``video_out`` does)."""

    needs_image = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frame: tuple[int, np.ndarray, list[Detection]] | None = None
        self._encoded: tuple[int, bytes] | None = None

    def write(self, result: FrameResult) -> None:
        if result.image is not None:
            with self._lock:
                self._frame = (result.seq, result.image, list(result.detections))

    def jpeg(self) -> bytes | None:
        """The latest annotated frame as JPEG bytes; None before the first frame."""
        import cv2

        from app.constants import PREVIEW_JPEG_QUALITY, PREVIEW_MAX_WIDTH

        with self._lock:
            frame, encoded = self._frame, self._encoded
        if frame is None:
            return encoded[1] if encoded else None
        if encoded is not None and encoded[0] == frame[0]:
            return encoded[1]
        seq, image, detections = frame
        drawn = draw_detections(image, detections)
        if drawn.shape[1] > PREVIEW_MAX_WIDTH:
            scale = PREVIEW_MAX_WIDTH / drawn.shape[1]
            drawn = cv2.resize(drawn, (PREVIEW_MAX_WIDTH, max(1, round(drawn.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(".jpg", drawn, [cv2.IMWRITE_JPEG_QUALITY, PREVIEW_JPEG_QUALITY])
        if not ok:
            return None
        data = buf.tobytes()
        with self._lock:
            self._encoded = (seq, data)
        return data

    def close(self) -> None:
        """Keep the last JPEG (a finished stream still shows its last frame) and drop the raw frame."""
        self.jpeg()
        with self._lock:
            self._frame = None


class ResultLog:
    """The last ``capacity`` results as JSON, numbered from 0, for followers that poll with a cursor
    (the Ray reader actor serves SSE this way: the ingress asks for everything after its cursor)."""

    needs_image = False
    takes_reason = True

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._items: list[dict[str, Any]] = []
        self._first = 0  # number of the oldest kept item
        self._cond = threading.Condition()
        self.ended = False
        self.end_reason = ""

    def write(self, result: FrameResult) -> None:
        with self._cond:
            self._items.append(result.to_json())
            if len(self._items) > self.capacity:
                drop = len(self._items) - self.capacity
                del self._items[:drop]
                self._first += drop
            self._cond.notify_all()

    def close(self, reason: str = "") -> None:
        with self._cond:
            self.ended = True
            self.end_reason = self.end_reason or reason
            self._cond.notify_all()

    def since(self, cursor: int, timeout_s: float, limit: int = 256) -> dict[str, Any]:
        """Items numbered >= ``cursor`` (waits up to ``timeout_s`` for one); ``missed`` counts the ones
        that fell out of the buffer before this follower asked."""
        with self._cond:
            end = self._first + len(self._items)
            if cursor >= end and not self.ended:
                self._cond.wait_for(lambda: self._first + len(self._items) > cursor or self.ended, timeout_s)
                end = self._first + len(self._items)
            start = max(cursor, self._first)
            items = self._items[start - self._first : start - self._first + limit]
            nxt = start + len(items)
            return {"events": items, "cursor": nxt, "missed": max(0, self._first - cursor),
                    "ended": self.ended and nxt >= end, "reason": self.end_reason}


def read_events(lines: Iterable[str]) -> Iterator[tuple[str | None, dict]]:
    """(event name, data) pairs from the lines of the /v1/streams/{id}/events server-sent events."""
    event = None
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            yield event, json.loads(line[6:])
