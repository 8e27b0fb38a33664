"""The reader stage: one thread per stream decodes frames, paces them, and hands them to a bounded queue.

Every stream's queue hangs off one ``FrameMux``, which pre-processing workers drain
round-robin, so one fast camera cannot starve nine slow ones. What happens when the
queue is full is the stream's choice: ``drop_oldest`` keeps latency low (a live view),
``queue`` keeps every frame up to the bound (an audit): the reader waits, so lag grows instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

import numpy as np

from app.errors import EdgebatchError
from app.streams.source import Capture, Opener, SourceSpec, open_capture

log = logging.getLogger(__name__)

BehindPolicy = Literal["drop_oldest", "queue"]
BEHIND_POLICIES: tuple[str, ...] = ("drop_oldest", "queue")


class StreamState(str, Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    STOPPED = "stopped"
    FINISHED = "finished"

    @property
    def terminal(self) -> bool:
        return self in (StreamState.FAILED, StreamState.STOPPED, StreamState.FINISHED)


@dataclass
class Frame:
    """One decoded frame; ``capture_ts`` is wall-clock seconds (the camera's clock for paced files)."""

    stream_id: str
    index: int
    capture_ts: float
    image: np.ndarray
    seq: int = -1  # position among the frames of its stream that entered the pipeline (set by the mux)


@dataclass(frozen=True)
class Backoff:
    """Exponential reconnect delays: initial, x factor per attempt, capped; ``max_attempts`` None = forever."""

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 10.0
    max_attempts: int | None = 8

    def delay(self, attempt: int) -> float:
        return min(self.max_s, self.initial_s * self.factor ** max(0, attempt - 1))


class StreamQueue:
    """One stream's bounded frame queue inside a ``FrameMux`` (shares the mux's lock)."""

    def __init__(self, mux: FrameMux, stream_id: str, capacity: int, policy: BehindPolicy) -> None:
        self.mux = mux
        self.stream_id = stream_id
        self.capacity = capacity
        self.policy = policy
        self.items: deque[Frame] = deque()
        self.dropped = 0
        self.taken = 0  # frames handed to pre-processing = next seq
        self.closed = False
        self.on_put: Callable[[], None] | None = None  # the pipeline's fps-in meter

    def put(self, frame: Frame, stop: threading.Event) -> bool:
        """Enqueue; on a full queue drop the oldest frame or wait for room. False once stopped."""
        cond = self.mux.cond
        with cond:
            while self.policy == "queue" and len(self.items) >= self.capacity and not (self.closed or stop.is_set()):
                cond.wait(0.2)
            if self.closed or stop.is_set():
                return False
            if len(self.items) >= self.capacity:
                self.items.popleft()
                self.dropped += 1
            self.items.append(frame)
            if self.on_put is not None:
                self.on_put()
            cond.notify_all()
            return True

    @property
    def depth(self) -> int:
        return len(self.items)


class FrameMux:
    """All streams' queues behind one condition; ``get`` takes frames round-robin across streams."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self._queues: dict[str, StreamQueue] = {}
        self._order: list[str] = []
        self._next = 0
        self._closed = False

    def add(self, stream_id: str, capacity: int, policy: BehindPolicy) -> StreamQueue:
        with self.cond:
            q = StreamQueue(self, stream_id, capacity, policy)
            self._queues[stream_id] = q
            self._order.append(stream_id)
            return q

    def remove(self, stream_id: str) -> int:
        """Forget a stream; its queued frames are discarded (returned count) and a blocked reader wakes."""
        with self.cond:
            q = self._queues.pop(stream_id, None)
            if q is None:
                return 0
            self._order.remove(stream_id)
            q.closed = True
            n = len(q.items)
            q.items.clear()
            self.cond.notify_all()
            return n

    def get(self, timeout: float) -> Frame | None:
        """Next frame, fair across streams; None after ``timeout`` or once closed."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not self._closed:
                n = len(self._order)
                for i in range(n):
                    sid = self._order[(self._next + i) % n]
                    q = self._queues[sid]
                    if q.items:
                        frame = q.items.popleft()
                        frame.seq = q.taken
                        q.taken += 1
                        self._next = (self._next + i + 1) % n
                        self.cond.notify_all()  # room for a blocked reader
                        return frame
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self.cond.wait(remaining)
            return None

    def close(self) -> None:
        with self.cond:
            self._closed = True
            for q in self._queues.values():
                q.closed = True
            self.cond.notify_all()


@dataclass
class ReaderStatus:
    state: StreamState = StreamState.CONNECTING
    reason: str = ""
    frames_read: int = 0
    reconnects: int = 0
    last_error: str = ""
    effective_fps: float = 0.0
    node: str | None = None

    def to_json(self) -> dict:
        return {"state": self.state.value, "reason": self.reason, "frames_read": self.frames_read,
                "reconnects": self.reconnects, "last_error": self.last_error,
                "effective_fps": round(self.effective_fps, 3), "node": self.node}


@dataclass
class ReaderOptions:
    """Pacing: files play in real time at min(file fps, target fps) unless ``realtime`` is False (benchmarks)."""

    target_fps: float = 30.0
    realtime: bool = True
    loop: bool = False  # a file starts again at its end: emulates a camera from a short clip
    backoff: Backoff = field(default_factory=Backoff)
    start_frame: int = 0  # files: the first source frame to read (a restarted reader resumes here)


class FrameReader:
    """Reads one source in its own thread into a ``StreamQueue``; reconnects live sources with backoff."""

    def __init__(
        self,
        stream_id: str,
        spec: SourceSpec,
        queue: StreamQueue,
        options: ReaderOptions | None = None,
        *,
        opener: Opener = open_capture,
        on_exit: Callable[[FrameReader], None] | None = None,
        clock: Callable[[], float] = time.time,
        node: str | None = None,
    ) -> None:
        self.stream_id = stream_id
        self.spec = spec
        self.queue = queue
        self.options = options or ReaderOptions()
        self._opener = opener
        self._on_exit = on_exit
        self._clock = clock
        self._stop = threading.Event()
        self._status = ReaderStatus(node=node)
        self._lock = threading.Lock()
        self._cap: Capture | None = None
        self._thread = threading.Thread(target=self._run, name=f"edgebatch-reader-{stream_id}", daemon=True)

    # -- control ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; it releases the capture itself (a blocking read may hold it a moment)."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def capture_open(self) -> bool:
        return self._cap is not None

    def status(self) -> ReaderStatus:
        with self._lock:
            return ReaderStatus(**vars(self._status))

    def _set(self, **changes) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._status, k, v)

    # -- the thread ------------------------------------------------------
    def _run(self) -> None:
        try:
            self._read_loop()
        except Exception as exc:  # never a silent dead thread: the stream shows why
            log.exception("reader %s crashed", self.stream_id)
            self._set(state=StreamState.FAILED, reason=f"reader crashed on '{self.spec.text}': {exc}")
        finally:
            self._release()
            if self._stop.is_set() and not self.status().state.terminal:
                self._set(state=StreamState.STOPPED, reason="stopped by request")
            if self._on_exit is not None:
                self._on_exit(self)

    def _release(self) -> None:
        cap, self._cap = self._cap, None
        if cap is not None:
            cap.release()

    def _open(self) -> tuple[float, float]:
        """Open the source; return (native fps, effective fps)."""
        import cv2

        self._cap = self._opener(self.spec)
        native = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        native = native if 0.0 < native <= 1000.0 else 0.0
        target = self.options.target_fps
        effective = min(native, target) if native else target
        self._set(effective_fps=effective)
        return native, effective

    def _seek(self, frame: int) -> int:
        """Position a file at source frame ``frame`` (a resumed stream); the index reached."""
        import cv2

        seek = getattr(self._cap, "set", None)
        if seek is not None and seek(cv2.CAP_PROP_POS_FRAMES, float(frame)):
            return frame
        reached = 0
        while reached < frame and self._cap.grab():  # captures that cannot seek: skip without decoding
            reached += 1
        return reached

    def _read_loop(self) -> None:
        native, effective = self._open()
        self._set(state=StreamState.RUNNING, reason="")
        is_file = not self.spec.is_live
        realtime = self.options.realtime
        step = (native / effective) if (is_file and native and effective) else 1.0  # source frames per output frame
        src_index = 0  # index of the next frame the capture will return
        if is_file and self.options.start_frame > 0:
            src_index = self._seek(self.options.start_frame)
        out = 0  # frames emitted since the (re)start of pacing
        base_index = src_index
        t0 = self._clock()
        min_gap = 1.0 / effective if effective > 0 else 0.0
        last_emit = -1e18
        while not self._stop.is_set():
            if is_file:
                wanted = base_index + int(out * step + 1e-9)
                while src_index < wanted:  # skip frames the target fps does not need, without decoding them
                    if not self._cap.grab():
                        break
                    src_index += 1
                due = t0 + out / effective if effective else self._clock()
                if realtime:
                    delay = due - self._clock()
                    if delay > 0 and self._stop.wait(delay):
                        break
            ok, image = self._cap.read()
            if not ok or image is None:
                if is_file:
                    if self.options.loop and src_index > 0:
                        # a looped file stands in for a camera: if it vanished, reconnect like one
                        self._release()
                        try:
                            native, effective = self._open()
                        except EdgebatchError as exc:
                            self._set(last_error=exc.message)
                            if not self._reconnect("source gone at loop"):
                                return
                            native, effective = self.status().effective_fps, self.status().effective_fps
                        base_index, src_index, out, t0 = 0, 0, 0, self._clock()
                        step = (native / effective) if (native and effective) else 1.0
                        continue
                    self._set(state=StreamState.FINISHED, reason=f"end of file after {src_index} frames")
                    return
                if not self._reconnect("read failed"):
                    return
                t0, out, last_emit = self._clock(), 0, -1e18
                continue
            if is_file:
                index = src_index
                src_index += 1
                capture_ts = (t0 + out / effective) if (realtime and effective) else self._clock()
                out += 1
            else:
                capture_ts = self._clock()
                if capture_ts - last_emit < min_gap * 0.999:  # camera faster than the target fps: skip this one
                    continue
                last_emit = capture_ts
                index = None
            if not self._emit(index, capture_ts, image):
                return

    def _emit(self, index: int | None, capture_ts: float, image: np.ndarray) -> bool:
        """Count and enqueue one frame; live sources number frames by arrival (across reconnects)."""
        with self._lock:
            if index is None:
                index = self._status.frames_read
            self._status.frames_read += 1
        return self.queue.put(Frame(self.stream_id, index, capture_ts, image), self._stop)

    def _reconnect(self, why: str) -> bool:
        """Reopen a lost live source with exponential backoff; False when stopped or out of attempts."""
        self._release()
        backoff = self.options.backoff
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            if backoff.max_attempts is not None and attempt > backoff.max_attempts:
                self._set(state=StreamState.FAILED,
                          reason=f"lost source '{self.spec.text}' ({why}); gave up after {backoff.max_attempts} "
                                 f"reconnect attempts: {self.status().last_error}")
                return False
            delay = backoff.delay(attempt)
            limit = backoff.max_attempts if backoff.max_attempts is not None else "inf"
            self._set(state=StreamState.RECONNECTING,
                      reason=f"lost source '{self.spec.text}' ({why}); reconnect attempt {attempt}/{limit} in {delay:.2f} s")
            log.warning("stream %s: %s", self.stream_id, self.status().reason)
            if self._stop.wait(delay):
                return False
            try:
                self._open()
                ok, image = self._cap.read()
                if not ok or image is None:
                    raise EdgebatchError("opened but no frame came")
            except EdgebatchError as exc:
                self._release()
                self._set(last_error=exc.message)
                continue
            self._set(state=StreamState.RUNNING, reason=f"reconnected after {attempt} attempt(s)",
                      reconnects=self.status().reconnects + 1)
            return self._emit(None, self._clock(), image)
        return False
