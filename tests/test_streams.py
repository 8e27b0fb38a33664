"""Streams: the Ray-free staged pipeline (order, accuracy, behind policies, reconnects, bad sources),
then the edgebatch-streams Serve app (detections per frame in order, a dying source, DELETE)."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.demo.video import read_ground_truth, write_sample_video
from app.errors import BadRequest
from app.evaluation import MatchCounts, match
from app.streams.pipeline import LocalEngineStage, StreamOptions, StreamPipeline, demo_engine_stage
from app.streams.reader import Backoff
from app.streams.sinks import END, AnnotatedVideoSink, JsonlSink
from app.streams.source import SourceSpec
from tests.conftest import wait_for

FRAMES = 30


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """A short sample video (1 s at 30 fps, 640x360) with its ground-truth sidecar."""
    return write_sample_video(tmp_path_factory.mktemp("clips") / "clip.mp4", seconds=FRAMES / 30, fps=30,
                              width=640, height=360, seed=3, n_objects=6)


@pytest.fixture(scope="module")
def demo_stage():
    return demo_engine_stage(max_batch=8, threads=1)


def score(results: list[dict], gt) -> MatchCounts:
    total = MatchCounts()
    for r in results:
        dets = [(d["box"], d["class_id"]) for d in r["detections"]]
        total.add(match(dets, [(g.box, g.class_id) for g in gt[r["frame"]]]))
    return total


def make_pipeline(stage, post, size, **kw) -> StreamPipeline:
    return StreamPipeline(stage, input_size=size, post=post, **kw)


# -- Ray-free core ---------------------------------------------------------------------------------
def test_file_stream_every_frame_in_order_with_known_objects(clip, demo_stage, tmp_path):
    stage, post, size = demo_stage
    pipe = make_pipeline(stage, post, size, preprocess_workers=2)
    try:
        out, video = tmp_path / "clip.jsonl", tmp_path / "boxes.mp4"
        sid = pipe.add_stream(str(clip), StreamOptions(fps=30, behind="queue", queue_bound=4, realtime=False),
                              sinks=[JsonlSink(out), AnnotatedVideoSink(video, 30)])
        sub = pipe.subscribe(sid)
        assert pipe.wait_finished(sid, 120), pipe.status(sid)
        status = pipe.status(sid)
        assert status["state"] == "finished" and status["frames_out"] == FRAMES and status["drops"] == 0
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["frame"] for r in lines] == list(range(FRAMES))  # every frame, in order
        counts = score(lines, read_ground_truth(clip))
        assert counts.recall >= 0.9 and counts.precision >= 0.9, counts
        followed = []
        while (item := sub.get(5)) not in (END, None):
            followed.append(item.frame_index)
        assert followed == list(range(FRAMES))  # the live follower saw the same frames, then the end
        import cv2

        cap = cv2.VideoCapture(str(video))
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES and int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)) == 640
        cap.release()
    finally:
        pipe.close()


class SlowEngine(LocalEngineStage):
    """The demo engine made slower than the camera (one frame per batch plus a fixed delay)."""

    def __init__(self, stage: LocalEngineStage, delay_s: float) -> None:
        gate = threading.Event()  # never set: wait() is only the delay
        super().__init__(lambda b: (gate.wait(delay_s), stage.run_batch(b))[1], max_local_batch=1)


def test_drop_oldest_drops_when_the_engine_is_slow(clip, demo_stage):
    stage, post, size = demo_stage
    pipe = make_pipeline(stage=SlowEngine(stage, 0.15), post=post, size=size, stage_bound=1, max_in_flight=1)
    try:
        sid = pipe.add_stream(str(clip), StreamOptions(fps=30, behind="drop_oldest", queue_bound=2))
        sub = pipe.subscribe(sid)
        assert pipe.wait_finished(sid, 120)
        st = pipe.status(sid)
        assert st["drops"] > 0 and st["frames_in"] == FRAMES
        assert st["frames_out"] + st["drops"] == FRAMES  # every frame is either delivered or counted as dropped
        seen = []
        while (item := sub.get(5)) not in (END, None):
            seen.append(item.frame_index)
        assert seen == sorted(seen) and len(seen) == st["frames_out"]  # still in order
    finally:
        pipe.close()


def test_queue_policy_keeps_every_frame_within_its_bound(clip, demo_stage):
    stage, post, size = demo_stage
    pipe = make_pipeline(stage=SlowEngine(stage, 0.05), post=post, size=size, stage_bound=1, max_in_flight=1)
    try:
        sid = pipe.add_stream(str(clip), StreamOptions(fps=60, behind="queue", queue_bound=3, realtime=False))
        depths = []
        while not pipe.wait_finished(sid, 0.02):
            depths.append(pipe.status(sid)["queue_depth"])
        st = pipe.status(sid)
        assert st["drops"] == 0 and st["frames_out"] == FRAMES
        assert max(depths) <= 3 and max(depths) >= 2  # it filled up to the bound, never beyond
    finally:
        pipe.close()


def test_realtime_margin_is_against_the_streams_target_fps(clip, demo_stage):
    """A camera-like stream (paced at 30 fps) behind a 10 fps engine: frames that never got in do not
    make the margin look positive. Each batch holds one of its frames, due every 1/30 s."""
    stage, post, size = demo_stage
    pipe = make_pipeline(stage=SlowEngine(stage, 0.1), post=post, size=size, stage_bound=1, max_in_flight=1)
    try:
        sid = pipe.add_stream(str(clip), StreamOptions(fps=30, behind="queue", queue_bound=1))
        wait_for(lambda: pipe.status(sid)["frames_out"] >= 8, 120, "frames through the slow engine")
        st = pipe.status(sid)
        assert st["fps_in"] < 20  # the reader waited: far fewer frames got in than the stream's 30 fps
        # 1 frame / 30 fps - d_batch (over 0.1 s of inference alone)
        assert st["realtime_margin_s"] is not None and st["realtime_margin_s"] < 1 / 30 - 0.1 + 0.005, st
    finally:
        pipe.close()


class FakeResponse:
    """Serve's DeploymentResponse, as far as the reader uses it."""

    def __init__(self, future) -> None:
        self.future = future

    def result(self, timeout_s: float | None = None):
        return self.future.result(timeout_s)


class LagSink:
    """Each delivered frame's latency (delivered - captured)."""

    needs_image = False

    def __init__(self) -> None:
        self.lags: list[float] = []

    def write(self, result) -> None:
        self.lags.append(result.delivered_ts - result.capture_ts)

    def close(self) -> None:
        pass


class FakeDetectorHandle:
    """A detector deployment handle slower than the camera (one frame at a time, ``per_frame_s`` each),
    answering like the replica: ``detect.remote(item).result()`` -> ``ItemResult``. It records what arrives."""

    def __init__(self, stage: LocalEngineStage, per_frame_s: float) -> None:
        import concurrent.futures

        self.detect = self
        self.items: list = []
        self.service_s: list[float] = []
        self._stage, self._per_frame_s = stage, per_frame_s
        self._worker = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # one engine: requests queue here
        self._gate = threading.Event()  # never set: wait() is only the engine's time

    def remote(self, item) -> FakeResponse:
        self.items.append(item)
        return FakeResponse(self._worker.submit(self._run, item))

    def _run(self, item):
        from app.detector import BatchSummary, ItemResult, StageTimings
        from app.pipeline import to_input

        t0 = time.perf_counter()
        self._gate.wait(self._per_frame_s)
        out = self._stage.run_batch(to_input([item.data]))
        self.service_s.append(time.perf_counter() - t0)
        return ItemResult(None, out[0], None, StageTimings(), BatchSummary(1, None, inference_s=self._per_frame_s))


def _detector_info(post, size):
    from app.replica_status import DetectorInfo

    return DetectorInfo(model="demo-detector", version="1", alias=None, pinned_version="1", backend="onnx",
                        max_batch_size=8, batch_wait_timeout_s=0.005, engine_instances=1, resident_variants=2,
                        loaded_variants={}, labels=post.labels, postprocess=post.settings, input_size=size,
                        counters={}, batch_sizes_seen={}, last_swap=None, last_load_failure=None, config_refused=None,
                        pid=0)


def test_reader_sends_uint8_frames_and_drop_oldest_keeps_the_lag_bounded_behind_a_slow_detector(clip, demo_stage):
    """The Ray reader's pipeline (deployments.streams.reader_pipeline, HandleEngineStage) against a
    detector at 20 fps under a 30 fps camera: frames cross as letterboxed uint8 images, the backlog
    is dropped in the stream's own queue, and the lag stays near queue_bound / F plus the few frames
    in flight instead of growing (with 32 frames in flight it reached seconds)."""
    from app.constants import READER_FRAMES_IN_FLIGHT
    from deployments.streams import reader_pipeline

    stage, post, size = demo_stage
    handle = FakeDetectorHandle(stage, per_frame_s=0.05)
    pipe = reader_pipeline(handle, _detector_info(post, size))
    sink = LagSink()
    lags = sink.lags
    try:
        sid = pipe.add_stream(str(clip), StreamOptions(fps=30, behind="drop_oldest", queue_bound=4, loop=True),
                              sinks=[sink])
        wait_for(lambda: len(lags) >= 60, 120, "60 frames through the slow detector")
        st = pipe.status(sid)
        assert st["drops"] > 0 and st["in_flight"] <= READER_FRAMES_IN_FLIGHT, st  # taken, not delivered
    finally:
        pipe.close()
    assert all(it.kind == "letterboxed" and it.data.dtype == np.uint8 and it.data.shape == (*size, 3)
               for it in handle.items)
    # the oldest of queue_bound frames, then the frames taken before it, each one detector time
    # (measured: on a loaded machine the fake detector's 50 ms grow), plus scheduling slack
    per_frame = float(np.percentile(handle.service_s, 99))
    bound = 4 / 30 + (READER_FRAMES_IN_FLIGHT + 1) * per_frame + 0.25
    late = lags[len(lags) // 2:]
    assert max(late) < bound, (max(late), bound, per_frame)
    assert np.mean(late) <= np.mean(lags[10:len(lags) // 2]) + 0.1  # not growing


class FakeCapture:
    """A camera that yields ``frames`` frames, then its read fails (cable pulled)."""

    def __init__(self, frames: int) -> None:
        self.left = frames

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self):
        if self.left <= 0:
            return False, None
        self.left -= 1
        threading.Event().wait(0.01)  # a real camera's read blocks until its next frame (100 fps here)
        return True, np.full((120, 160, 3), 60, np.uint8)

    def grab(self) -> bool:
        return self.read()[0]

    def get(self, prop: int) -> float:
        return 0.0

    def release(self) -> None:
        pass


class FlakyCamera:
    """Opens per a script: an int opens a capture with that many frames, None fails to open."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = list(script)
        self.opens = 0

    def __call__(self, spec: SourceSpec):
        self.opens += 1
        step = self.script.pop(0) if self.script else None
        if step is None:
            raise BadRequest(f"source '{spec.text}' could not be opened: camera offline")
        return FakeCapture(step)


def test_reconnect_with_backoff_then_give_up(demo_stage):
    stage, post, size = demo_stage
    assert [Backoff(0.5, 2.0, 10.0).delay(a) for a in (1, 2, 3, 4, 6)] == [0.5, 1.0, 2.0, 4.0, 10.0]
    # probe (1 frame), run (5 frames), lost; reconnect: fail, fail, open (4 frames); lost; fail x3 -> give up
    camera = FlakyCamera([1, 5, None, None, 4, None, None, None])
    pipe = make_pipeline(stage, post, size)
    try:
        sid = pipe.add_stream("rtsp://camera.local/live", StreamOptions(
            fps=200, backoff=Backoff(initial_s=0.05, factor=2.0, max_s=0.2, max_attempts=3)), opener=camera)
        states = set()

        def done():
            st = pipe.status(sid)
            states.add(st["state"])
            return st["finished"]

        wait_for(done, 60, "the flaky camera's stream to give up", interval_s=0.01)
        st = pipe.status(sid)
        assert st["state"] == "failed" and "gave up after 3 reconnect attempts" in st["reason"]
        assert st["reconnects"] == 1 and "camera offline" in st["last_error"]
        assert "reconnecting" in states
        assert st["frames_out"] == 9  # 5 before the loss, 4 after the reconnect
        assert camera.opens == 8
    finally:
        pipe.close()


def test_unreadable_sources_are_clear_errors_at_creation(tmp_path, demo_stage):
    stage, post, size = demo_stage
    pipe = make_pipeline(stage, post, size)
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("this is not a video")
    try:
        with pytest.raises(BadRequest, match="no such file"):
            pipe.add_stream(str(tmp_path / "missing.mp4"))
        with pytest.raises(BadRequest, match="notes.mp4"):
            pipe.add_stream(str(not_video))
        with pytest.raises(BadRequest, match="camera offline"):
            pipe.add_stream("rtsp://10.0.0.9/cam", opener=FlakyCamera([None]))
        with pytest.raises(BadRequest, match="behind must be one of"):
            StreamOptions(behind="block")  # type: ignore[arg-type]
        assert pipe.stream_ids == []  # nothing half-created
    finally:
        pipe.close()


def test_cli_says_plainly_when_the_app_is_not_running(capsys):
    from app.cli import main
    from tests.conftest import free_port

    assert main(["streams", "list", "--url", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err
    assert "no edgebatch streams app" in err and "edgebatch up" in err and "Traceback" not in err


# -- on Ray: the edgebatch-streams application ---------------------------------------------------
@pytest.fixture(scope="module")
def stream_outputs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stream-outputs")


@pytest.fixture(scope="module")
def streams_url(deploy_apps, serve_app, state, tmp_path_factory, stream_outputs):
    from deployments.config_file import load_serve_config

    config = load_serve_config(None, state, port=serve_app["port"])
    app = next(a for a in config["applications"] if a["name"] == "edgebatch-streams")
    app.pop("runtime_env", None)
    app["deployments"][0]["graceful_shutdown_timeout_s"] = 1
    # these tests write their clips under pytest's temporary folders: allow those as media folders
    app["args"] = {**app["args"], "output_folder": str(stream_outputs),
                   "sources": {"media_folders": [str(tmp_path_factory.getbasetemp())]},
                   "admission": {"max_stream_fps": 10000}}  # admission itself: tests/test_security.py
    deploy_apps([app])
    return f"{serve_app['url']}/v1/streams"


def sse_frames(url: str, stream_id: str, timeout_s: float = 120) -> tuple[list[dict], str]:
    """Read the events endpoint until `end`: the frame events and the end reason."""
    import httpx

    from app.streams.sinks import read_events

    frames, reason = [], ""
    with httpx.stream("GET", f"{url}/{stream_id}/events", timeout=timeout_s) as r:
        assert r.status_code == 200
        for event, data in read_events(r.iter_lines()):
            if event == "frame":
                frames.append(data)
            elif event == "end":
                reason = data["reason"]
                break
    return frames, reason


def actor_gone(stream_id: str) -> bool:
    import ray

    from deployments.streams import ACTOR_NAMESPACE, actor_name

    try:
        ray.get_actor(actor_name(stream_id), namespace=ACTOR_NAMESPACE)
        return False
    except ValueError:
        return True


def test_stream_over_serve_every_frame_in_order_with_known_objects(streams_url, clip, stream_outputs, capsys):
    import httpx

    r = httpx.post(streams_url, json={"source": str(clip), "fps": 30, "behind": "queue", "queue_bound": 30,
                                      "jsonl": "out.jsonl", "id": "clip1"}, timeout=180)
    assert r.status_code == 201, r.text
    frames, reason = sse_frames(streams_url, "clip1")
    assert [f["frame"] for f in frames] == list(range(FRAMES)) and "end of file" in reason
    counts = score(frames, read_ground_truth(clip))
    assert counts.recall >= 0.9 and counts.precision >= 0.9, counts
    assert len((stream_outputs / "out.jsonl").read_text().splitlines()) == FRAMES
    st = httpx.get(f"{streams_url}/clip1", timeout=30).json()
    assert st["state"] == "finished" and st["frames_out"] == FRAMES and st["drops"] == 0
    assert httpx.get(streams_url, timeout=30).json()["streams"][0]["id"] == "clip1"
    from app.cli import main

    base = streams_url.removesuffix("/v1/streams")
    assert main(["streams", "list", "--url", base]) == 0
    assert "clip1" in capsys.readouterr().out
    assert main(["streams", "follow", "clip1", "--url", base, "--limit", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("frame      0")
    assert httpx.delete(f"{streams_url}/clip1", timeout=60).status_code == 200
    wait_for(lambda: actor_gone("clip1"), 60, "the reader actor to be freed")
    assert httpx.get(f"{streams_url}/clip1", timeout=30).status_code == 404


def test_bad_stream_requests_are_400_naming_the_problem(streams_url, tmp_path):
    import httpx

    r = httpx.post(streams_url, json={"source": str(tmp_path / "nope.mp4")}, timeout=180)
    assert r.status_code == 400 and "no such video" in r.json()["error"]
    r = httpx.post(streams_url, json={"source": "0", "behind": "block"}, timeout=30)
    assert r.status_code == 400 and "behind" in r.json()["error"]
    r = httpx.post(streams_url, json={"source": "clip.mp4", "node": "no-such-node"}, timeout=30)
    assert r.status_code == 400 and "alive nodes" in r.json()["error"]
    assert httpx.delete(f"{streams_url}/nosuch", timeout=30).status_code == 404


def test_dying_source_is_reported_and_other_streams_go_on(streams_url, clip, tmp_path, ray_cluster):
    import httpx
    import ray

    dying, healthy = tmp_path / "dying.mp4", tmp_path / "healthy.mp4"
    shutil.copy(clip, dying)
    shutil.copy(clip, healthy)
    head = ray.get_runtime_context().get_node_id()
    common = {"fps": 15, "loop": True, "reconnect_attempts": 2, "reconnect_initial_s": 0.2}
    for sid, path in (("dying", dying), ("healthy", healthy)):
        r = httpx.post(streams_url, json={"source": str(path), "id": sid, "node": head, **common}, timeout=180)
        assert r.status_code == 201, r.text
        assert r.json()["node"] == head
    try:
        wait_for(lambda: httpx.get(f"{streams_url}/dying", timeout=30).json()["frames_out"] > 0, 120, "first frames")
        dying.unlink()  # the camera goes away: the looped file cannot be reopened
        failed = wait_for(lambda: (s := httpx.get(f"{streams_url}/dying", timeout=30).json())["state"] == "failed" and s,
                          120, "the dying stream to be reported failed")
        assert "gave up after 2 reconnect attempts" in failed["reason"] and "could not be opened" in failed["last_error"]
        before = httpx.get(f"{streams_url}/healthy", timeout=30).json()
        assert before["state"] == "running"
        wait_for(lambda: httpx.get(f"{streams_url}/healthy", timeout=30).json()["frames_out"] > before["frames_out"] + 10,
                 120, "the healthy stream to keep delivering")
    finally:
        for sid in ("dying", "healthy"):
            httpx.delete(f"{streams_url}/{sid}", timeout=60)
    wait_for(lambda: actor_gone("dying") and actor_gone("healthy"), 60, "both reader actors to be freed")
    assert httpx.get(streams_url, timeout=30).json()["streams"] == []


def frame_weighted_batch(statuses: list[dict]) -> float:
    """Mean size of the batch each delivered frame rode in, over all the given streams."""
    seen: dict[int, int] = {}
    for st in statuses:
        for b, c in st["batch_sizes_seen"].items():
            seen[int(b)] = seen.get(int(b), 0) + c
    return sum(b * c for b, c in seen.items()) / max(1, sum(seen.values()))


def test_ten_slow_cameras_fill_batches_like_one_fast_camera_locally(clip, demo_stage):
    """Ray-free: the engine stage batches across streams, so 10 x 3 fps batches like 1 x 30 fps."""
    stage, post, size = demo_stage
    means = {}
    for n, fps in ((1, 30.0), (10, 3.0)):
        pipe = make_pipeline(LocalEngineStage(stage.run_batch, max_local_batch=16), post, size, batch_wait_s=0.3)
        try:
            ids = [pipe.add_stream(str(clip), StreamOptions(fps=fps, loop=True, behind="queue", queue_bound=64))
                   for _ in range(n)]
            wait_for(lambda: sum(pipe.status(i)["frames_out"] for i in ids) >= 45,  # noqa: B023 - waited on here
                     120, f"{n} streams' frames")
            means[n] = frame_weighted_batch([pipe.status(i) for i in ids])
        finally:
            pipe.close()
    print(f"frame-weighted mean local batch size: 1 x 30 fps {means[1]:.2f}, 10 x 3 fps {means[10]:.2f}")
    assert means[1] >= 3 and means[10] >= 3, means  # 30 frames/s in total fill batches either way
    assert means[10] >= 0.6 * means[1], means


def test_ten_cameras_at_3_fps_share_serve_batches_like_one_at_30(streams_url, serve_app, tmp_path):
    """On Serve: frames of ten 3 fps readers meet in the detector's @serve.batch like one 30 fps camera."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from ray import serve

    small = write_sample_video(tmp_path / "cam.mp4", seconds=1, fps=30, width=320, height=180, seed=5, n_objects=3)
    detector = serve.get_deployment_handle("Detector", app_name="edgebatch")
    detector.set_batch_size.remote(8, 0.25).result(timeout_s=120)  # wait up to 250 ms for a batch to fill
    means = {}
    try:
        for n, fps in ((1, 30.0), (10, 3.0)):
            ids = [f"cam{n}-{i}" for i in range(n)]

            def add(sid: str) -> int:
                return httpx.post(streams_url, json={"source": str(small), "id": sid, "fps": fps, "loop": True,  # noqa: B023
                                                     "behind": "queue", "queue_bound": 64}, timeout=180).status_code

            with ThreadPoolExecutor(10) as pool:
                assert list(pool.map(add, ids)) == [201] * n
            try:
                def statuses() -> list[dict]:
                    return [httpx.get(f"{streams_url}/{i}", timeout=30).json() for i in ids]  # noqa: B023

                first = sum(s["frames_out"] for s in statuses())
                wait_for(lambda: sum(s["frames_out"] for s in statuses()) >= first + 60,  # noqa: B023 - waited on here
                         180, f"{n} cameras' frames")
                means[n] = frame_weighted_batch(statuses())
            finally:
                with ThreadPoolExecutor(10) as pool:
                    list(pool.map(lambda sid: httpx.delete(f"{streams_url}/{sid}", timeout=60), ids))
    finally:
        detector.set_batch_size.remote(8, 0.005).result(timeout_s=120)
    print(f"frame-weighted mean Serve batch size: 1 x 30 fps {means[1]:.2f}, 10 x 3 fps {means[10]:.2f}")
    # one 3 fps camera alone could never put 2 frames in a 250 ms batch: batches > 1 are cross-stream
    assert means[10] >= 2.5 and means[1] >= 2.5, means
    assert means[10] >= 0.6 * means[1], means


def test_a_resumed_stream_starts_at_its_frame_and_appends_to_its_output(clip, demo_stage, tmp_path):
    """What a restarted reader does (issue 15): the file from the frame after the last one delivered,
    and the JSON Lines file continued, not truncated."""
    stage, post, size = demo_stage
    out = tmp_path / "resumed.jsonl"
    out.write_text('{"frame": 0}\n')  # what the earlier reader wrote
    pipe = make_pipeline(stage, post, size)
    try:
        sid = pipe.add_stream(str(clip), StreamOptions(fps=30, behind="queue", queue_bound=8, realtime=False,
                                                       start_frame=20), sinks=[JsonlSink(out, append=True)])
        assert pipe.wait_finished(sid, 120), pipe.status(sid)
        assert pipe.status(sid)["frames_out"] == FRAMES - 20
    finally:
        pipe.close()
    frames = [json.loads(line)["frame"] for line in out.read_text().splitlines()]
    assert frames == [0, *range(20, FRAMES)]
