"""The detector replica on the session's Ray: live knobs, refused configs, alias following, errors.

Each config change goes through ``launcher.deploy`` (Serve's declarative deploy, the same
controller path as ``serve deploy``) and is observed on the running replica (same pid).
"""

from __future__ import annotations

import copy
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import wait_for
from tests.test_controller import Load


def _info(serve_app) -> dict:
    return httpx.get(f"{serve_app['url']}/v1/info", timeout=60).json()


def _deploy(serve_app, **user_config) -> None:
    from deployments import launcher

    config = copy.deepcopy(serve_app["config"])
    config["applications"][0]["deployments"][0]["user_config"].update(user_config)
    launcher.deploy(config)


def _restore(serve_app) -> None:
    from deployments import launcher

    launcher.deploy(serve_app["config"])
    shipped = serve_app["config"]["applications"][0]["deployments"][0]["user_config"]["engine_instances"]
    wait_for(lambda: (lambda i: i["engine_instances"] == shipped and i["max_batch_size"] == 8 and i["config_refused"] is None
                      and i["pinned_version"] is None and i["postprocess"]["conf"] == 0.25)(_info(serve_app)),
             240, "the session's config to apply again")


def _scene_jpeg(seed: int = 7) -> bytes:
    import cv2
    import numpy as np

    from app.demo.synthetic import render_scene

    img, _ = render_scene(np.random.default_rng(seed), 1280, 720, 6)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()


@pytest.mark.ray
def test_each_knob_changes_on_the_running_replica(serve_app):
    url = serve_app["url"]
    before = _info(serve_app)
    jpeg = _scene_jpeg()
    assert httpx.post(f"{url}/v1/detect", content=jpeg, timeout=60).json()["detections"]
    instances = before["engine_instances"] + 1  # a change from what the session's config ships
    _deploy(serve_app, engine_instances=instances, resident_variants=1, conf_threshold=1.0, max_batch_size=4,
            batch_wait_timeout_s=0.02)
    try:
        info = wait_for(lambda: (lambda i: i if i["engine_instances"] == instances and i["postprocess"]["conf"] == 1.0 else None)(
            _info(serve_app)), 120, "the new knobs to apply")
        assert info["pid"] == before["pid"], "a user_config change must not restart the replica"
        assert info["max_batch_size"] == 4 and info["batch_wait_timeout_s"] == 0.02 and info["resident_variants"] == 1
        assert list(info["loaded_variants"]) == ["4"], info["loaded_variants"]  # one resident: the target
        assert all(v["instances"] == instances for v in info["loaded_variants"].values()), info["loaded_variants"]
        # concurrent requests over the engine instances: none blocks, none fails
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"{url}/v1/detect", content=jpeg, timeout=60), range(16)))
        assert [r.status_code for r in replies] == [200] * 16
        assert all(r.json()["detections"] == [] for r in replies)  # conf 1.0: nothing passes
        assert all(r.json()["batch_size"] == 4 for r in replies)
    finally:
        _restore(serve_app)
    info = _info(serve_app)
    assert all(v["instances"] == before["engine_instances"] for v in info["loaded_variants"].values())
    assert info["pid"] == before["pid"]


@pytest.mark.ray
def test_bad_user_config_is_refused_and_the_replica_keeps_serving_the_last_good_one(serve_app):
    from ray import serve

    pid = _info(serve_app)["pid"]
    with Load(serve_app["url"], clients=4) as load:
        wait_for(lambda: load.count() >= 5, 120, "steady load before the bad config")
        _deploy(serve_app, max_batch_size=32)  # beyond the largest variant in batch_sizes
        refused = wait_for(lambda: _info(serve_app)["config_refused"], 120, "the refusal to show in /v1/info")
        mark = load.count()
        wait_for(lambda: load.count() >= mark + 10, 120, "replies after the refusal")
    statuses = [s for s, _ in load.replies]
    assert load.errors == [] and set(statuses) == {200}, (load.errors[:3], load.failures[:3])
    info = _info(serve_app)
    assert info["pid"] == pid and info["max_batch_size"] == 8
    assert "max_batch_size" in refused["reason"] and "exceeds the largest variant" in refused["reason"]
    assert refused["refused"] == {"max_batch_size": 32} and refused["serving"] == {"max_batch_size": 8}
    assert refused["at"] > 0
    app = serve.status().applications["edgebatch"]
    assert str(getattr(app.status, "value", app.status)) == "RUNNING"
    _restore(serve_app)  # a good config clears the refusal
    assert _info(serve_app)["config_refused"] is None and _info(serve_app)["pid"] == pid


def _second_version(repo, tmp_path) -> str:
    from app.demo import DETECTOR_META, DETECTOR_ONNX
    from model_registry.builders import build_onnx_variants, with_labels

    labels = json.loads(DETECTOR_META.read_text())["labels"]
    variants = [with_labels(v, labels) for v in build_onnx_variants(DETECTOR_ONNX, [1, 2, 4, 8, 16], tmp_path)]
    return repo.register_version("demo-detector", variants, description="the same detector, a second version")


@pytest.mark.ray
def test_alias_move_is_rolled_in_while_serving_and_in_use_follows(serve_app, demo_repo, state, tmp_path, monkeypatch):
    from app.cli import main

    repo, v1 = demo_repo
    v2 = _second_version(repo, tmp_path)
    monkeypatch.setenv("EDGEBATCH_HOME", str(state.root))
    pid = _info(serve_app)["pid"]
    assert _info(serve_app)["version"] == v1
    try:
        with Load(serve_app["url"], clients=4) as load:
            wait_for(lambda: load.count() >= 5, 120, "steady load before the promotion")
            assert main(["models", "promote", "demo-detector", v2, "--alias", "production"]) == 0
            wait_for(lambda: _info(serve_app)["version"] == v2, 120, f"the replica to roll to v{v2}")
            mark = load.count()
            wait_for(lambda: load.count() >= mark + 10, 120, "replies after the roll")
        statuses = [s for s, _ in load.replies]
        assert load.errors == [] and set(statuses) == {200}, (load.errors[:3], load.failures[:3])
        info = _info(serve_app)
        assert info["pid"] == pid and info["alias"] == "production" and info["last_swap"]["to_version"] == v2
        in_use = {v.version: v.in_use for v in repo.describe("demo-detector").versions}
        assert "edgebatch.Detector" in in_use[v2] and "edgebatch.Detector" not in in_use[v1], in_use
    finally:
        repo.set_alias("demo-detector", "production", v1)
        wait_for(lambda: _info(serve_app)["version"] == v1, 120, f"the replica to roll back to v{v1}")


@pytest.mark.ray
def test_a_pinned_version_is_shown_as_pinned_not_as_the_alias(serve_app, demo_repo):
    _, v1 = demo_repo
    _deploy(serve_app, version=v1)
    try:
        info = wait_for(lambda: (lambda i: i if i["pinned_version"] == v1 else None)(_info(serve_app)), 120,
                        "the pin to apply")
        assert info["alias"] is None and info["version"] == v1
    finally:
        _restore(serve_app)
    assert _info(serve_app)["alias"] == "production"


def test_tenancy_deploys_the_plain_replica_without_walking_serve_internals():
    from deployments.detector import DetectorReplica
    from deployments.tenancy import PlacementDetector

    assert PlacementDetector.func_or_class is DetectorReplica
    assert not hasattr(DetectorReplica, "v1_detect")  # the HTTP routes live in the ingress only


def test_one_error_mapping_per_ingress_json_4xx_and_logged_500_with_request_id(caplog):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.errors import NotFound
    from deployments.http import install_error_handlers

    api = FastAPI()
    install_error_handlers(api)

    @api.get("/ours")
    async def ours():
        raise NotFound("no model 'x'; this server serves 'demo-detector'")

    @api.get("/internal")
    async def internal():
        raise KeyError("images")  # a server bug, not the client's fault

    client = TestClient(api, raise_server_exceptions=False)
    r = client.get("/ours")
    assert r.status_code == 404 and r.json() == {"error": "no model 'x'; this server serves 'demo-detector'"}
    with caplog.at_level("ERROR", logger="ray.serve"):
        r = client.get("/internal")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    request_id = r.json()["request_id"]
    assert request_id in r.json()["error"] and any(request_id in rec.getMessage() for rec in caplog.records)


def test_replica_errors_cross_handles_as_exceptions_and_keep_their_status():
    """What a handle caller gets from a replica's BadRequest: Ray's wrapper, mapped back to the 400."""
    import ray.exceptions

    from app.errors import BadRequest
    from deployments.http import as_edgebatch_error

    cause = BadRequest("body is not a decodable image")
    wrapped = ray.exceptions.RayTaskError("detect", "traceback", cause).as_instanceof_cause()
    err = as_edgebatch_error(wrapped)
    assert isinstance(err, BadRequest) and err.status == 400 and err.message == cause.message



def test_the_gateway_answers_a_late_detector_at_the_deadline_and_counts_it(monkeypatch, tmp_path):
    """A detector that admitted an item but has not answered by the client's deadline: the gateway does
    not wait past it (a late reply breaks what the deadline promises); it answers the JSON 503 family
    at the deadline, stops waiting on the call (cancelled) and counts it as late."""
    import asyncio

    from app.detector import DetectRequest
    from app.errors import Overloaded
    from deployments.gateway import DetectorGateway

    monkeypatch.setenv("EDGEBATCH_HOME", str(tmp_path))
    calls: list[asyncio.Future] = []

    class NeverAnswers:
        """The detect call of a detector whose batch runs far past the budget."""

        def remote(self, item: DetectRequest) -> asyncio.Future:
            calls.append(asyncio.get_running_loop().create_future())
            return calls[-1]

    class Handle:
        detect = NeverAnswers()

    cls = DetectorGateway.func_or_class
    gateway = cls.__new__(cls)

    async def ask() -> tuple[Overloaded, float]:
        await cls.__init__(gateway, Handle())  # Serve's ingress wrapper makes the constructor a coroutine
        t0 = asyncio.get_running_loop().time()
        with pytest.raises(Overloaded) as late:
            await gateway.detect(DetectRequest.encoded(b"\xff\xd8 not decoded here"), 0.3)
        return late.value, asyncio.get_running_loop().time() - t0

    refused, took = asyncio.run(ask())
    assert 0.3 <= took < 1.3  # at its deadline, not seconds after
    assert refused.message.startswith("overloaded") and "0.30 s deadline" in refused.message
    assert refused.retry_after_s >= 1.0 and refused.to_json()["retry"]
    assert len(calls) == 1 and calls[0].cancelled()
    assert gateway.counters["late"] == 1 and gateway.outstanding == 0
