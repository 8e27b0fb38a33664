"""End to end through Ray Serve and HTTP: /v1/detect, v2 with tritonclient, bad input, live reconfigure."""

from __future__ import annotations

import concurrent.futures as cf
import copy

import cv2
import httpx
import numpy as np
import pytest

from app.evaluation import MatchCounts, match
from tests.conftest import wait_for

pytestmark = pytest.mark.ray


def _scene(seed: int):
    from app.demo.synthetic import render_scene

    img, gts = render_scene(np.random.default_rng(seed), 1280, 720, 8)
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes(), gts


def _info(serve_app) -> dict:
    return httpx.get(f"{serve_app['url']}/v1/info", timeout=10).json()


def test_detect_finds_the_known_objects(serve_app):
    counts = MatchCounts()
    for seed in (1001, 1002, 1003):
        jpeg, gts = _scene(seed)
        r = httpx.post(f"{serve_app['url']}/v1/detect", content=jpeg, headers={"Content-Type": "image/jpeg"}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "demo-detector" and body["version"] and body["batch_size"] >= 1
        assert set(body["timings_ms"]) == {"queue", "preprocess", "inference", "postprocess"}
        for d in body["detections"]:
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 < x2 <= 1280 and 0 <= y1 < y2 <= 720
            assert d["label"] in ("square", "circle", "triangle")
        counts.add(match([(d["box"], d["class_id"]) for d in body["detections"]], [(g.box, g.class_id) for g in gts]))
    assert counts.recall >= 0.8 and counts.precision >= 0.8, counts


def test_bad_requests_get_named_4xx(serve_app):
    url = serve_app["url"]
    r = httpx.post(f"{url}/v1/detect", content=b"", timeout=10)
    assert r.status_code == 400 and "empty request body" in r.json()["error"]
    r = httpx.post(f"{url}/v1/detect", content=b"this is not an image", timeout=10)
    assert r.status_code == 400 and "not a decodable image" in r.json()["error"]
    r = httpx.post(f"{url}/v1/detect", content=b"\xff" * (21 * 1024 * 1024), timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    r = httpx.get(f"{url}/v2/models/no-such-model", timeout=10)
    assert r.status_code == 404 and "unknown model 'no-such-model'" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/no-such-model/infer", content=b"{}", timeout=10)
    assert r.status_code == 404


def _v2(url: str, tensors: list[dict]) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/demo-detector/infer", json={"inputs": tensors}, timeout=30)


def test_v2_rejects_wrong_shape_dtype_and_count(serve_app):
    url = serve_app["url"]
    ok = {"name": "images", "shape": [1, 3, 320, 320], "datatype": "FP32", "data": [0.0] * (3 * 320 * 320)}
    r = _v2(url, [{**ok, "shape": [1, 3, 32, 32], "data": [0.0] * (3 * 32 * 32)}])
    assert r.status_code == 400 and "shape" in r.json()["error"]
    r = _v2(url, [{**ok, "datatype": "INT64", "data": [0] * (3 * 320 * 320)}])
    assert r.status_code == 400 and "datatype" in r.json()["error"].lower()
    r = _v2(url, [ok, {**ok, "name": "extra"}])
    assert r.status_code == 400
    r = _v2(url, [])
    assert r.status_code == 400
    r = httpx.post(f"{url}/v2/models/demo-detector/infer", content=b"{not json", timeout=10)
    assert r.status_code == 400


def test_bad_request_inside_a_batch_does_not_disturb_the_good_ones(serve_app):
    from ray import serve

    handle = serve.get_deployment_handle("Detector", app_name="edgebatch")
    before = handle.set_batch_size.remote(8, 0.3).result(timeout_s=120)
    try:
        url = serve_app["url"]
        good = [_scene(2000 + i)[0] for i in range(7)]
        bodies = good[:3] + [b"garbage that is not an image"] + good[3:]
        with cf.ThreadPoolExecutor(len(bodies)) as pool:
            resps = list(pool.map(lambda b: httpx.post(f"{url}/v1/detect", content=b, timeout=60), bodies))
        statuses = [r.status_code for r in resps]
        assert statuses == [200, 200, 200, 400, 200, 200, 200, 200], statuses
        assert max(r.json()["items_in_batch"] for r in resps if r.status_code == 200) > 1  # they were batched
        assert _info(serve_app)["pid"] == before.pid  # the replica survived
    finally:
        handle.set_batch_size.remote(8, 0.005).result(timeout_s=120)


def test_tritonclient_unmodified_gets_correct_results(serve_app, demo_repo):
    import onnxruntime as ort
    import tritonclient.http as triton

    from app.pipeline import prepare

    repo, version = demo_repo
    client = triton.InferenceServerClient(url=f"127.0.0.1:{serve_app['port']}")
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("demo-detector")
    meta = client.get_model_metadata("demo-detector")
    assert meta["inputs"][0]["name"] == "images" and meta["outputs"][0]["name"] == "output0"

    x = np.stack([prepare(_scene(3000 + i)[0], (320, 320)).tensor for i in range(2)])
    variant = repo.find("demo-detector", version=version, batch_size=2, backend="onnx")
    expected = ort.InferenceSession(str(variant.path), providers=["CPUExecutionProvider"]).run(None, {"images": x})[0]
    for binary in (True, False):
        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = triton.InferRequestedOutput("output0", binary_data=binary)
        result = client.infer("demo-detector", [inp], outputs=[out])
        got = result.as_numpy("output0")
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_serve_deploy_user_config_change_keeps_replica_and_applies_batch_size(serve_app):
    from deployments import launcher

    url = serve_app["url"]
    pid = _info(serve_app)["pid"]
    config = copy.deepcopy(serve_app["config"])
    uc = config["applications"][0]["deployments"][0]["user_config"]
    uc.update({"max_batch_size": 1, "batch_wait_timeout_s": 0.2})
    launcher.deploy(config)
    wait_for(lambda: _info(serve_app)["max_batch_size"] == 1, 60, "max_batch_size 1 to apply")
    jpeg = _scene(4000)[0]

    def burst():
        with cf.ThreadPoolExecutor(8) as pool:
            replies = pool.map(lambda _: httpx.post(f"{url}/v1/detect", content=jpeg, timeout=60), range(8))
            replies = list(replies)
        assert all(r.status_code == 200 for r in replies), [r.text[:300] for r in replies if r.status_code != 200]
        return [r.json()["items_in_batch"] for r in replies]

    assert max(burst()) == 1
    uc.update({"max_batch_size": 8, "batch_wait_timeout_s": 0.2})
    launcher.deploy(config)
    wait_for(lambda: _info(serve_app)["max_batch_size"] == 8, 60, "max_batch_size 8 to apply")
    assert max(burst()) > 1
    info = _info(serve_app)
    assert info["pid"] == pid, "serve deploy of user_config must not restart the replica"
    assert "8" in info["loaded_variants"]
    uc.update({"max_batch_size": 8, "batch_wait_timeout_s": 0.005})
    launcher.deploy(config)
    wait_for(lambda: _info(serve_app)["batch_wait_timeout_s"] == 0.005, 60, "timeout to apply")
