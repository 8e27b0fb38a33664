"""The operator's console at /ui: the pure views (no Ray), then the real pages in a real headless browser.

The browser test drives Debian's ``chromium`` with its ``chromedriver`` through Selenium (no browser
is downloaded) against the session's running app, and checks what an operator sees and does: the
real node, detector, stream and registry of this instance; a batch size set in the page is in force
in the service (checked with the JSON API); a stream added there runs; refusals (no token, a wrong
token, a bad value) show the server's own message. It saves the screenshots in docs/img/.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import wait_for

SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "img"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


# -- the views, from plain data ----------------------------------------------------------------------
def test_nodes_show_kind_tags_resources_and_the_collector_reading():
    from app.console.views import node_views

    nodes = [{"NodeID": "b" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.7", "NodeManagerHostname": "jet",
              "Resources": {"CPU": 6.0, "GPU": 1.0, "jetson_node": 1.0, "node:10.0.0.7": 1.0, "memory": 8e9}},
             {"NodeID": "a" * 56, "Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeManagerHostname": "head",
              "Resources": {"CPU": 2.0, "node:__internal_head__": 1.0}}]
    sample = {"timestamp": 5.0, "cpu_percent": float("nan"), "ram_used_bytes": 1, "ram_total_bytes": 2,
              "devices": [{"kind": "jetson", "index": 0, "name": "GR3D", "util_percent": 40.0, "mem_used_bytes": 3,
                           "mem_total_bytes": 4, "note": ""}], "notes": []}
    head, jetson = node_views(nodes, {"b" * 56: sample})
    assert head["head"] and head["kinds"] == ["untagged"] and head["sample"] is None
    assert jetson["kinds"] == ["jetson_node"] and "node:10.0.0.7" not in jetson["resources"]
    assert jetson["sample"]["cpu_percent"] is None  # NaN (no probe) is not a reading
    assert jetson["sample"]["devices"][0]["util_percent"] == 40.0


def test_placements_name_the_missing_resource_and_a_lost_node():
    from app.console.views import placement_views

    details = {"applications": {"tenancy": {"route_prefix": None, "deployments": {
        "det__gpu": {"status": "UPDATING", "message": "Deployment is taking long to start.\nmore", "target_num_replicas": 2,
                     "deployment_config": {"user_config": {"model": "det", "backend": "tensorrt", "engine_instances": 2,
                                                           "tracking_uri": "http://user:secret@mlflow:5000"},
                                           "ray_actor_options": {"num_gpus": 0.5, "resources": {"gpu_node": 0.001},
                                                                 "runtime_env": {"env_vars": {"EDGEBATCH_API_TOKEN": "secret"}}}},
                     "replicas": [{"replica_id": "r1", "state": "RUNNING", "node_id": "n-gone", "pid": 7},
                                  {"replica_id": "r2", "state": "PENDING_ALLOCATION", "node_id": None}]}}}}}
    pending = {"tenancy": {"det__gpu": "no alive node offers resource gpu_node for model det placement gpu"}}
    nodes = [{"NodeID": "n-gone", "Alive": False, "NodeManagerAddress": "10.0.0.9"}]
    (row,) = placement_views(details, pending, nodes)
    assert row["model"] == "det" and row["engine_instances"] == 2 and row["running_replicas"] == 1
    assert row["resources"] == {"gpu_node": 0.001, "GPU": 0.5}
    assert row["replicas"][0]["node"] == "10.0.0.9" and row["replicas"][1]["node_id"] is None
    assert "no alive node offers resource gpu_node" in row["problems"][0]
    assert "node that is gone: 10.0.0.9" in row["problems"][1]
    assert row["problems"][2] == "Deployment is taking long to start."
    assert "secret" not in json.dumps(row)  # only named fields leave the Serve config (no env, no URIs)


def test_detector_view_has_the_real_time_criterion_of_the_window():
    from app.console.views import detector_view

    stats = {"batch_sizes": [1, 2, 4, 8], "node_id": "n", "metrics": {
        "batches": 10, "throughput": 40.0, "d_batch_s": 0.05, "mean_batch_size": 3.0, "queue_len_mean": 1.5,
        "queue_len_max": 4, "batch_sizes": {2: 5, 4: 5}, "window_s": 10.0}}
    control = {"stream_fps": 30.0, "policy": "throughput_aware", "pin": None, "last_decision": {"action": "raise"}}
    view = detector_view("edgebatch", {"model": "m", "max_batch_size": 4, "config_refused": None}, stats, control)
    w = view["window"]
    assert w["criterion_s"] == pytest.approx(0.1) and w["margin_s"] == pytest.approx(0.05)
    assert view["policy"] == "throughput_aware" and view["last_decision"]["action"] == "raise"
    idle = detector_view("edgebatch", {"model": "m"}, {"metrics": {"batches": 0}}, None)["window"]
    assert idle["criterion_s"] is None and idle["d_batch_s"] is None and idle["margin_s"] is None


def test_the_preview_holds_one_frame_and_encodes_it_once_when_asked():
    import cv2

    from app.constants import PREVIEW_MAX_WIDTH
    from app.pipeline import Detection
    from app.streams.sinks import FrameResult, LatestFrame

    latest = LatestFrame()
    assert latest.jpeg() is None
    for seq in range(3):
        image = np.full((720, 1280, 3), 40 * seq, np.uint8)
        latest.write(FrameResult("s", seq, seq, 0.0, [Detection((10, 10, 200, 100), 0.9, 0, "car")], image=image))
    first = latest.jpeg()
    assert latest.jpeg() is first  # the same frame is not encoded again
    decoded = cv2.imdecode(np.frombuffer(first, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape[1] == PREVIEW_MAX_WIDTH and int(decoded[300, 600, 0]) in range(70, 90)  # frame 2 (value 80)
    latest.close()
    assert latest.jpeg() == first  # a finished stream keeps showing its last frame


def test_console_reads_are_shared_for_a_second_and_a_failed_one_is_retried():
    import asyncio

    from deployments.console import SharedReads

    calls = []

    async def read():
        calls.append(1)
        await asyncio.sleep(0.01)
        if len(calls) == 2:
            raise RuntimeError("busy")
        return len(calls)

    async def scenario():
        reads = SharedReads(ttl_s=60)
        assert await asyncio.gather(*(reads.get("k", read) for _ in range(5))) == [1] * 5  # one read for all
        reads.ttl_s = 0
        with pytest.raises(RuntimeError):
            await reads.get("k", read)
        reads.ttl_s = 60
        assert await reads.get("k", read) == 3  # the failure is not kept

    asyncio.run(scenario())
    assert len(calls) == 3


# -- the pages in a real browser ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no chromium + chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1440,1000",
                "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def console(deploy_apps, serve_app, state, tmp_path_factory):
    """The app with the controller, the streams app (a media folder with a clip) and the collectors; an API token."""
    from app.demo.video import write_sample_video
    from app.security.auth import ensure_api_token, token_path
    from deployments.collectors import MONITOR_APP, monitor_app_entry
    from deployments.controller import APP_NAME as CONTROLLER_APP

    media = tmp_path_factory.mktemp("console-media")
    write_sample_video(media / "yard.mp4", seconds=2, fps=10, width=640, height=360, seed=5, n_objects=4)
    apps = {a["name"]: copy.deepcopy(a) for a in serve_app["config"]["applications"]}
    controller, streams = apps[CONTROLLER_APP], apps["edgebatch-streams"]
    for app in (controller, streams):
        app.pop("runtime_env", None)
        app["deployments"][0]["graceful_shutdown_timeout_s"] = 1
    controller["deployments"][0]["user_config"].update({"interval_s": 1.0, "policy": "manual"})
    streams["args"] = {**streams["args"], "sources": {"media_folders": [str(media)]}, "admission": {"max_stream_fps": 1000}}
    deploy_apps([controller, streams, monitor_app_entry(sample_interval_s=1.0, reconcile_interval_s=0.5)])
    token = ensure_api_token(state)
    base, auth = serve_app["url"], {"Authorization": f"Bearer {token}"}
    info = httpx.get(f"{base}/v1/info", timeout=30).json()
    try:
        yield {"url": base, "token": token, "auth": auth}
    finally:
        for s in httpx.get(f"{base}/v1/streams", timeout=30).json()["streams"]:
            httpx.delete(f"{base}/v1/streams/{s['id']}", headers=auth, timeout=60)
        # the configured size again, and no pin, for the tests after these
        httpx.put(f"{base}/v1/batch/{info['model']}/size", json={"batch_size": info["max_batch_size"]}, headers=auth, timeout=180)
        httpx.delete(f"{base}/v1/batch/{info['model']}/size", headers=auth, timeout=60)
        token_path(state).unlink()
        deploy_apps(remove=[CONTROLLER_APP, "edgebatch-streams", MONITOR_APP])


def _text(driver, css: str) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, css))


def _until(driver, predicate, what: str, timeout_s: float = 90):
    """Poll ``predicate`` until truthy; the live page re-renders its lists, so an element read while it is
    replaced (stale) just means: look again."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.25,
                         ignored_exceptions=(StaleElementReferenceException,)).until(lambda d: predicate(d), message=what)


def _click_when_there(driver, css: str, what: str) -> None:
    """Find and click in one step, again if the live list replaced the element in between."""
    from selenium.webdriver.common.by import By

    def clicked(d):
        found = d.find_elements(By.CSS_SELECTOR, css)
        if not found:
            return False
        found[0].click()
        return True

    _until(driver, clicked, what)


def _tab(driver, view: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-view="{view}"]').click()


def _shot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(SCREENSHOTS / f"console-{name}.png"))


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_console_shows_the_instance_and_its_actions_take_effect(browser, console, demo_repo):
    import ray
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    d, base, auth = browser, console["url"], console["auth"]
    repo, demo_version = demo_repo

    # the page itself: static files from the package, no token in it, a strict content security policy
    page = httpx.get(f"{base}/ui", timeout=30)
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert console["token"] not in page.text
    for name in ("index.html", "console.js", "charts.js", "console.css", "favicon.svg"):  # offline: nothing from elsewhere
        text = httpx.get(f"{base}/ui/{name}", timeout=30).text.replace("http://www.w3.org/2000/svg", "")
        assert "http://" not in text and "https://" not in text, name
    assert httpx.get(f"{base}/ui/..%2Fapi_token", timeout=30).status_code == 404

    d.get(f"{base}/ui")
    # 1. nodes: this instance's Ray node with its collector reading (CPU, RAM) and charts
    head = next(n for n in ray.nodes() if n["Alive"])
    card = f'.card.node[data-node="{head["NodeID"]}"]'
    _until(d, lambda d: head["NodeManagerAddress"] in _text(d, card) and "%" in _text(d, card)
           and "no collector reading" not in _text(d, card), "the head node with a collector reading")
    assert "CPU" in _text(d, card) and "RAM" in _text(d, card)
    _until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, f"{card} polyline")) >= 2, "the CPU and RAM history charts")
    _shot(d, "nodes")

    # 4. streams: one started by another client shows up, live, with its preview and real-time criterion
    r = httpx.post(f"{base}/v1/streams", json={"source": "yard.mp4", "fps": 5, "loop": True, "id": "gate"}, headers=auth, timeout=120)
    assert r.status_code == 201, r.text
    _tab(d, "streams")
    _until(d, lambda d: "running" in _text(d, 'tr[data-stream="gate"]') and "yard.mp4" in _text(d, 'tr[data-stream="gate"]'),
           "the API's stream in the table")
    _until(d, lambda d: d.execute_script(
        "const i = document.querySelector('.preview[data-stream=\"gate\"] img'); return i && i.naturalWidth > 0;"),
        "the stream's live preview")
    _until(d, lambda d: "met" in _text(d, 'tr[data-stream="gate"] .criterion') or "missed" in _text(d, 'tr[data-stream="gate"] .criterion'),
           "the stream's real-time criterion")
    # a refused action shows the server's message, as text (markup in it stays text)
    d.find_element(By.ID, "stream-source").send_keys("<img src=x onerror=alert(1)>.mp4")
    d.find_element(By.ID, "stream-add").click()
    _until(d, lambda d: "refused (401)" in _text(d, "#stream-message"), "the refusal without a token")
    assert "API token" in _text(d, "#stream-message")
    d.find_element(By.ID, "token-input").send_keys(console["token"])
    d.find_element(By.ID, "token-save").click()
    assert console["token"] not in d.page_source and "token set" in _text(d, "#token-state")
    d.find_element(By.ID, "stream-add").click()
    _until(d, lambda d: "refused (400)" in _text(d, "#stream-message"), "the refusal of a source outside the media folder")
    assert "<img src=x" in _text(d, "#stream-message") and not d.find_elements(By.CSS_SELECTOR, "#stream-message img")
    # a stream added in the console runs in the service
    d.find_element(By.ID, "stream-source").clear()
    d.find_element(By.ID, "stream-source").send_keys("yard.mp4")
    fps = d.find_element(By.ID, "stream-fps")
    fps.clear()
    fps.send_keys("5")
    d.find_element(By.ID, "stream-id").send_keys("dock")
    d.find_element(By.ID, "stream-loop").click()
    d.find_element(By.ID, "stream-add").click()
    _until(d, lambda d: "stream dock started" in _text(d, "#stream-message"), "the stream add")
    shown = httpx.get(f"{base}/v1/streams/dock", timeout=30).json()
    assert shown["source"].endswith("yard.mp4") and shown["options"]["fps"] == 5 and shown["options"]["loop"] is True
    _until(d, lambda d: d.execute_script(
        "return [...document.querySelectorAll('.preview img')].filter(i => i.naturalWidth > 0).length;") == 2,
        "both previews")
    _shot(d, "streams")

    # 3. detectors: the served model, its variants and the controller; a batch size set here is in force
    info = httpx.get(f"{base}/v1/info", timeout=30).json()
    _tab(d, "detectors")
    det = f'.card.detector[data-model="{info["model"]}"]'
    _until(d, lambda d: f'v{info["version"]}' in _text(d, det) and info["backend"] in _text(d, det), "the detector card")
    for v in info["loaded_variants"].values():
        assert v["sha256"] in _text(d, det)
    target = next(n for n in (4, 2, 8, 1) if n != info["max_batch_size"])
    Select(d.find_element(By.ID, "batch-model")).select_by_value(info["model"])
    d.find_element(By.ID, "token-forget").click()  # no token: refused
    _until(d, lambda d: len(Select(d.find_element(By.ID, "batch-size")).options) > 1, "the sizes of the detector")
    Select(d.find_element(By.ID, "batch-size")).select_by_value(str(target))
    d.find_element(By.ID, "batch-set").click()
    _until(d, lambda d: "refused (401)" in _text(d, "#batch-message"), "the refusal without a token")
    d.find_element(By.ID, "token-input").send_keys("wrong-token-of-some-length")  # a wrong token: refused
    d.find_element(By.ID, "token-save").click()
    d.find_element(By.ID, "batch-set").click()
    _until(d, lambda d: "not this server's API token" in _text(d, "#batch-message"), "the refusal of a wrong token")
    assert httpx.get(f"{base}/v1/info", timeout=30).json()["max_batch_size"] == info["max_batch_size"]
    d.find_element(By.ID, "token-input").send_keys(console["token"])
    d.find_element(By.ID, "token-save").click()
    d.find_element(By.ID, "batch-set").click()
    _until(d, lambda d: f"batch size {target} (pinned)" in _text(d, "#batch-message"), "the batch size change", 180)
    assert httpx.get(f"{base}/v1/info", timeout=30).json()["max_batch_size"] == target
    wait_for(lambda: httpx.get(f"{base}/v1/batch", timeout=30).json()["detectors"][info["model"]]["pin"], 30, "the pin")
    _until(d, lambda d: f"pinned at {target}" in _text(d, det), "the pin on the card")
    _until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, f"{det} .chart polyline")) >= 4, "the detector's charts")
    _shot(d, "detectors")
    # a bad value: the server's validation message
    d.find_element(By.ID, "policy-fps").send_keys("-5")
    Select(d.find_element(By.ID, "policy-select")).select_by_value("throughput_aware")
    d.find_element(By.ID, "policy-apply").click()
    _until(d, lambda d: "refused (400)" in _text(d, "#batch-message") and "fps" in _text(d, "#batch-message"), "the bad fps")
    d.find_element(By.ID, "policy-fps").clear()
    d.find_element(By.ID, "policy-apply").click()
    _until(d, lambda d: "policy throughput_aware" in _text(d, "#batch-message"), "the policy switch")
    assert httpx.get(f"{base}/v1/batch", timeout=30).json()["detectors"][info["model"]]["policy"] == "throughput_aware"
    d.find_element(By.ID, "batch-release").click()
    _until(d, lambda d: "released; policy manual" in _text(d, "#batch-message"), "the release")
    control = httpx.get(f"{base}/v1/batch", timeout=30).json()["detectors"][info["model"]]
    assert control["policy"] == "manual" and control["pin"] is None
    _until(d, lambda d: "[manual]" in _text(d, det), "the release on the card")

    # 2. placements: the detector deployment on this node, its replicas and engine instances
    _tab(d, "placements")
    row = 'tr[data-deployment="edgebatch/Detector"]'
    _until(d, lambda d: "demo-detector" in _text(d, row) and head["NodeManagerAddress"] in _text(d, row), "the placement row")
    assert "1 / 1" in _text(d, row)
    _shot(d, "placements")

    # 5. registry: versions, aliases and every variant's hash; promote through the page
    described = repo.describe("demo-detector")
    production = described.aliases["production"]
    _tab(d, "registry")
    model = '.card.model[data-model="demo-detector"]'
    _until(d, lambda d: f'version {production}' in _text(d, model), "the registry card")
    for v in next(v for v in described.versions if v.version == production).variants:
        assert v.sha256 in _text(d, model)
    Select(d.find_element(By.ID, "promote-model")).select_by_value("demo-detector")
    d.find_element(By.ID, "promote-version").send_keys("999")
    d.find_element(By.ID, "promote-apply").click()
    _until(d, lambda d: "refused (404)" in _text(d, "#promote-message"), "the refusal of a missing version")
    d.find_element(By.ID, "promote-version").clear()
    d.find_element(By.ID, "promote-version").send_keys(production)
    alias = d.find_element(By.ID, "promote-alias")
    alias.clear()
    alias.send_keys("console-check")
    d.find_element(By.ID, "promote-apply").click()
    _until(d, lambda d: f"demo-detector@console-check \u2192 version {production}" in _text(d, "#promote-message"), "the promotion")
    assert repo.resolve("demo-detector", alias="console-check") == production
    _until(d, lambda d: "@console-check" in _text(d, model), "the new alias on the card")
    _shot(d, "registry")
    repo.client.delete_registered_model_alias("demo-detector", "console-check")

    # the stream added in the console is removed there too
    _tab(d, "streams")
    _click_when_there(d, 'button.stream-remove[data-stream="dock"]', "the remove button")
    _until(d, lambda d: "stream dock removed" in _text(d, "#stream-message"), "the removal")
    assert httpx.get(f"{base}/v1/streams/dock", timeout=30).status_code == 404
