"""Layer loading plans (EdgeCaffe policies) and request order across models (FCFS, MASA/HRRN)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.loading import (
    LOADING_POLICIES,
    BudgetExceeded,
    Free,
    Load,
    LoadPlan,
    ModelSpec,
    Request,
    Run,
    StageSpec,
    order_requests,
    plan_loading,
)

MB = 10**6


def model(sizes_mb: list[float], load_s: float = 0.1, exec_s: float = 0.12) -> ModelSpec:
    return ModelSpec("det", tuple(StageSpec(i, int(b * MB), load_s, exec_s) for i, b in enumerate(sizes_mb)))


def replay_memory(m: ModelSpec, plan: LoadPlan) -> int:
    """Independent check: walk the steps one at a time in plan order (a valid execution order).

    The plan's peak covers every order its dependencies allow, so it is at least this.
    """
    resident, peak = 0, 0
    for step in plan.steps:
        if isinstance(step, Load):
            resident += m.stages[step.stage].load_bytes
            peak = max(peak, resident)
        elif isinstance(step, Free):
            resident -= m.stages[step.stage].load_bytes
    return peak


def test_peaks_of_the_four_policies() -> None:
    m = model([3, 5, 2, 4])
    peaks = {p: plan_loading(m, p).peak_bytes for p in LOADING_POLICIES}
    assert peaks == {"bulk": 14 * MB, "linear": 14 * MB, "partial": 5 * MB, "interleaved": 8 * MB}


def test_budget_exceeded_names_the_figures_before_anything_runs() -> None:
    with pytest.raises(BudgetExceeded, match=r"needs 12\.3 MB at stage 3, budget 8\.0 MB") as err:
        plan_loading(model([3.0, 5.0, 0.3, 4.0]), "linear", budget_bytes=8 * MB)
    assert isinstance(err.value, ValueError)
    assert (err.value.needed_bytes, err.value.stage, err.value.budget_bytes) == (12_300_000, 3, 8 * MB)
    assert plan_loading(model([3.0, 5.0, 0.3, 4.0]), "partial", budget_bytes=8 * MB).peak_bytes == 5 * MB


def test_steps_name_their_worker_and_dependencies() -> None:
    plan = plan_loading(model([1, 1, 1]), "interleaved")
    assert [str(s) for s in plan.steps] == [
        "Load(0)@loader", "Load(1)@loader", "Run(0)@executor", "Free(0)@executor",
        "Load(2)@loader", "Run(1)@executor", "Free(1)@executor", "Run(2)@executor", "Free(2)@executor",
    ]
    load2 = plan.steps[4]
    assert 3 in load2.deps  # Load(2) waits for Free(0): at most two stages resident
    for i, step in enumerate(plan.steps):
        assert all(d < i for d in step.deps)
        if isinstance(step, Run):
            assert any(isinstance(plan.steps[d], Load) and plan.steps[d].stage == step.stage for d in step.deps)


def test_makespans_from_the_estimates() -> None:
    m = model([1, 1, 1, 1], load_s=0.1, exec_s=0.12)
    spans = {p: plan_loading(m, p).est_makespan_s for p in LOADING_POLICIES}
    assert spans["bulk"] == spans["linear"] == spans["partial"] == pytest.approx(4 * 0.22)
    # Overlap: first load, then four runs back to back (each next load hides under a run).
    assert spans["interleaved"] == pytest.approx(0.1 + 4 * 0.12)


stages = st.lists(
    st.tuples(st.integers(0, 50 * MB), st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=12
)


def spec(raw: list[tuple[int, float, float]]) -> ModelSpec:
    return ModelSpec("m", tuple(StageSpec(i, b, ls, es) for i, (b, ls, es) in enumerate(raw)))


@settings(max_examples=150, deadline=None)
@given(raw=stages, policy=st.sampled_from(LOADING_POLICIES), budget=st.integers(0, 200 * MB))
def test_a_plan_never_exceeds_its_budget(raw: list[tuple[int, float, float]], policy: str, budget: int) -> None:
    m = spec(raw)
    try:
        plan = plan_loading(m, policy, budget_bytes=budget)
    except BudgetExceeded as err:
        assert err.needed_bytes > budget
        assert err.needed_bytes == plan_loading(m, policy).peak_bytes
        return
    assert plan.peak_bytes <= budget
    assert replay_memory(m, plan) <= plan.peak_bytes


@settings(max_examples=150, deadline=None)
@given(raw=stages)
def test_partial_has_the_least_peak_and_interleaved_is_never_slower(raw: list[tuple[int, float, float]]) -> None:
    m = spec(raw)
    plans = {p: plan_loading(m, p) for p in LOADING_POLICIES}
    assert plans["partial"].peak_bytes == max(s.load_bytes for s in m.stages)
    assert plans["partial"].peak_bytes == min(p.peak_bytes for p in plans.values())
    assert plans["bulk"].peak_bytes == plans["linear"].peak_bytes == m.total_bytes
    pairs = [a.load_bytes + b.load_bytes for a, b in zip(m.stages, m.stages[1:])]
    assert plans["interleaved"].peak_bytes == max(pairs, default=m.stages[0].load_bytes)
    assert plans["interleaved"].est_makespan_s <= plans["linear"].est_makespan_s + 1e-9
    for plan in plans.values():
        # Every stage is loaded once and run once, in order.
        assert [s.stage for s in plan.steps if isinstance(s, Run)] == list(range(len(m.stages)))
        assert sorted(s.stage for s in plan.steps if isinstance(s, Load)) == list(range(len(m.stages)))


def test_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="bulk, linear, partial, interleaved"):
        plan_loading(model([1]), "deepest")  # type: ignore[arg-type]


# ---------------------------------------------------------------- order across models


def req(rid: str, arrival: float, service: float, nbytes: int = 1 * MB, model_name: str = "m") -> Request:
    return Request(rid, model_name, arrival, service, nbytes)


def test_fcfs_keeps_arrival_order_and_blocks_at_the_head() -> None:
    queue = [req("c", 3.0, 1.0), req("a", 1.0, 5.0), req("b", 2.0, 0.1, nbytes=9 * MB), req("d", 4.0, 0.1)]
    got = order_requests(queue, policy="fcfs", now=10.0, resident_bytes=2 * MB, budget_bytes=10 * MB)
    assert [r.request_id for r in got] == ["a"]  # b does not fit: everything behind it waits
    got = order_requests(queue, policy="fcfs", now=10.0, resident_bytes=0, budget_bytes=100 * MB)
    assert [r.request_id for r in got] == ["a", "b", "c", "d"]


def test_masa_skips_what_does_not_fit_and_favours_long_waiting_short_jobs() -> None:
    queue = [
        req("long-old", 0.0, 10.0),  # (10 + 10) / 10 = 2.0
        req("short-old", 5.0, 1.0),  # (5 + 1) / 1 = 6.0
        req("short-new", 9.5, 1.0),  # (0.5 + 1) / 1 = 1.5
        req("huge", 0.0, 0.5, nbytes=50 * MB),  # ratio 21, but its next stage does not fit
    ]
    got = order_requests(queue, policy="masa", now=10.0, resident_bytes=2 * MB, budget_bytes=10 * MB)
    assert [r.request_id for r in got] == ["short-old", "long-old", "short-new"]
    # Memory is taken as requests are admitted: only what fits together is started.
    got = order_requests(queue, policy="masa", now=10.0, resident_bytes=8 * MB, budget_bytes=10 * MB)
    assert [r.request_id for r in got] == ["short-old", "long-old"]


@settings(max_examples=100, deadline=None)
@given(
    reqs=st.lists(
        st.tuples(st.floats(0.0, 100.0), st.floats(0.01, 10.0), st.integers(0, 10 * MB)), min_size=0, max_size=15
    ),
    resident=st.integers(0, 20 * MB),
)
def test_admitted_requests_fit_the_free_budget(reqs: list[tuple[float, float, int]], resident: int) -> None:
    queue = [req(f"r{i}", a, s, b) for i, (a, s, b) in enumerate(reqs)]
    for policy in ("fcfs", "masa"):
        got = order_requests(queue, policy=policy, now=100.0, resident_bytes=resident, budget_bytes=20 * MB)
        assert sum(r.next_stage_bytes for r in got) <= 20 * MB - resident or not got
        assert len({r.request_id for r in got}) == len(got)
    fcfs = order_requests(queue, policy="fcfs", now=100.0, resident_bytes=resident, budget_bytes=20 * MB)
    assert fcfs == sorted(queue, key=lambda r: r.arrival_s)[: len(fcfs)]
    masa = order_requests(queue, policy="masa", now=100.0, resident_bytes=resident, budget_bytes=20 * MB)
    ratios = [r.response_ratio(100.0) for r in masa]
    assert ratios == sorted(ratios, reverse=True)
