"""Batch-size policies: invariants (hypothesis), convergence on synthetic curves, recorded traces.

The synthetic pipeline below is also the documented model behind ``tests/traces/*.jsonl``:
``python -m tests.test_policy_batch_size`` rewrites them, and a test checks the files
still match it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies.batch_size import (
    DEFAULT_POLICY,
    POLICIES,
    ControllerState,
    Decision,
    Observation,
    PolicyConfig,
    RealTimeBudget,
    ReasonCode,
    get_policy,
    replay,
    summarize,
)

TRACES = Path(__file__).parent / "traces"
SIZES = (1, 2, 4, 8, 16)
ADAPTIVE = ("algorithm1", "aimd", "throughput_aware")
GB = 10**9


@dataclass(frozen=True)
class SyntheticPipeline:
    """A staged pipeline at batch N: pre and post cost ``pre_s``/``post_s`` per frame on the
    CPU, inference ``a + b*N + c*N^2`` on the device (c > 0: bandwidth saturation).

    d_batch is the sum of the stages; throughput is N over the slowest stage, because the
    stages run as a pipeline; memory is ``mem_base + mem_per_item*N`` of the device, and
    a size whose memory would pass ``oom_at`` fails to load. ``table`` replaces the
    inference curve with measured images/s per size (the CPU case).
    """

    fps: float
    a: float = 0.0
    b: float = 0.0
    c: float = 0.0
    pre_s: float = 0.0
    post_s: float = 0.0
    mem_base: float | None = None
    mem_per_item: float = 0.0
    oom_at: float = 1.0
    table: tuple[tuple[int, float], ...] = ()

    def infer_s(self, n: int) -> float:
        if self.table:
            return n / dict(self.table)[n]
        return self.a + self.b * n + self.c * n * n

    def capacity(self, n: int) -> float:
        return n / max(self.infer_s(n), self.pre_s * n, self.post_s * n)

    def d_batch(self, n: int) -> float:
        return self.infer_s(n) + (self.pre_s + self.post_s) * n

    def mem(self, n: int) -> float | None:
        return None if self.mem_base is None else self.mem_base + self.mem_per_item * n

    def meets(self, n: int) -> bool:
        return RealTimeBudget(n, self.fps).is_met(self.d_batch(n))

    def fails(self, n: int) -> bool:
        m = self.mem(n)
        return m is not None and m > self.oom_at

    def observe(self, n: int, *, noise: float = 0.0, rng: random.Random | None = None, t: float = 0.0) -> Observation:
        jitter = 1.0 + (rng.gauss(0.0, noise) if rng is not None and noise else 0.0)
        m = self.mem(n)
        total = 8 * GB
        failed = self.fails(n)
        return Observation(
            batch_size=n,
            d_batch_s=round(self.d_batch(n) * jitter, 6),
            fps=self.fps,
            throughput=0.0 if failed else round(self.capacity(n) / jitter, 4),
            device_util=None,
            mem_used_bytes=None if m is None else int(min(m, 1.0) * total),
            mem_total_bytes=None if m is None else total,
            failed=failed,
            timestamp=round(t, 3),
        )


def closed_loop(
    policy_name: str, model: SyntheticPipeline, config: PolicyConfig, windows: int = 80, per_window: int = 4
) -> list[Decision]:
    policy = get_policy(policy_name)
    state = ControllerState()
    size = config.initial_size
    out = []
    for _ in range(windows):
        decision, state = policy([model.observe(size)] * per_window, state, config)
        out.append(decision)
        size = decision.batch_size
    return out


def settled_size(decisions: Sequence[Decision], tail: int) -> int | None:
    """The size if the last ``tail`` decisions changed nothing, else None."""
    last = decisions[-tail:]
    if all(d.action == "keep" for d in last) and len({d.batch_size for d in last}) == 1:
        return last[-1].batch_size
    return None


def reachable_best(model: SyntheticPipeline, config: PolicyConfig) -> tuple[list[int], float]:
    """Sizes a controller climbing from the smallest may use, and the best capacity among them."""
    sizes = []
    for n in config.allowed_sizes:
        if model.fails(n) or not model.meets(n):
            break
        sizes.append(n)
        m = model.mem(n)
        if m is not None and m >= config.mem_threshold:
            break
    return sizes, max(model.capacity(n) for n in sizes)


# ---------------------------------------------------------------- basics


def test_real_time_budget_is_n_over_f() -> None:
    b = RealTimeBudget(8, 30.0)
    assert b.criterion_s == pytest.approx(8 / 30)
    assert RealTimeBudget.criterion(4, 20.0) == pytest.approx(0.2)
    assert b.margin_s(0.210) == pytest.approx(8 / 30 - 0.210)
    assert b.is_met(0.266) and not b.is_met(8 / 30)
    assert b.worst_frame_latency_s(0.1) == pytest.approx(7 / 30 + 0.1)


def test_get_policy_rejects_unknown_name_listing_valid_ones() -> None:
    assert get_policy() is POLICIES[DEFAULT_POLICY] is POLICIES["throughput_aware"]
    with pytest.raises(ValueError, match="aimd, algorithm1, fixed, throughput_aware"):
        get_policy("greedy")


def test_config_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        PolicyConfig(allowed_sizes=(4, 2))
    with pytest.raises(ValueError, match="start_size"):
        PolicyConfig(start_size=3)


def test_reason_names_the_numbers() -> None:
    obs = Observation(8, 0.210, 30.0, 120.0, mem_used_bytes=4 * GB, mem_total_bytes=8 * GB)
    decision, _ = get_policy("algorithm1")([obs], ControllerState(raise_streak=5), PolicyConfig())
    assert decision.action == "raise" and decision.batch_size == 16
    assert "d_batch 0.210 s < N/F 0.267 s" in decision.reason and "memory 50%" in decision.reason


def test_empty_window_keeps_the_size_in_force() -> None:
    for name in POLICIES:
        decision, state = get_policy(name)([], ControllerState(current=4), PolicyConfig(start_size=4))
        assert decision.batch_size == 4 and decision.action == "keep"


def test_fixed_always_returns_the_configured_size() -> None:
    config = PolicyConfig(start_size=8)
    miss = Observation(2, 1.0, 30.0, 2.0)
    decision, _ = get_policy("fixed")([miss], ControllerState(), config)
    assert decision.batch_size == 8
    assert {d.batch_size for d in closed_loop("fixed", SyntheticPipeline(30, a=0.01, b=0.001), config)} == {8}


# ---------------------------------------------------------------- invariants

observations = st.builds(
    Observation,
    batch_size=st.sampled_from(SIZES),
    d_batch_s=st.floats(0.001, 2.0),
    fps=st.sampled_from((5.0, 15.0, 30.0, 60.0)),
    throughput=st.floats(1.0, 500.0),
    mem_used_bytes=st.one_of(st.none(), st.integers(0, 8 * GB)),
    mem_total_bytes=st.just(8 * GB),
    failed=st.booleans(),
)


def _window_at(size: int, obs: Sequence[Observation]) -> list[Observation]:
    return [replace(o, batch_size=size) for o in obs]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ADAPTIVE),
    windows=st.lists(st.lists(observations, min_size=1, max_size=4), min_size=1, max_size=30),
    sizes=st.lists(st.sampled_from(SIZES), min_size=30, max_size=30),
    reprobe=st.sampled_from((None, 3)),
)
def test_adaptive_policies_never_raise_on_a_miss_a_failure_or_full_memory(
    name: str, windows: list[list[Observation]], sizes: list[int], reprobe: int | None
) -> None:
    """Open loop: the size in force is arbitrary (even not what the policy chose). These windows do not
    report formed batch sizes, so no policy can call them saturated (see the test after this one)."""
    config = PolicyConfig(reprobe_after_windows=reprobe)
    policy = get_policy(name)
    state = ControllerState()
    for size, raw in zip(sizes, windows):
        window = _window_at(size, raw)
        decision, state = policy(window, state, config)
        assert decision.batch_size in config.allowed_sizes
        w = summarize(window)
        # a miss is judged at the stream rate in force (the window's last): an operator may have
        # changed --fps inside the window, and N/F of the old rate no longer binds
        missed_any = any(o.failed or not RealTimeBudget(o.filled_size, window[-1].fps).is_met(o.d_batch_s)
                         for o in window)
        mem_full = w.mem_fraction is not None and w.mem_fraction >= config.mem_threshold
        if missed_any or mem_full:
            assert decision.action != "raise", decision.reason
            assert decision.batch_size <= size
        if decision.action == "raise":
            assert decision.batch_size > size


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(ADAPTIVE),
    windows=st.lists(st.lists(st.tuples(observations, st.floats(0.2, 1.0)), min_size=1, max_size=4),
                     min_size=1, max_size=30),
    sizes=st.lists(st.sampled_from(SIZES), min_size=30, max_size=30),
)
def test_a_raise_on_a_miss_only_when_the_device_is_saturated(name, windows, sizes) -> None:
    """With formed sizes reported, throughput_aware may raise on a miss when every batch was full and fewer
    items/s came out than the stream sent (lowering cannot help then); never on a failure or full memory."""
    config = PolicyConfig()
    policy = get_policy(name)
    state = ControllerState()
    for size, raw in zip(sizes, windows):
        window = [replace(o, batch_size=size, formed_batch_size=max(0.5, fill * size), variant_items=((size, 10),))
                  for o, fill in raw]
        decision, state = policy(window, state, config)
        w = summarize(window)
        mem_full = w.mem_fraction is not None and w.mem_fraction >= config.mem_threshold
        if decision.action != "raise":
            continue
        assert decision.batch_size > size
        assert not w.failed and not mem_full, decision.reason
        missed = any(not RealTimeBudget(o.filled_size, window[-1].fps).is_met(o.d_batch_s) for o in window)
        if missed:  # a probe up, or back up to the size that measured more items/s: both only when saturated
            assert name == "throughput_aware", decision.reason
            assert decision.code in (ReasonCode.SATURATED, ReasonCode.NO_THROUGHPUT_GAIN), decision.reason
            assert w.formed_batch_size >= size - 0.5 and w.throughput < w.fps * (1 - config.min_gain)


def test_predicted_capacity_is_affine_in_the_batch_time() -> None:
    from policies.batch_size import predicted_capacity

    # one size measured: batch time no longer than there (capacity at most linear in N)
    assert predicted_capacity({1: 25.0}, 4) == pytest.approx(100.0)
    # two: the line through them, 20 ms + 5 ms/frame
    measured = {1: 1 / 0.025, 2: 2 / 0.030}
    assert predicted_capacity(measured, 8) == pytest.approx(8 / 0.060)
    # a batch time that shrinks with N is taken as flat, never as free
    assert predicted_capacity({1: 10.0, 2: 40.0}, 4) == pytest.approx(4 / 0.05)


def test_saturated_gpu_jumps_to_the_size_that_keeps_up_in_two_probes() -> None:
    """A stream of 120 fps and a GPU with 45 items/s at batch 1: from 1, straight to 4, then settled."""
    model = SyntheticPipeline(fps=120.0, a=0.02, b=0.002, c=0.0001)
    config = PolicyConfig()
    state = ControllerState()
    size, probes, trail = 1, 0, []
    for _ in range(20):
        capacity = model.capacity(size)
        served = min(capacity, model.fps)
        obs = replace(model.observe(size), throughput=served, formed_batch_size=float(size),
                      variant_items=((size, 10),))
        decision, state = get_policy(DEFAULT_POLICY)([obs] * 3, state, config)
        probes += decision.code in (ReasonCode.PROBE, ReasonCode.SATURATED)
        size = decision.batch_size
        trail.append(size)
    assert trail[0] == 4 and trail[-10:] == [4] * 10, trail
    assert probes <= 2


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(ADAPTIVE),
    start=st.sampled_from(SIZES),
    lower_after=st.integers(1, 3),
    fps=st.sampled_from((15.0, 30.0)),
)
def test_repeated_misses_lower_to_the_minimum(name: str, start: int, lower_after: int, fps: float) -> None:
    config = PolicyConfig(start_size=start, lower_after=lower_after)
    # Every size misses: inference alone takes longer than N / F.
    model = SyntheticPipeline(fps, a=0.5, b=1.0 / fps)
    assert not any(model.meets(n) for n in SIZES)
    decisions = closed_loop(name, model, config, windows=40)
    assert all(d.action != "raise" for d in decisions)
    assert decisions[-1].batch_size == 1
    for d in decisions:
        assert d.batch_size <= d.from_size


@settings(max_examples=40, deadline=None)
@given(
    t0=st.floats(10.0, 200.0),
    eps=st.lists(st.floats(-0.02, 0.02), min_size=5, max_size=5),
    load=st.floats(0.2, 0.8),
)
def test_throughput_aware_settles_small_on_a_flat_cpu_curve(t0: float, eps: list[float], load: float) -> None:
    table = tuple((n, t0 * (1 + e)) for n, e in zip(SIZES, eps))
    model = SyntheticPipeline(fps=t0 * load, table=table)
    config = PolicyConfig()
    decisions = closed_loop("throughput_aware", model, config, windows=60)
    size = settled_size(decisions, tail=30)
    assert size is not None, [d.batch_size for d in decisions]
    best = max(t for _, t in table)
    assert size <= 2
    assert model.capacity(size) >= best / (1 + config.min_gain)
    # Algorithm 1 has no notion of throughput: it climbs to the largest size.
    assert settled_size(closed_loop("algorithm1", model, config, windows=60), tail=30) == 16


gpu_models = st.builds(
    SyntheticPipeline,
    fps=st.just(1.0),
    a=st.floats(0.005, 0.04),
    b=st.floats(0.0005, 0.004),
    c=st.one_of(st.just(0.0), st.floats(0.00001, 0.0008)),
    pre_s=st.floats(0.0, 0.002),
    post_s=st.floats(0.0, 0.002),
    mem_base=st.one_of(st.none(), st.floats(0.1, 0.5)),
    mem_per_item=st.floats(0.0, 0.06),
)


@settings(max_examples=80, deadline=None)
@given(model=gpu_models, load=st.floats(0.3, 0.95))
def test_throughput_aware_climbs_a_gpu_curve_and_stays(model: SyntheticPipeline, load: float) -> None:
    model = replace(model, fps=load / model.d_batch(1))  # batch 1 keeps up; larger sizes may not
    config = PolicyConfig()
    decisions = closed_loop("throughput_aware", model, config, windows=80)
    size = settled_size(decisions, tail=40)
    assert size is not None, [d.batch_size for d in decisions]
    sizes, best = reachable_best(model, config)
    assert size in sizes
    # Stops only where one more step gains less than min_gain (or cannot be taken).
    up = config.size_above(size)
    if up is not None and up in sizes:
        assert model.capacity(up) < (1 + config.min_gain) * model.capacity(size)
    assert model.capacity(size) >= best / (1 + config.min_gain)


def test_gpu_curve_climbs_to_the_best_size_under_the_deadline() -> None:
    # Inference 20 ms + 2 ms/frame + 0.2 ms/frame^2: capacity 45, 83, 139, 164, 155 items/s.
    model = SyntheticPipeline(fps=30.0, a=0.02, b=0.002, c=0.0002, pre_s=0.001, post_s=0.0005)
    config = PolicyConfig()
    assert max(SIZES, key=model.capacity) == 8
    decisions = closed_loop("throughput_aware", model, config)
    assert settled_size(decisions, tail=40) == 8
    sizes = [d.batch_size for d in decisions]
    assert sizes[:10] == [1, 2, 2, 4, 4, 8, 8, 16, 16, 8]


def test_memory_threshold_stops_the_climb() -> None:
    model = SyntheticPipeline(fps=30.0, a=0.02, b=0.002, mem_base=0.5, mem_per_item=0.06)  # 4 -> 74%, 8 -> 98%
    for name in ADAPTIVE:
        decisions = closed_loop(name, model, PolicyConfig(), windows=50)
        assert max(d.batch_size for d in decisions) <= 8
        assert all(d.action != "raise" for d in decisions if d.from_size == 8), name


def test_algorithm1_oscillates_where_throughput_aware_settles() -> None:
    """A size that fails to load (OOM) makes Algorithm 1 retry it forever; ours remembers."""
    model = SyntheticPipeline(fps=30.0, a=0.02, b=0.002, c=0.0001, mem_base=0.35, mem_per_item=0.04, oom_at=0.95)
    assert model.fails(16) and model.capacity(16) > model.capacity(8) * 1.05
    ours = closed_loop("throughput_aware", model, PolicyConfig(), windows=80)
    paper = closed_loop("algorithm1", model, PolicyConfig(), windows=80)
    assert settled_size(ours, tail=60) == 8
    assert sum(d.action != "keep" for d in paper[-40:]) >= 10


def test_periodic_reprobe_backs_off_on_a_stationary_curve() -> None:
    model = SyntheticPipeline(fps=15.0, table=((1, 25.5), (2, 27.2), (4, 25.9), (8, 24.9), (16, 24.4)))
    config = PolicyConfig(reprobe_after_windows=10)
    decisions = closed_loop("throughput_aware", model, config, windows=400)
    probes = [i for i, d in enumerate(decisions) if d.action == "raise" and d.from_size == 2 and i > 10]
    assert 3 <= len(probes) <= math.ceil(math.log2(400 / 10)) + 1
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    at_two = sum(d.batch_size == 2 for d in decisions[10:])
    assert at_two / len(decisions[10:]) >= 0.95


def test_drift_triggers_a_reprobe_and_a_new_climb() -> None:
    contended = SyntheticPipeline(fps=20.0, a=0.001, b=0.02)  # another tenant: per-frame cost dominates
    alone = SyntheticPipeline(fps=20.0, a=0.01, b=0.001)  # tenant gone: fixed cost dominates
    policy, config, state = get_policy("throughput_aware"), PolicyConfig(), ControllerState()
    size, decisions = 1, []
    for t in range(100):
        model = contended if t < 40 else alone
        decision, state = policy([model.observe(size)] * 4, state, config)
        decisions.append(decision)
        size = decision.batch_size
    assert {d.batch_size for d in decisions[20:40]} == {1}  # batch 2 gave only +2.4%
    assert decisions[40].action == "raise" and "re-probe: throughput at 1 moved" in decisions[40].reason
    assert settled_size(decisions, tail=30) == 16


# ---------------------------------------------------------------- recorded traces

CPU_TABLE = ((1, 25.5), (2, 27.2), (4, 25.9), (8, 24.9), (16, 24.4))  # field notes: YOLOv8n 640, 2 cores
TRACE_MODELS: Mapping[str, tuple[str, list[tuple[int, SyntheticPipeline]]]] = {
    "cpu_2core_yolov8n_640.jsonl": (
        "ONNX Runtime on 2 cores, YOLOv8n layout at 640x640: measured images/s per batch size "
        "from the field notes, 4 ms/frame pre+post, a 15 fps camera, 1% gaussian noise",
        [(0, SyntheticPipeline(fps=15.0, table=CPU_TABLE, pre_s=0.003, post_s=0.001))],
    ),
    "gpu_oom_at_16.jsonl": (
        "a GPU-like curve: inference 20 ms + 2 ms/frame + 0.1 ms/frame^2, memory 35% + 4%/frame "
        "of 8 GB, batch 16 fails to load (OOM), a 30 fps stream, 1% noise",
        [(0, SyntheticPipeline(fps=30.0, a=0.02, b=0.002, c=0.0001, pre_s=0.001, post_s=0.0005,
                               mem_base=0.35, mem_per_item=0.04, oom_at=0.95))],
    ),
    "gpu_tenant_leaves.jsonl": (
        "a shared GPU: until window 30 another tenant makes inference 1 ms + 20 ms/frame, then "
        "10 ms + 1 ms/frame; a 20 fps stream, 1% noise",
        [(0, SyntheticPipeline(fps=20.0, a=0.001, b=0.02)), (30, SyntheticPipeline(fps=20.0, a=0.01, b=0.001))],
    ),
}
TRACE_WINDOWS, TRACE_PER_WINDOW, TRACE_NOISE, WINDOW_S = 60, 2, 0.01, 2.0


def generate_trace(name: str) -> list[dict]:
    """Per window, what every allowed size measured (a sweep), so any policy can be replayed."""
    description, phases = TRACE_MODELS[name]
    rng = random.Random(name)
    rows: list[dict] = [{"meta": {"description": description, "windows": TRACE_WINDOWS, "sizes": list(SIZES)}}]
    for t in range(TRACE_WINDOWS):
        model = [m for start, m in phases if start <= t][-1]
        for n in SIZES:
            for k in range(TRACE_PER_WINDOW):
                obs = model.observe(n, noise=TRACE_NOISE, rng=rng, t=t * WINDOW_S + k * WINDOW_S / TRACE_PER_WINDOW)
                rows.append({"window": t, **{k: v for k, v in obs.__dict__.items() if v not in (None, ())}})
    return rows


def load_trace(name: str) -> list[dict[int, list[Observation]]]:
    windows: dict[int, dict[int, list[Observation]]] = {}
    for line in (TRACES / name).read_text().splitlines():
        row = json.loads(line)
        if "meta" in row:
            continue
        t = row.pop("window")
        obs = Observation(**row)
        windows.setdefault(t, {}).setdefault(obs.batch_size, []).append(obs)
    return [windows[t] for t in sorted(windows)]


@pytest.mark.parametrize("name", sorted(TRACE_MODELS))
def test_recorded_trace_matches_its_documented_model(name: str) -> None:
    rows = [json.loads(line) for line in (TRACES / name).read_text().splitlines()]
    assert rows == json.loads(json.dumps(generate_trace(name)))


@pytest.mark.parametrize("name", sorted(TRACE_MODELS))
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_replays_every_trace_safely(name: str, policy: str) -> None:
    trace = load_trace(name)
    config = PolicyConfig()
    decisions = replay(get_policy(policy), trace, config)
    assert len(decisions) == len(trace)
    size = config.initial_size
    for by_size, d in zip(trace, decisions):
        assert d.batch_size in config.allowed_sizes
        window = by_size[size]
        if d.action == "raise":
            assert not any(o.failed or not o.budget.is_met(o.d_batch_s) for o in window), d.reason
        size = d.batch_size


def test_cpu_trace_settles_at_the_best_small_size() -> None:
    decisions = replay(get_policy("throughput_aware"), load_trace("cpu_2core_yolov8n_640.jsonl"), PolicyConfig())
    assert settled_size(decisions, tail=45) == 2  # 27.2 images/s, the best of the curve
    paper = replay(get_policy("algorithm1"), load_trace("cpu_2core_yolov8n_640.jsonl"), PolicyConfig())
    assert paper[-1].batch_size == 16  # 24.4 images/s and 16x the batching delay


def test_gpu_oom_trace_settles_below_the_failing_size() -> None:
    decisions = replay(get_policy("throughput_aware"), load_trace("gpu_oom_at_16.jsonl"), PolicyConfig())
    assert settled_size(decisions, tail=45) == 8
    assert any("failed at batch 16" in d.reason for d in decisions)
    failed = [i for i, d in enumerate(decisions) if d.code == ReasonCode.LOAD_FAILED]
    settled = [d for d in decisions[failed[0] + 1:] if "failed at batch 16" in d.reason]
    # the windows settled after the failure still say why in words, but their code is "settled"
    assert settled and {d.code for d in settled} == {ReasonCode.SETTLED}


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_decision_carries_a_reason_code_set_by_the_policy(policy: str) -> None:
    decisions = [d for name in sorted(TRACE_MODELS) for d in replay(get_policy(policy), load_trace(name), PolicyConfig())]
    assert all(isinstance(d.code, ReasonCode) for d in decisions)
    raises = {d.code for d in decisions if d.action == "raise"}
    lowers = {d.code for d in decisions if d.action == "lower"}
    assert raises <= {ReasonCode.CRITERION_MET, ReasonCode.PROBE, ReasonCode.REPROBE, ReasonCode.PIN_APPLIED}
    assert lowers <= {ReasonCode.DEADLINE_MISSED, ReasonCode.SLO_MISSED, ReasonCode.LOAD_FAILED,
                      ReasonCode.NO_THROUGHPUT_GAIN, ReasonCode.VARIANT_NOT_RUN, ReasonCode.PIN_APPLIED}


def test_the_criterion_uses_the_formed_batch_size_and_min_variant_share_is_checked() -> None:
    full = Observation(16, 0.3, 30.0, 50.0)
    part = replace(full, formed_batch_size=4.0)
    assert full.budget.is_met(0.3) and not part.budget.is_met(0.3)  # 16/30 = 0.53 s vs 4/30 = 0.13 s
    decision, _ = get_policy("aimd")([part], ControllerState(current=16), PolicyConfig())
    assert decision.action == "lower" and decision.code == ReasonCode.DEADLINE_MISSED
    with pytest.raises(ValueError, match="formed_batch_size"):
        Observation(4, 0.1, 30.0, 1.0, formed_batch_size=0.0)
    with pytest.raises(ValueError, match="min_variant_share"):
        PolicyConfig(min_variant_share=0.0)


def test_tenant_trace_reprobes_after_the_drift() -> None:
    decisions = replay(get_policy("throughput_aware"), load_trace("gpu_tenant_leaves.jsonl"), PolicyConfig())
    sizes = [d.batch_size for d in decisions]
    assert set(sizes[15:30]) == {1}
    assert any("re-probe" in d.reason for d in decisions[30:])
    assert settled_size(decisions, tail=15) == 16


def write_traces() -> None:
    TRACES.mkdir(exist_ok=True)
    for name in TRACE_MODELS:
        lines = [json.dumps(row, sort_keys=True) for row in generate_trace(name)]
        (TRACES / name).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_traces()
