"""The Adaptive Batch Controller: variant swap safety, the decision loop on fakes, and the live path.

The first half needs no Ray: ``VariantPool`` under a concurrent swap, and ``ControlLoop``
driven by a fake detector whose throughput per batch size is known. The second half runs
on the session's Serve app: a swap under concurrent HTTP load, a load failure, and the
controller deployment deciding with a reason in its status.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from app.config import DetectorConfig
from app.detector import VariantPool
from app.engines.base import ModelVariant
from deployments.controller import (
    ControllerConfig,
    ControlLoop,
    observation_from_promql,
    observation_from_stats,
)
from policies.batch_size import ReasonCode, algorithm1
from tests.conftest import stop_process, wait_for

# ----------------------------------------------------------------------------- VariantPool, no Ray


class GatedEngine:
    """An engine whose run blocks until the test opens the gate (an in-flight batch)."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.input_shape = (batch_size, 3, 8, 8)
        self.device = "cpu"
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.closed = False
        self.runs = 0

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        assert not self.closed, "ran on a closed engine"
        self.entered.set()
        assert self.gate.wait(30)
        self.runs += 1
        return [np.full((x.shape[0], 2), float(self.batch_size), dtype=np.float32)]

    def close(self) -> None:
        self.closed = True

    def memory_bytes(self) -> int:
        return 1000 * self.batch_size


def _pool(sizes_that_fail: tuple[int, ...] = ()) -> tuple[VariantPool, dict[int, GatedEngine]]:
    engines: dict[int, GatedEngine] = {}

    def load(n: int):
        if n in sizes_that_fail:
            raise MemoryError(f"no room for batch {n}")
        engines[n] = GatedEngine(n)
        return engines[n], ModelVariant(name="m", version="1", backend="onnx", batch_size=n, path="/x", sha256="0" * 64)

    return VariantPool(load, max_resident=2), engines


def test_old_variant_is_released_only_after_its_in_flight_batch():
    pool, engines = _pool()
    old = pool.ensure(4)
    engines[4].entered.clear()  # the warm-up run set it; wait for the batch below
    engines[4].gate.clear()
    done: list[np.ndarray] = []
    t = threading.Thread(target=lambda: done.append(old.run(np.zeros((4, 3, 8, 8), np.float32))[0]))
    t.start()
    assert engines[4].entered.wait(60)
    pool.ensure(8)
    (gone,) = pool.retire([8])
    closer = threading.Thread(target=gone.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and not engines[4].closed  # waits for the in-flight batch
    assert pool.pick(3).batch_size == 8  # new batches already go to the new variant
    engines[4].gate.set()
    t.join(60)
    closer.join(60)
    assert done and done[0][0, 0] == 4.0 and engines[4].closed


def test_a_batch_that_picked_a_retired_variant_is_rerouted_not_failed():
    from app.config import DetectorConfig
    from app.detector import Detector

    pool, engines = _pool()
    det = Detector(DetectorConfig(max_batch_size=4, batch_sizes=[1, 2, 4, 8]), pool._loader, labels=["a"], input_size=(8, 8))
    det.pool = pool
    pool.ensure(4)
    for lv in pool.retire([]):  # retired and closed between pick and run: simulate with a stale pick
        stale = lv
        lv.close()
    pool.ensure(8)
    original_pick = pool.pick
    calls = iter([stale])
    pool.pick = lambda n: next(calls, None) or original_pick(n)  # first pick returns the closed variant
    out, lv = det.predict(np.zeros((3, 3, 8, 8), np.float32))
    assert lv.batch_size == 8 and out.shape == (3, 2) and out[0, 0] == 8.0


def test_smallest_loaded_variant_that_fits_and_load_failure_keeps_the_pool():
    from app.errors import Unavailable

    pool, _ = _pool(sizes_that_fail=(16,))
    pool.ensure(1)
    pool.ensure(8)
    assert pool.pick(1).batch_size == 1 and pool.pick(2).batch_size == 8 and pool.pick(12).batch_size == 8
    with pytest.raises(Unavailable, match="batch-16"):
        pool.ensure(16)
    assert sorted(pool.loaded) == [1, 8]


# ----------------------------------------------------------------------------- ControlLoop on fakes

CURVE = {1: 40.0, 2: 70.0, 4: 90.0, 8: 92.0, 16: 91.0}  # items/s per size: saturates at 4


@dataclass
class FakeDetector:
    """Answers stats() like the deployment, from a throughput curve; may refuse some sizes."""

    size: int = 1
    fail_sizes: tuple[int, ...] = ()
    clock: float = 0.0
    sets: int = 0

    async def stats(self, stream_fps, since):
        self.clock += 1.0
        thr = CURVE[self.size]
        return {
            "model": "m", "max_batch_size": self.size, "batch_sizes": sorted(CURVE), "node_id": "node-1",
            "metrics": {"batches": 10, "throughput": thr, "d_batch_s": self.size / thr, "clock": self.clock},
        }

    async def set_batch_size(self, n):
        self.sets += 1
        if n in self.fail_sizes:
            raise RuntimeError(f"could not load the batch-{n} variant: out of memory")
        self.size = n
        return {"max_batch_size": n}


def _run(loop: ControlLoop, det: FakeDetector, ticks: int) -> None:
    async def go():
        for _ in range(ticks):
            await loop.tick({"app": det})

    asyncio.run(go())


def test_throughput_aware_converges_where_a_larger_batch_stops_paying_and_logs_reasons():
    loop = ControlLoop(ControllerConfig(policy="throughput_aware", policy_params={"min_gain": 0.05}, stream_fps=30.0))
    det = FakeDetector(size=1)
    _run(loop, det, 30)
    st = loop.status()["detectors"]["m"]
    assert det.size == 4, st["history"]  # 8 gave +2% over 4: stepped back and settled
    reasons = [h["reason"] for h in st["history"]]
    assert all(reasons) and st["reason"]
    assert any("step back to 4" in r for r in reasons) or "settled at 4" in st["reason"]
    assert st["reason_code"] in ("settled", "no_throughput_gain")
    sets_after = det.sets
    _run(loop, det, 10)
    assert det.size == 4 and det.sets == sets_after  # stationary: no oscillation


def test_algorithm1_keeps_raising_while_the_criterion_holds():
    loop = ControlLoop(ControllerConfig(policy="algorithm1", stream_fps=30.0))
    det = FakeDetector(size=1)
    _run(loop, det, 30)
    assert det.size == 16  # the paper's rule alone ignores that 8 and 16 buy nothing here
    assert loop.status()["detectors"]["m"]["reason_code"] == "at_largest"


def test_a_load_failure_keeps_the_current_size_and_is_recorded():
    loop = ControlLoop(ControllerConfig(policy="algorithm1", stream_fps=30.0))
    det = FakeDetector(size=2, fail_sizes=(8,))
    _run(loop, det, 12)
    st = loop.status()["detectors"]["m"]
    assert det.size == 4
    assert st["last_failure"]["batch_size"] == 8 and st["last_failure"]["kept_batch_size"] == 4
    assert "out of memory" in st["last_failure"]["error"]
    failed = [h for h in st["history"] if h["reason_code"] == "load_failed"]
    assert failed and failed[-1]["batch_size"] == 4 and "kept 4" in failed[-1]["reason"]


def test_manual_mode_reads_but_never_changes_and_policy_switch_is_checked():
    loop = ControlLoop(ControllerConfig(policy="manual"))
    det = FakeDetector(size=2)
    _run(loop, det, 3)
    st = loop.status()["detectors"]["m"]
    assert det.sets == 0 and st["current_batch_size"] == 2 and st["action"] is None
    with pytest.raises(ValueError, match="unknown batch-size policy"):
        loop.set_policy("m", "fastest", {})
    with pytest.raises(ValueError, match="unknown policy parameter"):
        loop.set_policy("m", "aimd", {"speed": 3})
    with pytest.raises(ValueError, match="size=N"):
        loop.set_policy("m", "fixed", {})
    loop.set_policy("m", "fixed", {"size": 8})
    _run(loop, det, 1)
    assert det.size == 8 and loop.status()["detectors"]["m"]["reason"].startswith("fixed at 8")


def test_decisions_are_exported_with_a_reason_code():
    seen: list[tuple[str, str]] = []
    loop = ControlLoop(ControllerConfig(policy="aimd"), on_decision=lambda ctl, e: seen.append((e["action"], e["reason_code"])))
    _run(loop, FakeDetector(size=1), 6)
    assert seen and any(a == "raise" for a, _ in seen)
    assert all(code in set(ReasonCode) for _, code in seen)


@dataclass
class SwitchableDetector(FakeDetector):
    """A fake detector that can be switched to another model, and reports the batches that formed."""

    model: str = "m"
    formed: float | None = None  # mean items per formed batch
    one_variant: bool = False  # every batch ran on the batch-1 variant (small batches on a CPU)

    async def stats(self, stream_fps, since):
        out = await super().stats(stream_fps, since)
        out["model"] = self.model
        if self.formed is not None:
            out["metrics"]["mean_batch_size"] = min(self.formed, self.size)
        if self.one_variant:
            out["metrics"]["variant_items"] = {1: 500}
        return out


def _call(coro):
    return asyncio.run(coro)


def test_the_controller_follows_the_model_a_detector_serves_now():
    from app.errors import NotFound

    loop = ControlLoop(ControllerConfig(policy="manual"))
    det = SwitchableDetector(size=2, fail_sizes=(16,))
    _run(loop, det, 2)
    with pytest.raises(Exception, match="still serving batch 2"):
        _call(loop.pin("m", 16, {"app": det}))
    _call(loop.pin("m", 8, {"app": det}))
    assert det.size == 8 and loop.status()["detectors"]["m"]["last_failure"]["batch_size"] == 16
    det.model = "new"  # the Detector's user_config now names another model
    _run(loop, det, 1)
    status = loop.status()["detectors"]
    assert list(status) == ["new"]  # the old model's pin and failure are gone with it
    assert status["new"]["last_failure"] is None and status["new"]["pin"] is None
    assert status["new"]["reason_code"] == "model_changed" and "was m" in status["new"]["reason"]
    with pytest.raises(NotFound, match="no detector serves model 'm'; detectors serve: new"):
        _call(loop.pin("m", 4, {"app": det}))
    assert det.size == 8  # the other model was not resized
    _call(loop.pin("new", 4, {"app": det}))
    assert det.size == 4 and loop.status()["detectors"]["new"]["pin"]["batch_size"] == 4


def test_a_detector_whose_app_is_gone_leaves_the_status():
    loop = ControlLoop(ControllerConfig(policy="manual"))
    a, b = SwitchableDetector(size=2, model="a"), SwitchableDetector(size=4, model="b")
    asyncio.run(loop.tick({"app-a": a, "app-b": b}))
    assert sorted(loop.status()["detectors"]) == ["a", "b"]
    asyncio.run(loop.tick({"app-b": b}))  # `serve delete app-a`
    assert sorted(loop.status()["detectors"]) == ["b"]


def test_a_model_switch_between_readings_is_followed_by_the_operator_api_at_once():
    loop = ControlLoop(ControllerConfig(policy="manual"))
    det = SwitchableDetector(size=2)
    _run(loop, det, 1)
    det.model = "other"  # no tick since: the operator's call itself reads who serves what
    ctl = _call(loop.pin("other", 4, {"app": det}))
    assert ctl.model == "other" and det.size == 4


def test_a_pin_is_recorded_and_yields_to_a_new_size_from_the_serve_config():
    loop = ControlLoop(ControllerConfig(policy="manual"))
    det = SwitchableDetector(size=8)
    _run(loop, det, 1)
    _call(loop.pin("m", 2, {"app": det}))
    st = loop.status()["detectors"]["m"]
    assert st["pin"]["batch_size"] == 2 and st["pin"]["by"] == "edgebatch batch set"
    assert st["reason_code"] == "pinned" and st["policy"] == "fixed"
    _run(loop, det, 3)
    assert det.size == 2 and loop.status()["detectors"]["m"]["reason_code"] == "fixed"
    det.size = 4  # `edgebatch up` with a new user_config max_batch_size: Serve reconfigured the replica
    sets = det.sets
    _run(loop, det, 5)
    st = loop.status()["detectors"]["m"]
    assert det.size == 4 and det.sets == sets  # the pin no longer overrides the config
    assert st["pin"] is None and st["policy"] == "manual"
    cleared = [h for h in st["history"] if h["reason_code"] == "pin_cleared"]
    assert cleared and "pin on 2 cleared" in cleared[-1]["reason"] and "outside the controller" in cleared[-1]["reason"]


def test_a_re_pin_by_the_fixed_policy_has_its_own_reason_code():
    loop = ControlLoop(ControllerConfig(policy="fixed", policy_params={"size": 8}))
    det = SwitchableDetector(size=2)
    _run(loop, det, 3)
    moves = [h for h in loop.status()["detectors"]["m"]["history"] if h["action"] != "keep"]
    assert det.size == 8 and moves and moves[0]["reason_code"] == "pin_applied"
    assert all(h["reason_code"] != "deadline_missed" for h in loop.status()["detectors"]["m"]["history"])


def test_batch_manual_releases_a_pin_and_stops_deciding():
    loop = ControlLoop(ControllerConfig(policy="algorithm1", stream_fps=30.0))
    det = SwitchableDetector(size=1)
    _run(loop, det, 1)
    _call(loop.pin("m", 2, {"app": det}))
    loop.set_policy("m", "manual", {})
    st = loop.status()["detectors"]["m"]
    assert st["pin"] is None and st["policy"] == "manual" and st["reason_code"] == "manual"
    sets = det.sets
    _run(loop, det, 10)
    assert det.size == 2 and det.sets == sets


def test_reason_codes_come_from_the_policy_not_from_the_text():
    loop = ControlLoop(ControllerConfig(policy="throughput_aware", stream_fps=30.0))
    det = SwitchableDetector(size=4, fail_sizes=(8,))
    _run(loop, det, 20)
    history = loop.status()["detectors"]["m"]["history"]
    failed = [h for h in history if h["reason_code"] == "load_failed"]
    later = history[history.index(failed[-1]) + 1:]
    assert det.size == 4 and later
    # the settled reason still names the failure, but the windows after it are "settled", not "load_failed"
    assert all(h["reason_code"] == "settled" for h in later) and any("failed" in h["reason"] for h in later)


def test_n_over_f_uses_the_batches_that_formed_not_the_size_in_force():
    stats = {"max_batch_size": 16, "metrics": {"batches": 40, "throughput": 30.0, "d_batch_s": 0.12,
                                               "mean_batch_size": 3.0, "variant_items": {1: 20, 16: 100}}}
    obs = observation_from_stats(stats, 30.0)
    assert obs.formed_batch_size == 3.0 and obs.budget.criterion_s == pytest.approx(3 / 30)
    assert obs.items_on_own_variant == (100, 120)
    from policies.batch_size import ControllerState, PolicyConfig

    decision, _ = algorithm1([obs], ControllerState(current=16), PolicyConfig())
    # 3 items arrive in 0.1 s at 30 fps; a batch takes 0.12 s: the stream is falling behind
    assert decision.action == "lower" and decision.code == ReasonCode.DEADLINE_MISSED, decision.reason
    assert "N=3 formed of max 16" in decision.reason


def test_a_gain_counts_only_when_the_larger_variant_ran():
    """--fps 5 with small batches: every reply ran on the batch-1 variant, whatever the size in force."""

    @dataclass
    class NoisyDetector(SwitchableDetector):
        async def stats(self, stream_fps, since):
            out = await super().stats(stream_fps, since)
            out["metrics"]["throughput"] = 40.0 * (1 + 0.1 * self.size.bit_length())  # noise that looks like a gain
            out["metrics"]["d_batch_s"] = 0.02
            return out

    seen: list[dict] = []
    loop = ControlLoop(ControllerConfig(policy="throughput_aware", stream_fps=5.0), on_decision=lambda c, e: seen.append(e))
    det = NoisyDetector(size=1, formed=1.5, one_variant=True)
    _run(loop, det, 30)
    assert det.size == 1, seen
    codes = [e["reason_code"] for e in seen]
    assert "variant_not_run" in codes and codes[-1] == "settled"
    assert any("variant served 0% of the items" in e["reason"] for e in seen)


def test_observations_from_stats_with_and_without_a_device_sample():
    @dataclass
    class Dev:
        util_percent: float = 50.0
        mem_used_bytes: int = 3
        mem_total_bytes: int = 4

    @dataclass
    class Node:
        cpu_percent: float = 20.0
        ram_used_bytes: int = 1
        ram_total_bytes: int = 10
        devices: list = None

    stats = {"max_batch_size": 4, "metrics": {"batches": 3, "throughput": 80.0, "d_batch_s": 0.05}}
    gpu = observation_from_stats(stats, 30.0, Node(devices=[Dev()]))
    assert gpu.mem_fraction == pytest.approx(0.75) and gpu.device_util == pytest.approx(0.5)
    cpu_only = observation_from_stats(stats, 30.0, Node(devices=[]))
    assert cpu_only.mem_fraction == pytest.approx(0.1)
    assert observation_from_stats(stats, 30.0, None).mem_fraction is None
    assert observation_from_stats({**stats, "metrics": {"batches": 0}}, 30.0) is None


def test_promql_path_builds_the_same_observation():
    @dataclass
    class Sample:
        labels: dict
        value: float

    series = {"throughput": 88.0, "d_batch": 0.07, "max_batch_size": 4}
    asked: list[str] = []

    def query(expr: str):
        asked.append(expr)
        for key, value in series.items():
            if f"ray_edgebatch_{key}" in expr:
                return [Sample({"model": "m"}, value)]
        return []

    obs = observation_from_promql(query, "m", 30.0, current=4)
    assert obs.batch_size == 4 and obs.throughput == 88.0 and obs.d_batch_s == pytest.approx(0.07)
    assert all('model="m"' in e for e in asked)
    assert observation_from_promql(query, "m", 30.0, current=8) is None  # not scraped at the new size yet
    assert observation_from_promql(lambda e: [], "m", 30.0, current=4) is None
    # with the node: the accelerator's memory when the collectors export one, else the node's RAM
    series.update({"node_ram_used_bytes": 2e9, "node_ram_total_bytes": 8e9})
    cpu_node = observation_from_promql(query, "m", 30.0, current=4, node="n1")
    assert cpu_node.mem_fraction == pytest.approx(0.25) and cpu_node.device_util is None
    series.update({"device_util_percent": 60.0, "device_mem_used_bytes": 3e9, "device_mem_total_bytes": 4e9})
    gpu_node = observation_from_promql(query, "m", 30.0, current=4, node="n1")
    assert gpu_node.mem_fraction == pytest.approx(0.75) and gpu_node.device_util == pytest.approx(0.6)
    assert any('node="n1"' in e and 'kind!="cpu"' in e for e in asked)


# ----------------------------------------------------------------------------- live, on the session app


class Load:
    """Closed-loop HTTP clients in threads, recording every reply (status, variant batch size).

    Each request asks for a long deadline (``X-Request-Timeout``): these tests assert that a swap or a
    refused config fails no request, and a stall of the shared CI cores past the default 3 s budget
    would be the deadline working (a JSON 503), not a swap failing. What any non-200 said is kept."""

    DEADLINE_S = DetectorConfig().max_deadline_s  # the longest budget a client may ask for

    def __init__(self, url: str, clients: int = 6) -> None:
        from app.bench.images import sample_jpegs

        self.frames = sample_jpegs(n=4, width=640, height=360)
        self.url = f"{url}/v1/detect"
        self.stop = threading.Event()
        self.replies: list[tuple[int, int | None]] = []
        self.served: list[tuple[str | None, int | None, float]] = []  # (version, items in its batch, when sent)
        self._lock = threading.Lock()
        self.errors: list[str] = []
        self.failures: list[str] = []  # status and body of each non-200 reply
        self.threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(clients)]

    def _worker(self, i: int) -> None:
        headers = {"Content-Type": "image/jpeg", "X-Request-Timeout": str(self.DEADLINE_S)}
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    sent = time.monotonic()
                    r = client.post(self.url, content=self.frames[i % len(self.frames)], headers=headers)
                    body = r.json() if r.status_code == 200 else {}
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                    with self._lock:  # the two lists stay aligned
                        self.replies.append((r.status_code, body.get("batch_size")))
                        self.served.append((body.get("version"), body.get("items_in_batch"), sent))
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(90)

    def count(self) -> int:
        return len(self.replies)


def _detector():
    from ray import serve

    return serve.get_deployment_handle("Detector", app_name="edgebatch")


@pytest.mark.ray
def test_swap_under_concurrent_load_fails_no_request(serve_app):
    handle = _detector()
    before = handle.set_batch_size.remote(8, 0.05).result(timeout_s=120)
    try:
        with Load(serve_app["url"]) as load:
            wait_for(lambda: load.count() >= 10, 120, "steady load before the swap")
            info = handle.set_batch_size.remote(2, 0.05).result(timeout_s=120)
            swapped_at = time.monotonic()
            assert info.max_batch_size == 2 and info.pid == before.pid
            mark = load.count()
            wait_for(lambda: load.count() >= mark + 15, 120, "replies after the swap to 2")
            asked4_at = time.monotonic()
            handle.set_batch_size.remote(4, 0.05).result(timeout_s=120)
            mark4 = load.count()
            wait_for(lambda: any(b == 4 for _, b in load.replies[mark4:]), 120, "a reply from the batch-4 variant")
        statuses = [s for s, _ in load.replies]
        assert load.errors == [] and set(statuses) == {200}, (load.errors[:3], load.failures[:3])
        # no request sent after the switch to 2 returned (and before the one to 4) is served by a larger variant
        after = [(b, *load.served[i]) for i, (_, b) in enumerate(load.replies[:mark4])
                 if swapped_at < load.served[i][2] < asked4_at]
        assert after and max(b for b, *_ in after) <= 2, [(b, v, n, round(t - swapped_at, 3)) for b, v, n, t in after]
        info = handle.info.remote().result(timeout_s=30)
        assert info.pid == before.pid, "Serve replaced the Detector replica during the test"
        assert sorted(info.loaded_variants) == [1, 4]  # target + smallest resident, 8 and 2 released
        stats = handle.stats.remote(30.0).result(timeout_s=30).to_dict()
        assert stats["metrics"]["batches"] > 0 and stats["metrics"]["stages"]["infer"]["mean_s"] > 0
        assert stats["metrics"]["batch_sizes"] and max(stats["metrics"]["batch_sizes"]) <= 4
    finally:
        handle.set_batch_size.remote(8, 0.005).result(timeout_s=120)


@pytest.mark.ray
def test_load_failure_keeps_serving_on_the_current_variant_and_is_reported(serve_app):
    from deployments import launcher

    handle = _detector()
    config = copy.deepcopy(serve_app["config"])
    uc = config["applications"][0]["deployments"][0]["user_config"]
    uc["batch_sizes"] = [1, 2, 4, 8, 16, 32]  # 32 is allowed, but the registry has no such variant
    launcher.deploy(config)
    wait_for(lambda: 32 in handle.stats.remote().result(timeout_s=30).batch_sizes, 90, "batch_sizes with 32 to apply")
    try:
        with pytest.raises(Exception, match="no onnx variant for batch 32"):
            handle.set_batch_size.remote(32).result(timeout_s=120)
        stats = handle.stats.remote().result(timeout_s=30).to_dict()
        assert stats["max_batch_size"] == 8 and 32 not in stats["loaded_variants"]
        assert stats["last_load_failure"]["batch_size"] == 32 and stats["last_load_failure"]["kept_batch_size"] == 8
        from app.bench.images import sample_jpegs

        r = httpx.post(f"{serve_app['url']}/v1/detect", content=sample_jpegs(1, 640, 360)[0], timeout=60)
        assert r.status_code == 200 and r.json()["batch_size"] in (1, 8)
    finally:
        launcher.deploy(serve_app["config"])
        wait_for(lambda: 32 not in handle.stats.remote().result(timeout_s=30).batch_sizes, 90, "batch_sizes restored")


@pytest.mark.ray
def test_controller_deployment_decides_with_a_reason_and_pins_on_request(serve_app, deploy_apps, demo_repo, tmp_path):
    from ray import serve

    from app.errors import BadRequest, NotFound
    from deployments.controller import APP_NAME, DEPLOYMENT_NAME

    app = copy.deepcopy(next(a for a in serve_app["config"]["applications"] if a["name"] == APP_NAME))
    app.pop("runtime_env", None)
    app["deployments"][0]["user_config"].update(
        {"interval_s": 1.0, "policy": "throughput_aware", "detectors": [{"app": "edgebatch"}]})
    deploy_apps([app])
    controller = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
    detector = _detector()
    try:
        with Load(serve_app["url"], clients=4):
            def decided():
                status = controller.status.remote().result(timeout_s=30)
                d = status["detectors"].get("demo-detector", {})
                by_policy = (d.get("last_decision") or {}).get("policy") == "throughput_aware"  # not a config_changed note
                return d.get("reason") if d.get("policy") == "throughput_aware" and by_policy else None

            st = wait_for(decided, 150, "a controller decision with a reason")
        status = controller.status.remote().result(timeout_s=30)["detectors"]["demo-detector"]
        assert status["policy"] == "throughput_aware" and status["action"] in ("raise", "lower", "keep")
        assert st and status["last_observation"]["throughput"] > 0

        pinned = controller.set_fixed.remote("demo-detector", 2).result(timeout_s=120)
        assert pinned["current_batch_size"] == 2 and pinned["policy"] == "fixed" and pinned["pin"]["batch_size"] == 2
        assert "operator pinned batch size 2" in pinned["reason"] and pinned["reason_code"] == "pinned"
        assert detector.info.remote().result(timeout_s=30).max_batch_size == 2
        with pytest.raises(BadRequest, match="not one of"):  # refusals cross the handle as app.errors
            controller.set_fixed.remote("demo-detector", 3).result(timeout_s=60)
        with pytest.raises(NotFound, match="no detector serves model 'nope'"):
            controller.set_policy.remote("nope", "aimd").result(timeout_s=60)

        from deployments.status import serve_summary

        summary = serve_summary()
        assert summary["applications"]["edgebatch"]["detector"]["controller"]["policy"] == "fixed"

        # the operator's CLI on the same controller
        import io
        import json
        from contextlib import redirect_stderr, redirect_stdout

        from app.cli import main

        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            assert main(["batch", "set", "demo-detector", "4"]) == 0
            assert main(["batch", "status"]) == 0
            assert main(["batch", "auto", "demo-detector", "--policy", "aimd", "--fps", "15"]) == 0
            assert main(["batch", "status", "--json"]) == 0
            assert main(["batch", "set", "no-such-model", "4"]) == 2
            assert main(["status"]) == 0
        text = out.getvalue()
        assert "demo-detector: batch size 4 (pinned" in text and "policy aimd" in text
        assert "pinned at 4 since" in text and "[pinned]" in text
        cli_status = json.loads([line for line in text.splitlines() if line.startswith("{")][-1])
        assert cli_status["detectors"]["demo-detector"]["policy"] == "aimd"
        assert cli_status["detectors"]["demo-detector"]["stream_fps"] == 15.0
        assert "no detector serves model 'no-such-model'" in err.getvalue() and "Traceback" not in err.getvalue()
        assert "controller: policy aimd" in text  # `edgebatch status` shows the controller's view

        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            assert main(["batch", "manual", "demo-detector"]) == 0
        assert "demo-detector: manual at batch size" in out.getvalue()
        back = controller.status.remote().result(timeout_s=30)["detectors"]["demo-detector"]
        assert back["policy"] == "manual" and back["pin"] is None and back["reason_code"] == "manual"

        # the Detector switched to another model: the controller follows its name
        from model_registry.builders import build_onnx_variants, with_labels
        from model_registry.demo import DEFAULT_ASSETS

        repo, demo_version = demo_repo
        labels = json.loads(repo.list_variants("demo-detector", version=demo_version)[0].tags["labels"])
        copies = build_onnx_variants(DEFAULT_ASSETS / "detector.onnx", [1, 2, 4, 8, 16], tmp_path)
        version = repo.register_version("demo-copy", [with_labels(v, labels) for v in copies])
        deploy_apps(detector={"model": "demo-copy", "version": str(version)})
        wait_for(lambda: detector.info.remote().result(timeout_s=30).model == "demo-copy", 180, "the switch")
        moved = controller.set_fixed.remote("demo-copy", 4).result(timeout_s=120)
        assert moved["model"] == "demo-copy" and moved["current_batch_size"] == 4
        assert detector.info.remote().result(timeout_s=30).max_batch_size == 4
        with pytest.raises(NotFound, match="no detector serves model 'demo-detector'; detectors serve: demo-copy"):
            controller.set_fixed.remote("demo-detector", 2).result(timeout_s=60)
        status = controller.status.remote().result(timeout_s=30)["detectors"]
        assert "demo-detector" not in status and status["demo-copy"]["last_failure"] is None
    finally:
        deploy_apps(remove=[APP_NAME], detector={})
        wait_for(lambda: detector.info.remote().result(timeout_s=30).model == "demo-detector", 180, "the model back")
        detector.set_batch_size.remote(8, 0.005).result(timeout_s=120)


@pytest.mark.ray
def test_promql_observation_from_a_real_prometheus(serve_app, tmp_path):
    """The controller's PromQL path against Debian's Prometheus scraping this cluster's metrics port."""
    import os
    import subprocess

    from app.monitoring.promql import PromQLClient, prometheus_config
    from deployments.collectors import ray_metrics_targets
    from tests.conftest import free_port

    binary = "/usr/bin/prometheus"
    if not os.path.exists(binary):
        pytest.skip("/usr/bin/prometheus is not installed (Debian package `prometheus`)")
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(prometheus_config(ray_metrics_targets(), scrape_interval_s=1))
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen([binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    client = PromQLClient(f"http://127.0.0.1:{port}", timeout_s=5)
    try:
        wait_for(lambda: proc.poll() is not None or client.ready(), 60, "Prometheus to be ready")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        stats = _detector().stats.remote().result(timeout_s=30).to_dict()
        with Load(serve_app["url"], clients=3):
            obs = wait_for(lambda: observation_from_promql(client.query, "demo-detector", 30.0,
                                                           current=stats["max_batch_size"], node=stats["node_id"]),
                           150, "the detector's gauges in Prometheus")
        assert obs.batch_size == stats["max_batch_size"] and obs.throughput > 0 and obs.d_batch_s > 0
        hist = client.query('sum(ray_edgebatch_batch_size_count{model="demo-detector"})')
        assert hist and hist[0].value > 0  # the per-batch histogram is exported too
    finally:
        stop_process(proc)
        log.close()


def test_plan_cuts_a_small_batch_into_smaller_runs_only_when_padding_costs_more():
    pool, _ = _pool()
    b1, b8 = pool.ensure(1), pool.ensure(8)
    b1.run_s, b8.run_s = 0.010, 0.080  # CPU-like: time grows with the padded size
    assert [lv.batch_size for lv in pool.plan(5)] == [1] * 5
    assert [lv.batch_size for lv in pool.plan(8)] == [8]
    assert [lv.batch_size for lv in pool.plan(12)] == [8, 1, 1, 1, 1]  # beyond the largest: pieces
    b8.run_s = 0.030  # GPU-like: the padded run is cheaper than five small ones
    assert [lv.batch_size for lv in pool.plan(5)] == [8]

    from app.config import DetectorConfig
    from app.detector import Detector

    det = Detector(DetectorConfig(max_batch_size=8, batch_sizes=[1, 8]), pool._loader, labels=["a"], input_size=(8, 8))
    det.pool = pool
    b8.run_s = 0.080
    out, lv = det.predict(np.zeros((3, 3, 8, 8), np.float32))
    assert out.shape == (3, 2) and list(out[:, 0]) == [1.0, 1.0, 1.0] and lv.batch_size == 1
    out, lv = det.predict(np.zeros((10, 3, 8, 8), np.float32))
    assert out.shape == (10, 2) and list(out[:, 0]) == [8.0] * 8 + [1.0] * 2 and lv.batch_size == 8


# ----------------------------------------------------------------------------- state that outlives the controller


def test_a_restarted_controller_keeps_the_operators_policy_and_pin():
    """Issue 15: after a kill of the controller replica the operator's throughput_aware policy came back as
    `manual`. With a record store (the GCS KV store in a cluster) the new loop reads it back."""
    from tests.fakes.records import DictRecords

    records = DictRecords()
    first = ControlLoop(ControllerConfig(policy="manual"), records=records)
    det, other = SwitchableDetector(size=2, model="m"), SwitchableDetector(size=4, model="pinned")
    asyncio.run(first.tick({"app": det, "app-2": other}))
    first.set_policy("m", "throughput_aware", {"min_gain": 0.1})
    _call(first.pin("pinned", 8, {"app-2": other}))

    again = ControlLoop(ControllerConfig(policy="manual"), records=records)  # the restarted replica
    asyncio.run(again.tick({"app": det, "app-2": other}))
    st = again.status()["detectors"]
    assert st["m"]["policy"] == "throughput_aware" and st["m"]["params"] == {"min_gain": 0.1}
    assert st["pinned"]["policy"] == "fixed" and st["pinned"]["pin"]["batch_size"] == 8
    assert other.size == 8
    assert [h["reason_code"] for h in st["pinned"]["history"]][-1] in ("pinned", "fixed")  # history came back too


def test_a_config_naming_another_policy_replaces_the_operators_earlier_choice():
    """CI failure (2026-12-02): the console test left an operator's `manual` in the GCS record, and a later
    deploy of the controller with `throughput_aware` never decided. An operator's choice outlives a restart
    under the same config; a config that names another policy is the newer word (as a pin yields to a new
    size from the Serve config), on a restart and on a live reconfigure alike."""
    from tests.fakes.records import DictRecords

    records = DictRecords()
    first = ControlLoop(ControllerConfig(policy="manual"), records=records)
    det = SwitchableDetector(size=2, model="m")
    asyncio.run(first.tick({"app": det}))
    _call(first.pin("m", 4, {"app": det}))

    same = ControlLoop(ControllerConfig(policy="manual", interval_s=5.0), records=records)  # restart, same policy
    asyncio.run(same.tick({"app": det}))
    assert same.status()["detectors"]["m"]["pin"]["batch_size"] == 4

    newer = ControlLoop(ControllerConfig(policy="throughput_aware"), records=records)  # restart, another policy
    asyncio.run(newer.tick({"app": det}))
    st = newer.status()["detectors"]["m"]
    assert st["policy"] == "throughput_aware" and st["pin"] is None
    assert any(h["reason_code"] == "config_changed" for h in st["history"])
    assert records.get("m")["policy"] == "throughput_aware"

    newer.set_policy("m", "aimd", {})  # live: the operator chooses, then a config with another policy arrives
    newer.config = ControllerConfig(policy="throughput_aware", stream_fps=15.0)
    newer.apply_config()
    st = newer.status()["detectors"]["m"]
    assert st["policy"] == "throughput_aware" and st["stream_fps"] == 15.0
    newer.set_policy("m", "aimd", {})
    newer.config = ControllerConfig(policy="throughput_aware", stream_fps=15.0, interval_s=9.0)
    newer.apply_config()  # the policy part is unchanged: the operator's choice holds
    assert newer.status()["detectors"]["m"]["policy"] == "aimd"


def test_a_detector_that_was_away_comes_back_with_its_policy():
    """A detector app missing from one reading (its replica restarting) must not cost the operator's policy."""
    from tests.fakes.records import DictRecords

    loop = ControlLoop(ControllerConfig(policy="manual"), records=DictRecords())
    det = SwitchableDetector(size=2)
    _run(loop, det, 1)
    loop.set_policy("m", "aimd", {})
    asyncio.run(loop.tick({}))  # the app is away for a moment
    assert loop.status()["detectors"] == {}
    _run(loop, det, 1)
    assert loop.status()["detectors"]["m"]["policy"] == "aimd"


def test_a_model_no_detector_serves_any_more_leaves_no_record():
    from tests.fakes.records import DictRecords

    records = DictRecords()
    loop = ControlLoop(ControllerConfig(policy="manual"), records=records)
    det = SwitchableDetector(size=2, model="old")
    _run(loop, det, 1)
    loop.set_policy("old", "aimd", {})
    det.model = "new"
    _run(loop, det, 1)
    assert "old" not in records.keys() and loop.status()["detectors"]["new"]["policy"] == "manual"
