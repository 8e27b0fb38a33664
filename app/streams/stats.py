"""Per-stream and pipeline statistics: rates over a sliding window, lag, and the real-time condition.

The real-time condition (the paper's): a batch of N frames arriving at F frames/s takes N / F s to
collect, so its total delay d_batch (pre-processing + inference + post-processing) must stay below
N / F, else output lags ever further behind. ``margin = N / F - d_batch``; negative means falling behind.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field


class RateMeter:
    """Events per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 3.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def mark(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            span = max(now - self._times[0], self._times[-1] - self._times[0])
            return (len(self._times) - 1) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


@dataclass
class Ewma:
    """Exponentially weighted mean: recent batches matter, old ones fade."""

    alpha: float = 0.2
    value: float | None = None

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass
class BatchTiming:
    """One batch's stage times and the paper's d_batch; each stream's real-time margin follows from it."""

    size: int
    streams: int
    preprocess_s: float  # sum over the batch's frames
    inference_s: float
    postprocess_s: float  # sum over the batch's frames
    # this pipeline's frames in the batch, per stream (in Ray mode the detector batched them with
    # other readers' frames and HTTP requests, which ``size`` counts and these do not)
    frames_by_stream: Mapping[str, int] = field(default_factory=dict)

    @property
    def d_batch_s(self) -> float:
        return self.preprocess_s + self.inference_s + self.postprocess_s

    def margin_s(self, stream_id: str, target_fps: float) -> float | None:
        """N / F - d_batch for one stream: its N frames of this batch take N / F to arrive at the
        stream's target rate F. Against the target, not the rate that got in: a stream that loses
        half its frames (dropped, or never read while its reader waited) has a negative margin."""
        n = self.frames_by_stream.get(stream_id, 0)
        if n <= 0 or not target_fps > 0:
            return None
        return n / target_fps - self.d_batch_s


@dataclass
class StreamStats:
    """Counters and meters for one stream; written by pipeline threads, read by status calls."""

    fps_in: RateMeter = field(default_factory=RateMeter)
    fps_out: RateMeter = field(default_factory=RateMeter)
    frames_out: int = 0
    errors: int = 0
    last_capture_ts: float | None = None
    last_delivered_at: float | None = None
    last_frame_index: int | None = None
    d_batch: Ewma = field(default_factory=Ewma)
    margin: Ewma = field(default_factory=Ewma)
    batch_size: Ewma = field(default_factory=Ewma)
    latency: Ewma = field(default_factory=Ewma)

    def on_batch(self, timing: BatchTiming, margin_s: float | None) -> None:
        """One of this stream's frames came out of ``timing``'s batch; ``margin_s`` is the stream's margin in it."""
        self.d_batch.add(timing.d_batch_s)
        self.batch_size.add(timing.size)
        if margin_s is not None:
            self.margin.add(margin_s)

    def on_delivered(self, frame_index: int, capture_ts: float, now: float, error: bool) -> None:
        self.frames_out += 1
        self.errors += int(error)
        self.fps_out.mark()
        self.last_capture_ts = capture_ts
        self.last_delivered_at = now
        self.last_frame_index = frame_index
        self.latency.add(now - capture_ts)

    def lag_s(self, now: float, live: bool) -> float | None:
        """How far behind the source the output is: now - capture time of the last delivered frame.

        Once a stream ended its lag is frozen at its last delivery."""
        if self.last_capture_ts is None:
            return None
        return (now if live else (self.last_delivered_at or now)) - self.last_capture_ts


def _r(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def stats_json(s: StreamStats, *, now: float, live: bool, frames_in: int, dropped: int, queue_depth: int,
               in_flight: int) -> dict:
    return {
        "frames_in": frames_in,
        "frames_out": s.frames_out,
        "fps_in": round(s.fps_in.rate(), 2),
        "fps_out": round(s.fps_out.rate(), 2),
        "lag_s": _r(s.lag_s(now, live), 3),
        "latency_s": _r(s.latency.value, 3),
        "queue_depth": queue_depth,
        "in_flight": in_flight,
        "drops": dropped,
        "errors": s.errors,
        "last_frame": s.last_frame_index,
        "batch_size": _r(s.batch_size.value, 2),
        "d_batch_s": _r(s.d_batch.value),
        "realtime_margin_s": _r(s.margin.value),
    }
