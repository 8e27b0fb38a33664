"""The ``edgebatch-streams`` Serve application: camera and file streams through the shared detector.

Each stream's reader is a Ray actor (small ``num_cpus``), placed on the node that owns the
camera when one is named. Inside it the Ray-free staged pipeline decodes and letterboxes
frames, hands each frame to the detector deployment through a DeploymentHandle
(``detect`` with a tensor item: the same ``@serve.batch`` batcher and batch handler as HTTP
requests, so frames of many streams share batches), and post-processes the rows in order with
the detector's own thresholds (``DetectorInfo.postprocess``). The ingress only keeps the
stream table and relays status and events; it never touches frames.
"""

# no `from __future__ import annotations`: FastAPI must see real types on the routes

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import ray
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from app.config import parse_config
from app.constants import DETECTOR_APP, DETECTOR_DEPLOYMENT, READER_FRAMES_IN_FLIGHT
from app.detector import DetectRequest, ItemResult
from app.errors import BadRequest, EdgebatchError, NotFound, Unavailable
from app.pipeline import Postprocessor
from app.replica_status import DetectorInfo
from app.security.auth import TokenCheck
from app.security.sources import SourcePolicy, redact
from app.streams.admission import AdmissionConfig, admit, stream_capacity
from app.streams.pipeline import EngineOutput, StreamPipeline
from app.streams.records import (
    MAX_RELAUNCHES,
    PROGRESS_INTERVAL_S,
    Interruption,
    ReaderProgress,
    StreamRecord,
    is_stream_key,
    next_frame_after,
    progress_key,
    resumed_totals,
)
from app.streams.source import SourceSpec
from deployments.http import (
    CollectionPath,
    as_edgebatch_error,
    error_responses,
    install_error_handlers,
    require_token_for_writes,
)

log = logging.getLogger("ray.serve")

ACTOR_NAMESPACE = "edgebatch-streams"
RECORD_PREFIX = "streams"  # the stream table's records in the GCS KV store (deployments.records)
TERMINAL_STATES = ("finished", "failed", "stopped")
api = FastAPI(title="edgebatch streams", description="Real-time video analytics through the batched detector",
              dependencies=[Depends(require_token_for_writes(TokenCheck()))])
install_error_handlers(api)


api.add_middleware(CollectionPath)


def actor_name(stream_id: str) -> str:
    return f"edgebatch-stream-{stream_id}"


class StreamRequest(BaseModel):
    """The POST /v1/streams body."""

    model_config = ConfigDict(extra="forbid")

    source: str | int = Field(..., description="a video file in the server's media folder (name or path), an "
                              "allowed camera URL (rtsp://, https://), or a camera index when enabled")
    model: str | None = Field(None, description="registered model; default the detector's")
    fps: float = Field(30.0, gt=0, le=240)
    behind: Literal["drop_oldest", "queue"] = "drop_oldest"
    queue_bound: int = Field(8, ge=1, le=10000)
    jsonl: str | None = Field(None, description="file name (.jsonl) in the output folder for per-frame results")
    video_out: str | None = Field(None, description="file name (.mp4/.avi) in the output folder for annotated video")
    node: str | None = Field(None, description="run the reader on this node: node id, IP or hostname")
    loop: bool = Field(False, description="replay a file forever (a camera stand-in)")
    reconnect_attempts: int | None = Field(8, ge=0, le=100000, description="None = retry forever")
    reconnect_initial_s: float = Field(0.5, gt=0, le=60)
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,40}$")


class StreamsAppConfig(BaseModel):
    """The streams app's ``args`` in the Serve config, validated at build time."""

    model_config = ConfigDict(extra="forbid")

    detector_app: str = DETECTOR_APP
    reader_num_cpus: float = Field(0.1, gt=0, le=16)
    output_folder: str | None = Field(None, description="where jsonl/video_out files go; default <state>/outputs")
    sources: SourcePolicy = Field(default_factory=SourcePolicy)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)


def _parse_request(data: Any) -> StreamRequest:
    try:
        return StreamRequest.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        raise BadRequest("invalid stream request: " + "; ".join(problems)) from None


def resolve_node(wanted: str, nodes: list[dict[str, Any]]) -> str:
    """A node id, IP or hostname -> the alive node's id; BadRequest listing the alive nodes otherwise."""
    alive = [n for n in nodes if n.get("Alive")]
    for n in alive:
        if wanted in (n.get("NodeID"), n.get("NodeManagerAddress"), n.get("NodeManagerHostname"), n.get("NodeName")):
            return n["NodeID"]
    prefix = [n for n in alive if len(wanted) >= 6 and n["NodeID"].startswith(wanted)]
    if len(prefix) == 1:
        return prefix[0]["NodeID"]
    known = ", ".join(f"{n['NodeID'][:12]} ({n.get('NodeManagerAddress')})" for n in alive)
    raise BadRequest(f"node {wanted!r} is not an alive Ray node; alive nodes: {known}")


class HandleEngineStage:
    """The engine stage of a Ray reader: each frame goes to the detector deployment on its own
    (``max_local_batch`` 1); Serve's batcher forms batches across every stream and HTTP client.
    A frame travels as its letterboxed uint8 image (a quarter of the float32 bytes; Ray passes a
    numpy array through its object store without a copy on read) and the replica normalises the
    whole batch at once."""

    max_local_batch = 1

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def submit(self, rows: list[np.ndarray]) -> Callable[[], EngineOutput]:
        responses = [self.handle.detect.remote(DetectRequest.letterboxed(r)) for r in rows]

        def wait() -> EngineOutput:
            outs: list[ItemResult] = [r.result(timeout_s=60) for r in responses]
            return EngineOutput([o.output for o in outs], max(o.batch.inference_s for o in outs),
                                [o.batch.items for o in outs])

        return wait


def reader_pipeline(handle: Any, detector_info: DetectorInfo) -> StreamPipeline:
    """A reader's staged pipeline: decode and letterbox here, the detector through ``handle``,
    post-processing here with the detector's own thresholds."""
    size = detector_info.input_size or (320, 320)
    return StreamPipeline(
        HandleEngineStage(handle),
        input_size=(int(size[0]), int(size[1])),
        post=Postprocessor(detector_info.labels, detector_info.postprocess),
        batch_wait_s=0.0,
        # few frames between the reader's queue and the detector: when the detector falls behind,
        # frames wait in the stream's own queue, where ``behind`` (drop_oldest) applies, not in
        # hand-offs that never drop (the lag then stays bounded instead of growing to seconds)
        stage_bound=1,
        max_in_flight=READER_FRAMES_IN_FLIGHT,
        max_taken=READER_FRAMES_IN_FLIGHT,
    )


@ray.remote(num_cpus=0.1, max_concurrency=8, max_restarts=-1, max_task_retries=0)
class StreamReaderActor:
    """One stream: reader, pre- and post-processing on this node; inference through the detector handle.

    Detached and restartable: it outlives the streams ingress (a restarted ingress finds it by name),
    and when its own process dies Ray starts it again, and it resumes from the progress it wrote.
    """

    def __init__(self, stream_id: str, detector_app: str, detector_info: DetectorInfo) -> None:
        import threading

        from deployments.records import GcsRecords

        self.stream_id = stream_id
        handle = serve.get_deployment_handle(DETECTOR_DEPLOYMENT, app_name=detector_app)
        self.pipeline = reader_pipeline(handle, detector_info)
        self.results = None
        self.latest = None
        self.records = GcsRecords(RECORD_PREFIX)
        self.before = ReaderProgress()  # totals of the incarnations before this one
        self._stopped = threading.Event()
        self._started = False
        if ray.get_runtime_context().was_current_actor_reconstructed:
            self._resume()

    def _resume(self) -> None:
        """Ray restarted this actor after its process died: start the stream again where it was."""
        record = self.records.get(self.stream_id)
        if record is None:  # removed meanwhile: nothing to resume
            return
        rec = StreamRecord.from_dict(record)
        self.before = ReaderProgress.from_dict(self.records.get(progress_key(self.stream_id)))
        start = self.before.next_frame if not SourceSpec.parse(rec.request["source"]).is_live else 0
        self.before.restarts.append(Interruption(time.time(), "reader_restarted",
                                                 "the reader's process died; Ray restarted it",
                                                 resumed_from_frame=start).to_dict())
        try:
            self.start(rec.request, rec.app_config, resume_from=start)
        except EdgebatchError as exc:
            log.warning("stream %s could not resume: %s", self.stream_id, exc.message)
            self.before.state = "failed"
            self._write_progress({"state": "failed", "reason": f"resume failed: {exc.message}"})

    def start(self, req: dict[str, Any], app_config: dict[str, Any], resume_from: int | None = None) -> dict[str, Any]:
        """Check the request against the allowlists here (paths resolve on the reader's node), probe the
        source, and only then open the outputs and start; the stream's status, or the error raised.
        ``resume_from``: a restarted stream, whose outputs are continued rather than started anew."""
        from pathlib import Path

        from app.security.paths import JSONL_SUFFIXES, VIDEO_SUFFIXES, OutputFolder
        from app.state import StateDir
        from app.streams.pipeline import StreamOptions
        from app.streams.reader import Backoff
        from app.streams.sinks import AnnotatedVideoSink, JsonlSink, LatestFrame, ResultLog

        sinks: list[Any] = []
        resumed = resume_from is not None
        try:
            config = StreamsAppConfig.model_validate(app_config)
            state = StateDir.default()
            outputs = OutputFolder(Path(config.output_folder) if config.output_folder else state.outputs)
            jsonl = outputs.resolve(req["jsonl"], "jsonl", JSONL_SUFFIXES) if req.get("jsonl") else None
            video = outputs.resolve(req["video_out"], "video_out", VIDEO_SUFFIXES) if req.get("video_out") else None
            if video is not None and resumed:  # an mp4 cannot be appended to: the resumed part is its own file
                video = video.with_name(f"{video.stem}.resumed-{len(self.before.restarts)}{video.suffix}")
            spec = config.sources.check(req["source"], state.videos)
            options = StreamOptions(
                fps=req["fps"], behind=req["behind"], queue_bound=req["queue_bound"], loop=req["loop"],
                backoff=Backoff(initial_s=req["reconnect_initial_s"], max_attempts=req["reconnect_attempts"]),
                start_frame=resume_from or 0,
            )
            self.results = ResultLog(1024)
            self.latest = LatestFrame()

            def open_sinks() -> list[Any]:  # after the probe: a refused source creates no file
                sinks.extend((self.results, self.latest))
                if jsonl is not None or video is not None:
                    outputs.ensure()
                if jsonl is not None:
                    sinks.append(JsonlSink(jsonl, append=resumed))
                if video is not None:
                    sinks.append(AnnotatedVideoSink(video, req["fps"]))
                return sinks

            self.pipeline.add_stream(spec, options, sinks=open_sinks, stream_id=self.stream_id,
                                     node=ray.get_runtime_context().get_node_id())
        except EdgebatchError:
            for s in sinks:
                s.close()
            raise
        if not self._started:
            self._started = True
            import threading

            threading.Thread(target=self._progress_loop, name="edgebatch-progress", daemon=True).start()
        return self.status()

    def _progress_loop(self) -> None:
        """Write position and counters about once a second, so a restart loses at most that much."""
        while not self._stopped.wait(PROGRESS_INTERVAL_S):
            try:
                self._write_progress(self.pipeline.status(self.stream_id))
            except Exception as exc:  # the store or the stream is gone for a moment: next round
                log.debug("stream %s: progress not written: %s", self.stream_id, exc)

    def _write_progress(self, status: dict[str, Any]) -> None:
        totals = resumed_totals(self.before, status)
        progress = ReaderProgress(next_frame=next_frame_after(status, self.before.next_frame),
                                  state=str(status.get("state", "running")), restarts=self.before.restarts, **totals)
        self.records.put(progress_key(self.stream_id), progress.to_dict())

    def status(self) -> dict[str, Any]:
        if not self._started:
            return {"id": self.stream_id, "state": self.before.state if self.before.restarts else "starting",
                    "interruptions": self.before.restarts}
        status = self.pipeline.status(self.stream_id)
        if self.before.restarts:
            status["totals"] = resumed_totals(self.before, status)
        status["interruptions"] = list(self.before.restarts)
        return status

    def preview(self) -> bytes | None:
        """The latest annotated frame as JPEG (the console's live preview); None before the first frame."""
        return self.latest.jpeg() if self.latest is not None else None

    def events(self, cursor: int, timeout_s: float = 1.0) -> dict[str, Any]:
        assert self.results is not None
        return self.results.since(cursor, timeout_s)

    def stop(self) -> dict[str, Any]:
        self._stopped.set()
        status = self.pipeline.remove_stream(self.stream_id)
        status["state"] = "stopped" if status["state"] not in ("failed", "finished") else status["state"]
        self.pipeline.close()
        return status


@serve.deployment(name="StreamsIngress", max_ongoing_requests=100, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class StreamsIngress:
    """The stream table: id -> reader actor. One replica (the table is its state)."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        from deployments.records import GcsRecords

        self.config = parse_config(StreamsAppConfig, config, "edgebatch-streams args")
        self.detector_app = self.config.detector_app
        self.reader_num_cpus = self.config.reader_num_cpus
        self.streams: dict[str, Any] = {}
        self.requests: dict[str, dict[str, Any]] = {}
        self.reserved: dict[str, float] = {}  # fps of streams being started (admitted, not yet in the table)
        self._admission = asyncio.Lock()
        self.records = GcsRecords(RECORD_PREFIX)  # the table itself lives here, not in this replica
        self._recovered = False
        self._recovery = asyncio.Lock()

    # -- the table outlives this replica ---------------------------------------------------
    async def _ready(self) -> None:
        """Before the first request after a (re)start: take back the streams an earlier replica ran."""
        if self._recovered:
            return
        async with self._recovery:
            if self._recovered:
                return
            loop = asyncio.get_running_loop()
            lost = await loop.run_in_executor(None, self._reattach)
            for rec in lost:
                await self._relaunch(rec)
            self._recovered = True

    def _reattach(self) -> list[StreamRecord]:
        """Find each recorded stream's reader by name; the records whose reader is gone are returned."""
        lost = []
        for key in self.records.keys():
            if not is_stream_key(key):
                continue
            data = self.records.get(key)
            if data is None:
                continue
            rec = StreamRecord.from_dict(data)
            try:
                actor = ray.get_actor(actor_name(rec.id), namespace=ACTOR_NAMESPACE)
            except ValueError:
                lost.append(rec)
                continue
            self.streams[rec.id], self.requests[rec.id] = actor, rec.request
            rec.note(Interruption(time.time(), "ingress_restarted",
                                  "the streams ingress restarted and took the stream back; its reader kept running"))
            self.records.put(rec.id, rec.to_dict())
            log.info("stream %s: reattached to its running reader", rec.id)
        return lost

    async def _relaunch(self, rec: StreamRecord) -> None:
        """A recorded stream whose reader is gone: start a new reader from the last position written."""
        loop = asyncio.get_running_loop()
        progress = ReaderProgress.from_dict(await loop.run_in_executor(None, self.records.get, progress_key(rec.id)))
        if progress.state in TERMINAL_STATES:
            self.requests[rec.id] = rec.request  # finished before the fault: nothing to resume, keep it listed
            self.streams[rec.id] = None
            return
        live = SourceSpec.parse(rec.request["source"]).is_live
        start = 0 if live else progress.next_frame
        if rec.relaunches >= MAX_RELAUNCHES:
            rec.note(Interruption(time.time(), "reader_lost", f"reader gone again after {rec.relaunches} relaunches; "
                                  "left failed (DELETE the stream and start it again)"))
        else:
            try:
                info = await self._detector_info()
                actor = self._spawn(rec.id, StreamRequest.model_validate(rec.request), info)
                await asyncio.wait_for(actor.start.remote(rec.request, rec.app_config, start), timeout=120)
                self.streams[rec.id] = actor
                rec.relaunches += 1
                rec.note(Interruption(time.time(), "reader_relaunched", "the reader was gone when the streams ingress "
                                      "restarted; a new one resumed the stream", resumed_from_frame=start))
            except Exception as exc:
                ours = as_edgebatch_error(exc)
                rec.note(Interruption(time.time(), "reader_lost",
                                      f"could not restart the reader: {ours.message if ours else redact(str(exc))}"))
                self.streams[rec.id] = None
        self.requests[rec.id] = rec.request
        await loop.run_in_executor(None, self.records.put, rec.id, rec.to_dict())

    def _record(self, sid: str) -> StreamRecord | None:
        data = self.records.get(sid)
        return StreamRecord.from_dict(data) if data else None

    def _precheck(self, req: StreamRequest) -> None:
        """The allowlist checks that need no reader node, so a bad request is a 400 before admission."""
        from app.security.paths import JSONL_SUFFIXES, VIDEO_SUFFIXES, check_output_name

        if req.jsonl:
            check_output_name(req.jsonl, "jsonl", JSONL_SUFFIXES)
        if req.video_out:
            check_output_name(req.video_out, "video_out", VIDEO_SUFFIXES)
        self.config.sources.precheck(req.source)

    async def _admit(self, sid: str, fps: float, info: DetectorInfo) -> None:
        """Reserve ``fps`` for ``sid`` if the capacity left covers it (429 saying what is left otherwise)."""
        capacity = stream_capacity(self.config.admission, info)
        async with self._admission:
            statuses = await asyncio.gather(*(self._status(s, a) for s, a in list(self.streams.items())))
            live = [st["id"] for st in statuses if st.get("state") not in TERMINAL_STATES]
            taken = sum(float(self.requests[s]["fps"]) for s in live if s in self.requests) + sum(self.reserved.values())
            admit(capacity, taken, len(live) + len(self.reserved), fps)
            self.reserved[sid] = fps

    async def _detector_info(self) -> DetectorInfo:
        try:
            handle = serve.get_deployment_handle(DETECTOR_DEPLOYMENT, app_name=self.detector_app)
            return await asyncio.wait_for(handle.info.remote(), timeout=30)
        except Exception as exc:
            raise Unavailable(f"the detector application '{self.detector_app}' is not reachable ({exc}); "
                              "start it with `edgebatch up`") from None

    @api.post("/", status_code=201, responses=error_responses(400, 401, 429, 503))
    async def create(self, request: Request) -> JSONResponse:
        try:
            data = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest('body must be JSON like {"source": "/path/clip.mp4", "fps": 30}') from None
        req = _parse_request(data)
        await self._ready()
        info = await self._detector_info()
        if req.model and req.model != info.model:
            raise BadRequest(f"model {req.model!r} is not served by '{self.detector_app}'; it serves "
                             f"{info.model!r} (omit model or deploy that model)")
        sid = req.id or uuid.uuid4().hex[:8]
        if sid in self.streams or sid in self.reserved:
            raise BadRequest(f"stream id {sid!r} already exists; DELETE it first or pick another id")
        self._precheck(req)
        await self._admit(sid, req.fps, info)
        try:
            return await self._start(sid, req, info)
        finally:
            self.reserved.pop(sid, None)

    def _spawn(self, sid: str, req: StreamRequest, info: DetectorInfo) -> Any:
        """The stream's reader actor: detached (it outlives this replica), named (a restarted replica
        finds it), restarted by Ray when its process dies; on the asked node when one was named."""
        options: dict[str, Any] = {"name": actor_name(sid), "namespace": ACTOR_NAMESPACE,
                                   "num_cpus": self.reader_num_cpus, "lifetime": "detached"}
        if req.node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            node_id = resolve_node(req.node, ray.nodes())
            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        return StreamReaderActor.options(**options).remote(sid, self.detector_app, info)

    async def _start(self, sid: str, req: StreamRequest, info: DetectorInfo) -> JSONResponse:
        """Record the stream, place the reader actor and start it; its table entry only once it runs."""
        loop = asyncio.get_running_loop()
        rec = StreamRecord(sid, req.model_dump(), self.config.model_dump())
        await loop.run_in_executor(None, self.records.put, sid, rec.to_dict())  # first: a reader restarted at once resumes
        actor = None
        try:
            actor = self._spawn(sid, req, info)
            started = await asyncio.wait_for(actor.start.remote(req.model_dump(), self.config.model_dump()),
                                             timeout=120)
        except Exception as exc:
            if actor is not None:
                ray.kill(actor)
            await loop.run_in_executor(None, self._forget, sid)
            ours = as_edgebatch_error(exc)  # the source is unreadable, a sink name is bad: the client's to fix
            if ours is not None:
                raise ours from None
            raise Unavailable(f"the reader for stream {sid} did not start: {redact(str(exc))}") from None
        self.streams[sid] = actor
        self.requests[sid] = req.model_dump()
        return JSONResponse(started, status_code=201)

    def _forget(self, sid: str) -> None:
        self.records.delete(sid)
        self.records.delete(progress_key(sid))

    async def _status(self, sid: str, actor: Any) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        rec = await loop.run_in_executor(None, self._record, sid)
        noted = rec.interruptions if rec else []
        if actor is None:
            status = {"id": sid, "source": redact(str(self.requests.get(sid, {}).get("source"))), "state": "failed",
                      "reason": (noted[-1]["detail"] if noted else "reader is gone")}
        else:
            try:
                status = await asyncio.wait_for(actor.status.remote(), timeout=15)
            except Exception as exc:  # the actor (or its node) died for good: report it, keep the table
                req = self.requests.get(sid, {})
                status = {"id": sid, "source": redact(str(req.get("source"))), "state": "failed",
                          "reason": f"reader actor is gone: {type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''}"}
        status["interruptions"] = sorted([*noted, *status.get("interruptions", [])], key=lambda i: i["at"])
        return status

    def _actor(self, sid: str) -> Any:
        """The stream's reader (None when it is recorded but its reader is lost); 404 for no such stream."""
        if sid not in self.streams:
            raise NotFound(f"no stream {sid!r}; list them with GET /v1/streams")
        return self.streams[sid]

    @api.get("/")
    async def list_streams(self) -> dict:
        await self._ready()
        items = await asyncio.gather(*(self._status(sid, a) for sid, a in self.streams.items()))
        return {"streams": list(items)}

    @api.get("/{stream_id}")
    async def show(self, stream_id: str) -> JSONResponse:
        await self._ready()
        return JSONResponse(await self._status(stream_id, self._actor(stream_id)))

    @api.delete("/{stream_id}")
    async def remove(self, stream_id: str) -> JSONResponse:
        await self._ready()
        actor = self._actor(stream_id)
        final: dict[str, Any] = {"id": stream_id, "state": "stopped", "reason": "reader was already gone"}
        if actor is not None:
            try:
                final = await asyncio.wait_for(actor.stop.remote(), timeout=30)
            except Exception as exc:
                final["reason"] = f"reader was already gone: {type(exc).__name__}"
            ray.kill(actor)  # frees the actor's CPU share and process; no restart
        await asyncio.get_running_loop().run_in_executor(None, self._forget, stream_id)
        self.streams.pop(stream_id, None)
        self.requests.pop(stream_id, None)
        return JSONResponse({"deleted": stream_id, "final": final})

    @api.get("/{stream_id}/preview.jpg", responses={200: {"content": {"image/jpeg": {}}}, **error_responses(404, 503)})
    async def preview(self, stream_id: str) -> Response:
        """The stream's latest frame with its boxes drawn (JPEG, at most PREVIEW_MAX_WIDTH wide): poll it for
        a live view; encoded only when asked."""
        await self._ready()
        actor = self._actor(stream_id)
        try:
            data = None if actor is None else await asyncio.wait_for(actor.preview.remote(), timeout=15)
        except Exception as exc:
            raise Unavailable(f"the reader of stream {stream_id} did not answer: {type(exc).__name__}") from None
        if data is None:
            raise NotFound(f"stream {stream_id} has no frame yet; retry once it delivers (GET /v1/streams/{stream_id})")
        return Response(content=data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @api.get("/{stream_id}/events")
    async def events(self, stream_id: str, cursor: int = 0) -> Any:
        """Server-sent events: one `frame` event per frame in order, then `end` with the reason."""
        await self._ready()
        actor = self._actor(stream_id)

        async def feed():
            pos = max(0, cursor)
            if actor is None:
                yield f"event: end\ndata: {json.dumps({'reason': 'reader is gone (see GET for its interruptions)'})}\n\n"
                return
            while True:
                try:
                    got = await asyncio.wait_for(actor.events.remote(pos, 1.0), timeout=30)
                except Exception as exc:
                    yield f"event: end\ndata: {json.dumps({'reason': f'reader gone: {type(exc).__name__}'})}\n\n"
                    return
                base = got["cursor"] - len(got["events"])
                for i, ev in enumerate(got["events"]):
                    yield f"id: {base + i}\nevent: frame\ndata: {json.dumps(ev)}\n\n"
                pos = got["cursor"]
                if got["missed"]:
                    yield f"event: missed\ndata: {json.dumps({'missed': got['missed']})}\n\n"
                if got["ended"]:
                    yield f"event: end\ndata: {json.dumps({'reason': got['reason'], 'at': time.time()})}\n\n"
                    return
                if not got["events"]:
                    yield ": keep-alive\n\n"

        return StreamingResponse(feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def build_app(args: dict[str, Any] | None = None) -> Application:
    """``import_path: deployments.streams:build_app``; args: ``StreamsAppConfig`` (detector_app,
    reader_num_cpus, output_folder, sources, admission), refused at deploy with the bad field named."""
    config = parse_config(StreamsAppConfig, dict(args or {}), "edgebatch-streams args")
    return StreamsIngress.bind(config.model_dump())
