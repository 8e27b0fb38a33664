"""Placement arithmetic: CME shares cut to device memory, and capacity-weighted routing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.placement import Placement, PlacementPlan, concurrency_level, fractional_share, route_weights

GB = 1_000_000_000


def placement(model: str, node: str, backend: str, items_s: float) -> Placement:
    return Placement(model, node, "gpu", backend, replicas=1, fraction=1.0, expected_throughput=items_s)


def test_route_weights_are_proportional_to_capacity() -> None:
    plan = PlacementPlan((placement("yolo", "x86-gpu", "tensorrt", 300.0), placement("yolo", "x86-gpu", "onnx", 25.0),
                          placement("yolo", "pi-coral", "edgetpu", 40.0), placement("other", "n", "onnx", 99.0)))
    weights = route_weights(plan, "yolo")
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[("x86-gpu", "tensorrt")] == pytest.approx(300 / 365)
    assert weights[("pi-coral", "edgetpu")] == pytest.approx(40 / 365)
    assert weights[("x86-gpu", "onnx")] == pytest.approx(25 / 365)


def test_route_weights_without_capacity_are_even_and_a_model_without_placements_is_named() -> None:
    plan = PlacementPlan((placement("m", "a", "onnx", 0.0), placement("m", "b", "onnx", 0.0)))
    assert route_weights(plan, "m") == {("a", "onnx"): 0.5, ("b", "onnx"): 0.5}
    with pytest.raises(ValueError, match="no route for model 'x'"):
        route_weights(plan, "x")


def test_concurrency_level_share_and_memory_cap() -> None:
    assert fractional_share(4) == 0.25
    level = concurrency_level(4, instance_bytes=3 * GB, device_bytes=8 * GB)
    assert (level.k, level.share) == (2, 0.5) and "memory holds 2" in level.reason
    assert concurrency_level(2, instance_bytes=1 * GB, device_bytes=8 * GB).k == 2
    with pytest.raises(ValueError, match="one instance needs 9000.0 MB"):
        concurrency_level(1, instance_bytes=9 * GB, device_bytes=8 * GB)
    with pytest.raises(ValueError):
        fractional_share(0)


@settings(max_examples=80, deadline=None)
@given(caps=st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=6))
def test_route_weights_always_sum_to_one(caps: list[float]) -> None:
    plan = PlacementPlan(tuple(placement("m", f"n{i}", "onnx", c) for i, c in enumerate(caps)))
    weights = route_weights(plan, "m")
    assert sum(weights.values()) == pytest.approx(1.0) and all(w >= 0 for w in weights.values())


@settings(max_examples=80, deadline=None)
@given(requested=st.integers(1, 16), instance=st.integers(1, 8 * GB), device=st.integers(GB, 80 * GB))
def test_concurrency_level_never_books_more_memory_than_the_budget(requested: int, instance: int, device: int) -> None:
    try:
        level = concurrency_level(requested, instance_bytes=instance, device_bytes=device)
    except ValueError:
        assert instance > 0.9 * device
        return
    assert 1 <= level.k <= requested and level.k * instance <= 0.9 * device + 1
    assert level.share == pytest.approx(1 / level.k)
