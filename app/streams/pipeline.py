"""The staged stream pipeline (the paper's Figure 3c), Ray-free.

    readers (one thread per stream) -> FrameMux (bounded per-stream queues, behind policy)
      -> pre-processing workers (letterbox)       -> bounded queue
      -> engine stage (forms batches, submits)     -> bounded in-flight queue
      -> post-processing (boxes + NMS, in order)   -> sinks (JSON Lines, video, live followers)

Every hand-off is a bounded queue, so the engine is fed while the CPU decodes the next
frames, and a slow stage pushes back instead of growing memory. The engine stage is an
``EngineStage``: ``LocalEngineStage`` batches here and runs an ONNX engine (bench, tests,
one process); the Ray reader actor plugs in a stage that hands each frame to the detector
deployment, whose ``@serve.batch`` forms the batches across streams.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from app.errors import BadRequest, NotFound, one_line
from app.pipeline import Letterbox, Postprocessor, PostprocessSettings, prepare, to_input
from app.streams.reader import (
    BEHIND_POLICIES,
    Backoff,
    BehindPolicy,
    Frame,
    FrameMux,
    FrameReader,
    ReaderOptions,
    StreamQueue,
    StreamState,
)
from app.streams.sinks import FrameResult, Sink, SubscriberHub
from app.streams.source import Opener, SourceInfo, SourceSpec, open_capture, probe_source
from app.streams.stats import BatchTiming, StreamStats, stats_json

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often idle stage threads look at the stop flag


@dataclass(frozen=True)
class EngineOutput:
    """What the engine stage returns for submitted rows: one output row each, plus batch facts."""

    rows: list[np.ndarray]
    inference_s: float
    batch_sizes: list[int]  # items in the batch each row actually ran in (Serve may merge streams)


class EngineStage(Protocol):
    """Batched inference behind the pipeline: ``submit`` takes letterboxed uint8 images and must not
    wait for the result."""

    max_local_batch: int

    def submit(self, rows: list[np.ndarray]) -> Callable[[], EngineOutput]: ...


class LocalEngineStage:
    """Runs ``run_batch`` (e.g. ``Detector.predict``'s array or an engine) in the engine thread.

    ``submit`` computes at once and returns a done waiter: with one engine the stage itself
    is the serialisation point, as on one accelerator."""

    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_local_batch: int = 8) -> None:
        self.run_batch = run_batch
        self.max_local_batch = max_local_batch

    def submit(self, rows: list[np.ndarray]) -> Callable[[], EngineOutput]:
        t0 = time.perf_counter()
        out = self.run_batch(to_input(rows))  # the batch is normalised here, in one call
        dt = time.perf_counter() - t0
        result = EngineOutput([out[i] for i in range(len(rows))], dt, [len(rows)] * len(rows))
        return lambda: result


@dataclass
class StreamOptions:
    """What a user chooses per stream (the POST body's options)."""

    fps: float = 30.0
    behind: BehindPolicy = "drop_oldest"
    queue_bound: int = 8
    realtime: bool = True  # pace files at fps; False reads as fast as the pipeline takes (bench)
    loop: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    start_frame: int = 0  # files: resume at this source frame (a reader restarted after a fault)

    def __post_init__(self) -> None:
        if not (0 < self.fps <= 240):
            raise BadRequest(f"fps must be in (0, 240], got {self.fps}")
        if self.behind not in BEHIND_POLICIES:
            raise BadRequest(f"behind must be one of {', '.join(BEHIND_POLICIES)}, got {self.behind!r}")
        if not (1 <= self.queue_bound <= 10_000):
            raise BadRequest(f"queue_bound must be between 1 and 10000, got {self.queue_bound}")


@dataclass
class _Work:
    frame: Frame
    letterbox: Letterbox | None
    tensor: np.ndarray | None  # the letterboxed BGR uint8 image: floats only once the batch is formed
    pre_s: float
    error: str | None = None


class _Stream:
    """One stream's parts inside a pipeline."""

    def __init__(self, stream_id: str, spec: SourceSpec, info: SourceInfo, options: StreamOptions,
                 queue_: StreamQueue, sinks: list[Sink], hub: SubscriberHub) -> None:
        self.id = stream_id
        self.spec = spec
        self.info = info
        self.options = options
        self.queue = queue_
        self.sinks = sinks
        self.hub = hub
        self.stats = StreamStats()
        self.reader: FrameReader | None = None
        self.created_at = time.time()
        self.next_seq = 0
        self.pending: dict[int, FrameResult] = {}
        self.delivered = 0
        self.reader_done = threading.Event()
        self.finished = threading.Event()
        self.lock = threading.Lock()
        self.batch_sizes_seen: dict[int, int] = {}
        self.needs_image = any(getattr(s, "needs_image", False) for s in sinks)

    def target_fps(self) -> float:
        """F of this stream's real-time condition: the rate its reader paces at (min of the file's and the
        asked fps), else the asked fps; never the rate that got through."""
        effective = self.reader.status().effective_fps if self.reader is not None else 0.0
        return effective if effective > 0 else self.options.fps


class StreamPipeline:
    """Many streams through one staged pipeline; thread-safe control methods."""

    def __init__(
        self,
        engine: EngineStage,
        *,
        input_size: tuple[int, int],
        post: Postprocessor,
        batch_wait_s: float = 0.005,
        preprocess_workers: int = 1,
        stage_bound: int = 32,
        max_in_flight: int = 4,
        max_taken: int | None = None,
    ) -> None:
        """``max_taken``: at most this many frames taken from the streams' queues and not yet delivered.
        Pre-processing then takes a frame only when one has left, so a frame never ages in a hand-off
        that cannot drop it: behind a slow detector, frames wait (and ``drop_oldest`` drops them) in
        their stream's queue, and the lag stays bounded (the Ray readers use this)."""
        self.engine = engine
        self.input_size = input_size
        self.post = post
        self.batch_wait_s = batch_wait_s
        self.mux = FrameMux()
        self._pre_q: queue.Queue[_Work] = queue.Queue(stage_bound)
        self._flight_q: queue.Queue[tuple[list[_Work], Callable[[], EngineOutput]]] = queue.Queue(max_in_flight)
        self._taken = threading.BoundedSemaphore(max_taken) if max_taken else None
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._preprocess_loop, name=f"edgebatch-pre-{i}", daemon=True)
                         for i in range(preprocess_workers)]
        self._threads.append(threading.Thread(target=self._engine_loop, name="edgebatch-engine", daemon=True))
        self._threads.append(threading.Thread(target=self._post_loop, name="edgebatch-post", daemon=True))
        self._started = False

    # -- control -----------------------------------------------------------
    def start(self) -> StreamPipeline:
        if not self._started:
            self._started = True
            for t in self._threads:
                t.start()
        return self

    def add_stream(
        self,
        source: str | int | SourceSpec,
        options: StreamOptions | None = None,
        *,
        sinks: Sequence[Sink] | Callable[[], Sequence[Sink]] = (),
        stream_id: str | None = None,
        opener: Opener = open_capture,
        node: str | None = None,
    ) -> str:
        """Probe the source (BadRequest if unreadable), then start reading it.

        ``source`` may be a ``SourceSpec`` an allowlist already checked. ``sinks`` may be a
        callable that opens them: it runs only after the probe succeeded, so a refused
        stream never creates or truncates an output file.
        """
        options = options or StreamOptions()
        spec = source if isinstance(source, SourceSpec) else SourceSpec.parse(source)
        info = probe_source(spec, opener)
        if callable(sinks):
            sinks = sinks()
        sid = stream_id or uuid.uuid4().hex[:8]
        with self._lock:
            if sid in self._streams:
                raise BadRequest(f"stream id {sid!r} already exists")
            q = self.mux.add(sid, options.queue_bound, options.behind)
            stream = _Stream(sid, spec, info, options, q, list(sinks), SubscriberHub())
            q.on_put = stream.stats.fps_in.mark
            self._streams[sid] = stream
        reader = FrameReader(
            sid, spec, q,
            ReaderOptions(target_fps=options.fps, realtime=options.realtime, loop=options.loop, backoff=options.backoff,
                          start_frame=options.start_frame),
            opener=opener, on_exit=lambda r: self._reader_exited(stream), node=node,
        )
        stream.reader = reader
        self.start()
        reader.start()
        return sid

    def _get(self, stream_id: str) -> _Stream:
        with self._lock:
            s = self._streams.get(stream_id)
        if s is None:
            raise NotFound(f"no stream {stream_id!r}; list streams with GET /v1/streams")
        return s

    @property
    def stream_ids(self) -> list[str]:
        with self._lock:
            return list(self._streams)

    def subscribe(self, stream_id: str, maxsize: int = 256):
        return self._get(stream_id).hub.subscribe(maxsize)

    def remove_stream(self, stream_id: str, timeout_s: float = 5.0) -> dict:
        """Stop the reader, drop its queued frames, close its sinks; returns its last status."""
        s = self._get(stream_id)
        assert s.reader is not None
        s.reader.stop()
        s.reader.join(timeout_s)
        self.mux.remove(stream_id)
        self._finalize(s, "stopped by request")
        status = self.status(stream_id)
        with self._lock:
            self._streams.pop(stream_id, None)
        return status

    def wait_finished(self, stream_id: str, timeout_s: float) -> bool:
        return self._get(stream_id).finished.wait(timeout_s)

    def close(self) -> None:
        for sid in self.stream_ids:
            try:
                self.remove_stream(sid, timeout_s=2.0)
            except NotFound:
                pass
        self._stop.set()
        self.mux.close()
        for t in self._threads:
            if t.is_alive():
                t.join(2.0)

    # -- status --------------------------------------------------------------
    def status(self, stream_id: str) -> dict:
        s = self._get(stream_id)
        assert s.reader is not None
        rs = s.reader.status()
        state = rs.state
        if state.terminal and not s.finished.is_set() and state != StreamState.FAILED:
            state_text = "draining"  # reader done, frames still in the pipeline
        else:
            state_text = state.value
        now = time.time()
        with s.lock:
            seen = dict(sorted(s.batch_sizes_seen.items()))
        return {
            "id": s.id,
            "source": s.spec.text,
            "kind": s.spec.kind,
            "state": state_text,
            "reason": rs.reason,
            "reconnects": rs.reconnects,
            "last_error": rs.last_error,
            "node": rs.node,
            "options": {"fps": s.options.fps, "behind": s.options.behind, "queue_bound": s.options.queue_bound,
                        "loop": s.options.loop},
            "source_info": s.info.to_json(),
            "effective_fps": rs.effective_fps,
            "created_at": round(s.created_at, 3),
            "finished": s.finished.is_set(),
            "batch_sizes_seen": seen,
            "followers": s.hub.subscribers,
            **stats_json(s.stats, now=now, live=not rs.state.terminal, frames_in=rs.frames_read,
                         dropped=s.queue.dropped, queue_depth=s.queue.depth,
                         in_flight=max(0, s.queue.taken - s.delivered)),
        }

    # -- stages --------------------------------------------------------------
    def _preprocess_loop(self) -> None:
        while not self._stop.is_set():
            if self._taken is not None and not self._taken.acquire(timeout=POLL_S):
                continue
            frame = self.mux.get(POLL_S)
            if frame is None:
                self._give_back(1)
                continue
            t0 = time.perf_counter()
            try:
                item = prepare(frame.image, self.input_size)
                work = _Work(frame, item.letterbox, item.image, time.perf_counter() - t0)
            except Exception as exc:  # one bad frame fails itself, not the stream
                work = _Work(frame, None, None, time.perf_counter() - t0, error=f"pre-processing failed: {exc}")
            with self._lock:
                s = self._streams.get(frame.stream_id)
            if s is None or not s.needs_image:
                frame.image = None  # type: ignore[assignment]  # free the decoded frame early
            self._put(self._pre_q, work)

    def _give_back(self, frames: int) -> None:
        """Frames delivered (or never taken): room for pre-processing to take as many again."""
        if self._taken is not None:
            for _ in range(frames):
                self._taken.release()

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _engine_loop(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._pre_q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            batch = [first]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.engine.max_local_batch:
                remaining = deadline - time.monotonic()
                try:
                    batch.append(self._pre_q.get(timeout=remaining) if remaining > 0 else self._pre_q.get_nowait())
                except queue.Empty:
                    break
            good = [w for w in batch if w.tensor is not None]
            try:
                waiter = self.engine.submit([w.tensor for w in good]) if good else (lambda: EngineOutput([], 0.0, []))
            except Exception as exc:
                waiter = _failed(exc)
            self._put(self._flight_q, (batch, waiter))

    def _post_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch, waiter = self._flight_q.get(timeout=POLL_S)
            except queue.Empty:
                continue
            good = [w for w in batch if w.tensor is not None]
            error: str | None = None
            try:
                out = waiter()
            except Exception as exc:  # the detector failed this batch: its frames say so, the stream goes on
                out, error = EngineOutput([], 0.0, [len(good)] * len(good)), f"inference failed: {one_line(exc)}"
            t0 = time.perf_counter()
            dets_by_id: dict[int, list] = {}
            if error is None and good:
                try:
                    dets = self.post.decode(np.stack(out.rows), [w.letterbox for w in good])
                    dets_by_id = {id(w): d for w, d in zip(good, dets)}
                except Exception as exc:
                    error = f"post-processing failed: {exc}"
            post_s = time.perf_counter() - t0
            sizes = {id(w): n for w, n in zip(good, out.batch_sizes)} if out.batch_sizes else {}
            n_batch = max(out.batch_sizes) if out.batch_sizes else len(batch)
            timing = BatchTiming(
                size=n_batch, streams=len({w.frame.stream_id for w in batch}),
                preprocess_s=sum(w.pre_s for w in batch) / max(1, len(batch)) * n_batch,
                inference_s=out.inference_s,
                postprocess_s=post_s / max(1, len(batch)) * n_batch,
                frames_by_stream=Counter(w.frame.stream_id for w in batch),
            )
            now = time.time()
            try:
                for w in batch:
                    r = FrameResult(
                        stream_id=w.frame.stream_id, seq=w.frame.seq, frame_index=w.frame.index,
                        capture_ts=w.frame.capture_ts, detections=dets_by_id.get(id(w), []),
                        error=w.error or error, batch_size=sizes.get(id(w), n_batch), delivered_ts=now,
                        timings={"preprocess_s": w.pre_s, "inference_s": out.inference_s, "postprocess_s": post_s / len(batch)},
                        image=w.frame.image,
                    )
                    self._deliver(r, timing)
            finally:
                self._give_back(len(batch))

    def _deliver(self, r: FrameResult, timing: BatchTiming) -> None:
        with self._lock:
            s = self._streams.get(r.stream_id)
        if s is None:
            return  # removed while in flight
        margin = timing.margin_s(s.id, s.target_fps())
        with s.lock:
            if s.finished.is_set():
                return
            s.pending[r.seq] = r
            ready = []
            while s.next_seq in s.pending:
                ready.append(s.pending.pop(s.next_seq))
                s.next_seq += 1
            s.batch_sizes_seen[r.batch_size] = s.batch_sizes_seen.get(r.batch_size, 0) + 1
            for item in ready:
                s.stats.on_batch(timing, margin)
                s.stats.on_delivered(item.frame_index, item.capture_ts, time.time(), item.error is not None)
                for sink in s.sinks:
                    try:
                        sink.write(item)
                    except Exception as exc:  # a full disk must not kill the pipeline
                        log.warning("stream %s: sink %s failed: %s", s.id, type(sink).__name__, exc)
                item.image = None
                s.hub.write(item)
                s.delivered += 1
        self._maybe_finished(s)

    def _reader_exited(self, s: _Stream) -> None:
        s.reader_done.set()
        self._maybe_finished(s)

    def _maybe_finished(self, s: _Stream) -> None:
        if s.reader_done.is_set() and s.queue.depth == 0 and s.delivered >= s.queue.taken:
            reason = s.reader.status().reason if s.reader else ""
            self._finalize(s, reason)

    def _finalize(self, s: _Stream, reason: str) -> None:
        with s.lock:
            if s.finished.is_set():
                return
            s.finished.set()
            for sink in s.sinks:
                try:
                    sink.close(reason) if getattr(sink, "takes_reason", False) else sink.close()
                except Exception as exc:
                    log.warning("stream %s: closing sink failed: %s", s.id, exc)
        s.hub.close(reason)


def _failed(exc: Exception) -> Callable[[], EngineOutput]:
    def waiter() -> EngineOutput:
        raise exc

    return waiter


def demo_engine_stage(max_batch: int = 8, threads: int | None = None) -> tuple[LocalEngineStage, Postprocessor, tuple[int, int]]:
    """The bundled demo detector (dynamic batch axis) as a local engine stage, no registry and no Ray:
    bench and tests. Each formed batch runs at its own size, never padded."""
    import json

    import onnxruntime as ort

    from app.demo import DETECTOR_META, DETECTOR_ONNX

    meta = json.loads(DETECTOR_META.read_text())
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    from app.engines.onnxrt import choose_providers

    providers = choose_providers(ort.get_available_providers())  # CUDA/TensorRT where onnxruntime-gpu has them
    session = ort.InferenceSession(str(DETECTOR_ONNX), sess_options=so, providers=providers)
    name = session.get_inputs()[0].name
    stage = LocalEngineStage(lambda batch: session.run(None, {name: batch})[0], max_local_batch=max_batch)
    labels = meta["labels"]
    return stage, Postprocessor(labels, PostprocessSettings(layout=meta.get("layout", "auto"))), tuple(meta["input_size"])
