"""Issue 14 replayed against the running app: each finding of the hostile-client probe, fixed.

File and path cases use temporary folders only (never real system files); network cases use
127.0.0.1 and the unroutable TEST-NET-1 range (192.0.2.0/24). The fuzz run at the end is bounded.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.conftest import wait_for

pytestmark = pytest.mark.ray

SECRET = "s3cret-pw"


def _jpeg(w: int = 64, h: int = 48) -> bytes:
    return cv2.imencode(".jpg", np.full((h, w, 3), 127, np.uint8))[1].tobytes()


def _replica_pid(url: str) -> int:
    return httpx.get(f"{url}/v1/info", timeout=30).json()["pid"]


# -- the streams app, configured with temporary media and output folders ---------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from app.demo.video import write_sample_video

    media, outputs, outside = (tmp_path_factory.mktemp(n) for n in ("media", "outputs", "outside"))
    write_sample_video(media / "clip.mp4", seconds=0.5, fps=30, width=160, height=96, seed=3, n_objects=2)
    return {"media": media, "outputs": outputs, "outside": outside}


def _streams_app(state, serve_app, folders, admission: dict) -> dict:
    from deployments.config_file import load_serve_config

    config = load_serve_config(None, state, port=serve_app["port"])
    app = next(a for a in config["applications"] if a["name"] == "edgebatch-streams")
    app.pop("runtime_env", None)
    app["deployments"][0]["graceful_shutdown_timeout_s"] = 1
    app["args"] = {**app["args"], "output_folder": str(folders["outputs"]), "admission": admission,
                   "sources": {"media_folders": [str(folders["media"])], "hosts": ["192.0.2.0/24"]}}
    return app


@pytest.fixture(scope="module")
def streams(deploy_apps, serve_app, state, folders) -> str:
    """The streams app on temporary folders; an operator cap keeps admission out of the file tests."""
    deploy_apps([_streams_app(state, serve_app, folders, {"max_stream_fps": 10000})])
    return f"{serve_app['url']}/v1/streams"


def _post(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(url, json=body, timeout=kw.pop("timeout", 180), **kw)


# 1 ------------------------------------------------------------------------------------------------
def test_stream_outputs_stay_in_the_output_folder_and_refusals_touch_nothing(streams, folders):
    outputs, outside = folders["outputs"], folders["outside"]
    victim = outside / "victim.jsonl"
    victim.write_text("precious\n")
    (outputs / "planted.jsonl").symlink_to(victim)
    for body in ({"source": "clip.mp4", "jsonl": str(victim)},              # an absolute path elsewhere
                 {"source": "clip.mp4", "jsonl": "../outside/victim.jsonl"},
                 {"source": "clip.mp4", "jsonl": "planted.jsonl"},           # a symlink out of the folder
                 {"source": "clip.mp4", "video_out": str(outside / "x.mp4")},
                 {"source": "clip.mp4", "video_out": "notes.txt"}):
        r = _post(streams, body)
        assert r.status_code == 400, (body, r.text)
        assert str(outputs) not in r.json()["error"]  # the server's own folder is not revealed
    assert victim.read_text() == "precious\n" and not (outside / "x.mp4").exists()
    # a valid output name with a refused source: nothing is created
    r = _post(streams, {"source": "missing.mp4", "jsonl": "refused.jsonl", "video_out": "refused.mp4"})
    assert r.status_code == 400 and not (outputs / "refused.jsonl").exists() and not (outputs / "refused.mp4").exists()
    # and a valid request writes only inside the folder
    r = _post(streams, {"source": "clip.mp4", "jsonl": "ok.jsonl", "id": "sec-ok", "fps": 15})
    assert r.status_code == 201, r.text
    try:
        wait_for(lambda: httpx.get(f"{streams}/sec-ok", timeout=30).json()["state"] == "finished", 120,
                 "the clip to finish")
        frames_out = httpx.get(f"{streams}/sec-ok", timeout=30).json()["frames_out"]
        lines = (outputs / "ok.jsonl").read_text().splitlines()
        assert frames_out > 0 and len(lines) == frames_out and json.loads(lines[0])["stream"] == "sec-ok"
    finally:
        httpx.delete(f"{streams}/sec-ok", timeout=60)


# 2 ------------------------------------------------------------------------------------------------
class _CountingHandler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self):
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_sources_outside_the_allowlist_are_refused_alike_and_never_fetched(streams, folders):
    from tests.conftest import free_port

    outside = folders["outside"]
    existing = outside / "secret.mp4"
    existing.write_bytes(b"not for you")
    missing = outside / "absent.mp4"
    a = _post(streams, {"source": str(existing)})
    b = _post(streams, {"source": str(missing)})
    assert a.status_code == b.status_code == 400
    # the same sentence whether the file exists or not: no oracle for files outside the media folder
    assert a.json()["error"].replace(str(existing), "P") == b.json()["error"].replace(str(missing), "P")
    assert _post(streams, {"source": f"file://{existing}"}).status_code == 400
    assert _post(streams, {"source": str(folders["media"] / ".." / outside.name / "secret.mp4")}).status_code == 400
    assert _post(streams, {"source": "0"}).status_code == 400  # cameras are off unless enabled

    port = free_port()
    server = http.server.HTTPServer(("127.0.0.1", port), _CountingHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for url in (f"http://127.0.0.1:{port}/clip.mp4", f"http://localhost:{port}/x", f"https://127.0.0.1:{port}/"):
            r = _post(streams, {"source": url})
            assert r.status_code == 400 and "not in the allowed camera hosts" in r.json()["error"], r.text
        r = _post(streams, {"source": f"ftp://127.0.0.1:{port}/x"})
        assert r.status_code == 400 and "scheme" in r.json()["error"]
    finally:
        server.shutdown()
    assert _CountingHandler.hits == 0  # the server never fetched an internal URL


def test_credentials_in_source_urls_never_come_back(streams):
    refused = _post(streams, {"source": f"rtsp://admin:{SECRET}@10.9.9.9:554/live?token=tok-{SECRET}"})
    assert refused.status_code == 400 and SECRET not in refused.text
    # an allowed host (unroutable) fails to open: the failure names the URL without its password
    failed = _post(streams, {"source": f"rtsp://admin:{SECRET}@192.0.2.10:554/live", "reconnect_attempts": 0})
    assert failed.status_code == 400 and SECRET not in failed.text and "***@192.0.2.10" in failed.text
    assert SECRET not in httpx.get(streams, timeout=30).text


# 3 ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tamper_model(demo_repo, tmp_path_factory):
    """A one-variant model registered for these tests (the demo model stays untouched)."""
    from model_registry.builders import build_onnx_variants

    repo, _ = demo_repo
    onnx = Path(__file__).resolve().parents[1] / "app" / "demo" / "assets" / "detector.onnx"
    variants = build_onnx_variants(onnx, [1], tmp_path_factory.mktemp("tamper-build"))
    version = repo.register_version("sec-tamper", variants, description="issue 14 test model")
    yield "sec-tamper", version
    repo.delete_version("sec-tamper", version)


def test_registry_values_never_become_paths_outside_the_cache(state, tamper_model, tmp_path):
    from model_registry.cache import IntegrityError
    from model_registry.repository import VARIANT_TAG, ModelRepository

    name, version = tamper_model
    cache = tmp_path / "cache"
    victim = tmp_path / "victim"
    victim.mkdir()
    repo = ModelRepository(state.tracking_uri, state=state, cache_dir=cache)
    key = f"{VARIANT_TAG}onnx.b1"
    original = repo.client.get_model_version(name, version).tags[key]
    record = json.loads(original)
    (victim / Path(record["file"]).name).write_bytes(b"x")  # so the old code found a 'cached' file there
    record["sha256"] = os.path.relpath(victim, cache)  # "../victim": blobs/../../victim after sha[:2]
    repo.client.set_model_version_tag(name, version, key, json.dumps(record))
    try:
        with pytest.raises(IntegrityError, match="not a sha256"):
            repo.find(name, version=version, batch_size=1)
        assert (victim / Path(record["file"]).name).exists()  # nothing outside the cache was deleted
    finally:
        repo.client.set_model_version_tag(name, version, key, original)


def test_node_index_cannot_override_the_registrys_hash(state, tamper_model, tmp_path):
    import hashlib

    from model_registry.builders import file_sha256
    from model_registry.repository import ModelRepository

    name, version = tamper_model
    repo = ModelRepository(state.tracking_uri, state=state, cache_dir=tmp_path / "cache")
    genuine = repo.find(name, version=version, batch_size=1)
    # an attacker on the node: a tampered blob filed under its own hash, and the index edited to match
    evil = b"tampered model bytes"
    evil_sha = hashlib.sha256(evil).hexdigest()
    evil_path = repo.cache.blob_path(evil_sha, genuine.path.name)
    evil_path.parent.mkdir(parents=True)
    evil_path.write_bytes(evil)
    index = next((tmp_path / "cache").glob(f"index/*/{name}/versions/{version}.json"))
    entry = json.loads(index.read_text())
    entry["variants"][0].update(sha256=evil_sha, size_bytes=len(evil))
    index.write_text(json.dumps(entry))
    again = repo.find(name, version=version, batch_size=1)
    assert again.sha256 == genuine.sha256 and file_sha256(again.path) == genuine.sha256


# 4 ------------------------------------------------------------------------------------------------
@pytest.fixture()
def api_token(state):
    from app.security.auth import ensure_api_token, token_path

    token = ensure_api_token(state)
    yield token
    token_path(state).unlink()


def test_token_file_is_owner_only_and_guards_state_changes(streams, state, api_token, serve_app, capsys):
    from app.cli import main
    from app.security.auth import token_path

    assert stat.S_IMODE(token_path(state).stat().st_mode) == 0o600
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-some-length"}, {"Authorization": api_token}):
        r = _post(streams, {"source": "clip.mp4"}, headers=headers)
        assert r.status_code == 401 and "token" in r.json()["error"], r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.delete(f"{streams}/nosuch", headers=headers, timeout=30).status_code == 401
    good = {"Authorization": f"Bearer {api_token}"}
    assert _post(streams, {"source": "missing.mp4"}, headers=good).status_code == 400  # past the guard
    assert httpx.delete(f"{streams}/nosuch", headers=good, timeout=30).status_code == 404
    assert httpx.get(streams, timeout=30).status_code == 200  # reading stays open
    # the CLI reads the state folder's token itself
    assert main(["streams", "rm", "nosuch", "--url", serve_app["url"]]) != 0
    assert "no stream" in capsys.readouterr().err


def test_inference_can_require_the_token_and_tritonclient_passes_it(deploy_apps, serve_app, api_token):
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    url = serve_app["url"]
    deploy_apps(detector={"auth_inference": True})  # a user_config change: reconfigured in place
    try:
        wait_for(lambda: httpx.post(f"{url}/v1/detect", content=_jpeg(), timeout=30).status_code == 401, 60,
                 "inference to need the token")
        good = {"Authorization": f"Bearer {api_token}"}
        assert httpx.post(f"{url}/v1/detect", content=_jpeg(), headers=good, timeout=30).status_code == 200
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200  # health stays open
        client = triton.InferenceServerClient(url=f"127.0.0.1:{serve_app['port']}")
        x = np.zeros((1, 3, 320, 320), np.float32)
        inp = triton.InferInput("images", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        with pytest.raises(InferenceServerException, match="token"):
            client.infer("demo-detector", [inp])
        out = client.infer("demo-detector", [inp], headers=good).as_numpy("output0")
        assert out.shape[0] == 1
    finally:
        deploy_apps(detector={})
    wait_for(lambda: httpx.post(f"{url}/v1/detect", content=_jpeg(), timeout=30).status_code == 200, 60,
             "inference to be open again")


# 5 ------------------------------------------------------------------------------------------------
def _claims(body: bytes, kind: str, w: int, h: int) -> bytes:
    """``body`` with its header rewritten to claim w x h pixels (the pixel data stays tiny)."""
    b = bytearray(body)
    if kind == "png":
        b[16:24] = w.to_bytes(4, "big") + h.to_bytes(4, "big")
    else:
        i = b.find(b"\xff\xc0")
        b[i + 5 : i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(b)


def test_image_size_is_refused_from_the_header_before_decoding(serve_app):
    url = serve_app["url"]
    pid = _replica_pid(url)
    img = np.full((48, 64, 3), 127, np.uint8)
    for kind in ("jpeg", "png"):
        bomb = _claims(cv2.imencode(f".{'jpg' if kind == 'jpeg' else 'png'}", img)[1].tobytes(), kind, 30000, 30000)
        r = httpx.post(f"{url}/v1/detect", content=bomb, headers={"Content-Type": f"image/{kind}"}, timeout=60)
        assert r.status_code == 400, r.text
        assert "30000x30000" in r.json()["error"] and "max_image_pixels" in r.json()["error"]
    assert _replica_pid(url) == pid


# 6, 7 --------------------------------------------------------------------------------------------
def _v2(url: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v2/models/demo-detector/infer", content=content,
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=120)


def _tensor_json(data: str, shape: list[int]) -> bytes:
    return ('{"inputs": [{"name": "images", "datatype": "FP32", "shape": ' + json.dumps(shape)
            + ', "data": ' + data + '}]}').encode()


def test_v2_compressed_body_is_bounded_while_inflating(serve_app):
    url = serve_app["url"]
    pid = _replica_pid(url)
    bomb = gzip.compress(b'{"inputs": [' + b" " * (100 * 1024 * 1024) + b"]}", compresslevel=9)
    assert len(bomb) < 200 * 1024
    r = _v2(url, bomb, {"Content-Encoding": "gzip"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"], r.text
    assert _replica_pid(url) == pid


def test_v2_numbers_and_nesting_get_a_named_400(serve_app):
    url = serve_app["url"]
    deep = _tensor_json("[" * 5000 + "1" + "]" * 5000, [1])
    r = _v2(url, deep)
    assert r.status_code == 400 and "levels deep" in r.json()["error"], r.text
    n = 3 * 320 * 320
    for big in ("1" + "0" * 400, "1e400", "-1e39"):  # a huge integer; floats beyond FP32 (or any float)
        r = _v2(url, _tensor_json("[" + ",".join(["0.5"] * (n - 1) + [big]) + "]", [1, 3, 320, 320]))
        assert r.status_code == 400 and "out of range" in r.json()["error"], r.text
    for token in ("NaN", "Infinity", "-Infinity"):
        r = _v2(url, _tensor_json("[" + ",".join(["0.5"] * (n - 1) + [token]) + "]", [1, 3, 320, 320]))
        assert r.status_code == 400 and token.lstrip("-") in r.json()["error"], r.text
    # binary data carrying NaN is refused as well, so no reply ever holds a bare NaN token
    raw = np.full((1, 3, 320, 320), np.nan, np.float32).tobytes()
    header = json.dumps({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 320, 320],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    r = _v2(url, header + raw, {"Inference-Header-Content-Length": str(len(header)),
                                "Content-Type": "application/octet-stream"})
    assert r.status_code == 400 and "NaN" in r.json()["error"], r.text


def test_large_json_bodies_do_not_stall_other_clients(serve_app):
    url = serve_app["url"]
    x = np.random.default_rng(0).random((2, 3, 320, 320), dtype=np.float32).round(4)
    body = _tensor_json(json.dumps(x.reshape(-1).tolist()), [2, 3, 320, 320])
    assert len(body) > 10 * 1024 * 1024
    stop = threading.Event()
    worst = [0.0]

    def ping() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            assert httpx.get(f"{url}/v2/health/live", timeout=60).status_code == 200
            worst[0] = max(worst[0], time.perf_counter() - t0)

    _v2(url, body)  # the first large body also starts the decoder's worker process
    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda _: _v2(url, body), range(3)))
    finally:
        stop.set()
        pinger.join()
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text[:300] for r in replies if r.status_code != 200]
    # on the event loop each parse held the replica for about 2 s here; off it, pings keep answering
    assert worst[0] < 1.5, f"a health check waited {worst[0]:.2f} s behind large JSON bodies"


def test_multimodel_app_uses_max_body_bytes(deploy_apps):
    app = {"name": "sec-multi", "route_prefix": "/sec-multi", "import_path": "deployments.multimodel:build_app",
           "args": {}, "deployments": [{"name": "MultiModel", "num_replicas": 1, "graceful_shutdown_timeout_s": 1,
                                        "ray_actor_options": {"num_cpus": 0},
                                        "user_config": {"budget_mb": 64, "max_body_bytes": 1024 * 1024}}]}
    config = deploy_apps([app])
    base = f"http://127.0.0.1:{config['http_options']['port']}/sec-multi"
    try:
        big = httpx.post(f"{base}/v2/models/demo-detector/infer", content=b"{" + b" " * (2 * 1024 * 1024) + b"}",
                         timeout=60)
        assert big.status_code == 413 and "max_body_bytes (1048576" in big.json()["error"], big.text
    finally:
        deploy_apps(remove=["sec-multi"])


# 8 ------------------------------------------------------------------------------------------------
def test_streams_are_admitted_only_within_the_detectors_capacity(streams, serve_app, state, folders, deploy_apps):
    import re

    from app.streams.admission import measured_rate

    deploy_apps([_streams_app(state, serve_app, folders, {})])  # the default: the measured capacity
    info = httpx.get(f"{serve_app['url']}/v1/info", timeout=10).json()
    expected = 0.75 * measured_rate({b: v["run_s"] for b, v in info["loaded_variants"].items()})
    ids, refused = [], None
    try:
        for i in range(40):
            r = _post(streams, {"source": "clip.mp4", "fps": 60, "loop": True, "id": f"adm{i}"})
            if r.status_code != 201:
                refused = r
                break
            ids.append(f"adm{i}")
        assert refused is not None and refused.status_code == 429, "40 streams of 60 fps were all admitted"
        message = refused.json()["error"]
        assert "fps are left" in message and "measured on the detector" in message, message
        capacity = float(re.search(r"streams may take ([0-9.]+) fps in all", message).group(1))
        assert 60 * len(ids) <= capacity < 60 * (len(ids) + 1)
        assert 0.5 * expected <= capacity <= 2 * expected  # the detector's rate moves a little as it runs
        # /v1/detect keeps answering beside the admitted streams
        assert httpx.post(f"{serve_app['url']}/v1/detect", content=_jpeg(), timeout=60).status_code == 200
    finally:
        for sid in ids:
            httpx.delete(f"{streams}/{sid}", timeout=60)
        deploy_apps([_streams_app(state, serve_app, folders, {"max_stream_fps": 10000})])


# OpenAPI and fuzz ----------------------------------------------------------------------------------
def test_openapi_document_describes_the_real_replies(serve_app):
    doc = httpx.get(f"{serve_app['url']}/openapi.json", timeout=10).json()
    detect = doc["paths"]["/v1/detect"]["post"]
    assert {"400", "413"} <= set(detect["responses"]) and "image/jpeg" in detect["requestBody"]["content"]
    infer = doc["paths"]["/v2/models/{name}/infer"]["post"]
    assert {"400", "404", "413"} <= set(infer["responses"])
    assert "application/octet-stream" in infer["requestBody"]["content"]
    assert infer["responses"]["400"]["content"]["application/json"]["schema"]["required"] == ["error"]


def test_fuzzed_requests_never_get_a_5xx_nor_restart_the_replica(serve_app, streams):
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    url = serve_app["url"]
    pid = _replica_pid(url)
    scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
    values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids,
                                                                                             max_size=4), max_leaves=20)
    tensor = st.fixed_dictionaries({
        "name": st.sampled_from(["images", "other", ""]),
        "datatype": st.sampled_from(["FP32", "FP16", "INT64", "BYTES", "BOOL", "X"]),
        "shape": st.lists(st.integers(min_value=-2, max_value=400), max_size=5),
    }, optional={"data": values, "parameters": st.dictionaries(st.sampled_from(["binary_data_size", "x"]),
                                                               st.integers(-5, 10**7), max_size=2)})
    v2_body = st.fixed_dictionaries({}, optional={"inputs": st.lists(tensor, max_size=2) | values, "id": values,
                                                  "outputs": values, "parameters": values})
    headers = st.fixed_dictionaries({}, optional={
        "Inference-Header-Content-Length": st.integers(-3, 400).map(str) | st.text(max_size=4),
        "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "identity"]),
    })

    # whole tensors of the served shape filled with one awkward scalar, and deep nesting: what random
    # structures almost never reach past the shape check
    n = 3 * 320 * 320
    scalar = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e400", "1" + "0" * 400, "-1e39", "null", "true",
                              '"x"', "[1]", "{}", "0.5", "-0"])
    full = scalar.map(lambda tok: _tensor_json("[" + ",".join([tok] * n) + "]", [1, 3, 320, 320]))
    deep = st.integers(1, 6000).map(lambda d: _tensor_json("[" * d + "0.5" + "]" * d, [1] * min(d, 4)))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(body=v2_body, tail=st.binary(max_size=64), hdrs=headers, raw=st.binary(max_size=256),
           crafted=full | deep,
           target=st.sampled_from(["v2", "v2-version", "v2-crafted", "detect", "streams"]))
    @example(body={}, tail=b"", hdrs={}, raw=b"", target="v2-crafted",  # the probe's own findings, every run
             crafted=_tensor_json("[" + ",".join(["0.5"] * (n - 1) + ["1" + "0" * 400]) + "]", [1, 3, 320, 320]))
    @example(body={}, tail=b"", hdrs={}, raw=b"", target="v2-crafted",
             crafted=_tensor_json("[" * 5000 + "0.5" + "]" * 5000, [1]))
    def probe(body, tail, hdrs, raw, crafted, target):
        text = crafted if target == "v2-crafted" else json.dumps(body).encode() + tail
        ascii_headers = {k: v for k, v in hdrs.items() if v.isascii() and v.isprintable()}
        if target == "v2-crafted":
            ascii_headers = {}
        if target == "detect":
            r = httpx.post(f"{url}/v1/detect", content=raw, timeout=60)
        elif target == "streams":
            r = httpx.post(streams, content=text, headers=ascii_headers, timeout=60)
        else:
            path = "/versions/1" if target == "v2-version" else ""  # v2 and v2-crafted: the served model
            r = httpx.post(f"{url}/v2/models/demo-detector{path}/infer", content=text, headers=ascii_headers,
                           timeout=60)
        assert r.status_code < 500, (target, r.status_code, r.text[:300])
        if r.status_code >= 400:
            assert "error" in r.json()

    probe()
    assert _replica_pid(url) == pid


# the mechanisms on their own (no Ray needed) -------------------------------------------------------
def test_redact_removes_url_credentials_and_secret_query_values():
    from app.security.sources import redact

    assert redact(f"rtsp://admin:{SECRET}@cam/live") == "rtsp://***@cam/live"
    assert SECRET not in redact(f"https://cam/x?user=a&password={SECRET}&token={SECRET}#f")


def test_source_policy_matches_hosts_by_name_or_literal_network(tmp_path):
    from app.errors import BadRequest
    from app.security.sources import SourcePolicy

    policy = SourcePolicy(hosts=["cam1.local", "10.1.0.0/16"])
    assert policy.check("rtsp://cam1.local/live", tmp_path).kind == "url"
    assert policy.check("rtsp://10.1.2.3/live", tmp_path).target == "rtsp://10.1.2.3/live"
    for refused in ("rtsp://10.2.0.1/", "rtsp://cam2.local/", "rtsp://cam1.local.evil.example/", "file:///x",
                    "rtsp://[::1]/", "rtsp://cam1.local:99999/"):
        with pytest.raises(BadRequest):
            policy.check(refused, tmp_path)
    with pytest.raises(ValueError):
        SourcePolicy(schemes=["file"])


def test_inflate_refuses_truncated_and_oversized_streams():
    import zlib

    from app.errors import BadRequest, PayloadTooLarge
    from app.security.bodies import inflate

    data = gzip.compress(b"a" * 5000)
    assert inflate(data, "gzip", 5000) == b"a" * 5000
    with pytest.raises(PayloadTooLarge):
        inflate(data, "gzip", 4999)
    with pytest.raises(BadRequest, match="ends before"):
        inflate(data[: len(data) // 2], "gzip", 10**6)
    assert inflate(zlib.compress(b"xyz"), "deflate", 3) == b"xyz"


def test_json_depth_ignores_brackets_inside_strings():
    from app.security.bodies import json_depth

    assert json_depth(b'{"a": "[[[[\\"]]", "b": [[1], [2, [3]]]}') == 4
    assert json_depth(b"[]") == 1 and json_depth(b"3") == 0


def test_declared_size_reads_jpeg_after_exif_and_png():
    from app.imaging import declared_size

    jpeg = _jpeg(64, 48)
    exif = b"\xff\xe1" + (2 + 3000).to_bytes(2, "big") + b"E" * 3000  # an APP1 segment before the frame header
    assert declared_size(jpeg) == (64, 48) and declared_size(jpeg[:2] + exif + jpeg[2:]) == (64, 48)
    assert declared_size(cv2.imencode(".png", np.zeros((7, 9, 3), np.uint8))[1].tobytes()) == (9, 7)
    assert declared_size(b"GIF89a....") is None


def test_ensure_api_token_is_created_once_owner_only(tmp_path, monkeypatch):
    from app.security.auth import TOKEN_ENV, ensure_api_token, load_api_token, token_path
    from app.state import StateDir

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    state = StateDir(tmp_path)
    assert load_api_token(state) is None
    token = ensure_api_token(state)
    assert ensure_api_token(state) == token == load_api_token(state) and len(token) >= 32
    assert stat.S_IMODE(token_path(state).stat().st_mode) == 0o600
    monkeypatch.setenv(TOKEN_ENV, "operator-chosen-token-123")
    assert ensure_api_token(state) == load_api_token(state) == "operator-chosen-token-123"
