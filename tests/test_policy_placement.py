"""Placement (DMP) and concurrent model executions (CME): tags, memory, routing, node loss."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.placement import (
    ModelDemand,
    NodeInfo,
    PlacementPlan,
    concurrency_level,
    fractional_share,
    plan_placement,
    replan_after_node_loss,
    route_weights,
)

MB, GB = 10**6, 10**9


def cluster() -> list[NodeInfo]:
    return [
        NodeInfo("x86-gpu", {"gpu": 1, "x86": 1, "cpu": 1}, {"gpu": 8 * GB, "cpu": 16 * GB}),
        NodeInfo("jetson-1", {"gpu": 1, "jetson": 1}, {"gpu": 4 * GB}),
        NodeInfo("pi-coral", {"edgetpu": 1, "cpu": 1}, {"edgetpu": 64 * MB, "cpu": 2 * GB}),
    ]


def yolo(**kw) -> ModelDemand:
    defaults = dict(
        name="yolo",
        placements=(("gpu", "tensorrt"), ("edgetpu", "edgetpu"), ("cpu", "onnx")),
        memory_bytes={"tensorrt": 1 * GB, "edgetpu": 8 * MB, "onnx": 400 * MB},
        throughput={("gpu", "tensorrt"): 300.0, ("edgetpu", "edgetpu"): 40.0, ("cpu", "onnx"): 25.0},
        max_concurrency=4,
    )
    defaults.update(kw)
    return ModelDemand(**defaults)


def tpu_only() -> ModelDemand:
    return ModelDemand("faces", (("edgetpu", "edgetpu"),), {"edgetpu": 6 * MB}, {("edgetpu", "edgetpu"): 60.0})


def check_plan(plan: PlacementPlan, nodes: list[NodeInfo], models: list[ModelDemand]) -> None:
    """What any plan must satisfy: tags, memory per device, fractions, sums."""
    by_node = {n.node_id: n for n in nodes}
    by_model = {m.name: m for m in models}
    used: dict[tuple[str, str, int], float] = defaultdict(float)
    share: dict[tuple[str, str, int], float] = defaultdict(float)
    for p in plan.placements:
        node, model = by_node[p.node_id], by_model[p.model]
        assert node.alive and node.devices(p.tag) > p.device_index
        assert (p.tag, p.backend) in model.placements
        assert p.replicas >= 1 and 0 < p.fraction <= 1
        dev = (p.node_id, p.tag, p.device_index)
        used[dev] += p.replicas * model.memory_bytes[p.backend]
        share[dev] += p.replicas * p.fraction
        mine = sum(q.replicas for q in plan.placements if q.model == p.model and (q.node_id, q.tag, q.device_index) == dev)
        assert mine <= model.max_concurrency
    for (node_id, tag, _), b in used.items():
        assert b <= by_node[node_id].device_memory_bytes[tag] * plan.memory_fraction + 1e-6
    for s in share.values():
        assert s == pytest.approx(1.0)  # k instances, each 1/k
    for m in models:
        assert (m.name in plan.unplaced) != bool(plan.for_model(m.name))


def survivors_kept(before: PlacementPlan, after: PlacementPlan, lost: set[str]) -> bool:
    """Healthy replicas stay on their device, none of them removed (their share shrinks if a moved
    replica joins them; a moved replica of the same model adds to their count there)."""
    key = lambda p: (p.model, p.node_id, p.tag, p.backend, p.device_index)  # noqa: E731
    now = {key(p): p.replicas for p in after.placements}
    return all(now.get(key(p), 0) >= p.replicas for p in before.placements if p.node_id not in lost)


def test_greedy_puts_the_fastest_backend_first_and_respects_tags() -> None:
    nodes, models = cluster(), [yolo(), tpu_only()]
    plan = plan_placement(models, nodes)
    check_plan(plan, nodes, models)
    assert not plan.unplaced
    # The TPU-only model is the most constrained: it gets the one EdgeTPU.
    assert [(p.node_id, p.tag) for p in plan.for_model("faces")] == [("pi-coral", "edgetpu")]
    yolo_tags = {(p.node_id, p.tag, p.backend) for p in plan.for_model("yolo")}
    assert ("x86-gpu", "gpu", "tensorrt") in yolo_tags and ("jetson-1", "gpu", "tensorrt") in yolo_tags
    assert plan.expected_throughput("yolo") == pytest.approx(math.fsum(p.expected_throughput for p in plan.for_model("yolo")))
    assert plan.expected_throughput("yolo") == pytest.approx(300 + 300 + 25 + 25)


def test_demand_caps_the_replicas() -> None:
    plan = plan_placement([yolo(demand_items_s=250.0)], cluster())
    assert [(p.node_id, p.backend, p.replicas) for p in plan.placements] == [("jetson-1", "tensorrt", 1)]


def test_unplaced_reason_names_the_missing_tag() -> None:
    hailo = ModelDemand("seg", (("hailo", "hef"),), {"hef": 10 * MB}, {("hailo", "hef"): 50.0})
    plan = plan_placement([hailo, yolo()], cluster())
    assert "seg" in plan.unplaced and "no alive node has tag hailo" in plan.unplaced["seg"]
    with pytest.raises(ValueError, match="no alive node has tag hailo"):
        route_weights(plan, "seg")


def test_unplaced_reason_names_memory_when_the_tag_exists() -> None:
    big = ModelDemand("llm", (("gpu", "tensorrt"),), {"tensorrt": 20 * GB}, {("gpu", "tensorrt"): 5.0})
    plan = plan_placement([big], cluster())
    assert "needs 20000.0 MB on a device tagged gpu" in plan.unplaced["llm"]


def test_route_weights_are_proportional_to_capacity() -> None:
    plan = plan_placement([yolo()], cluster())
    weights = route_weights(plan, "yolo")
    # Alone, yolo also gets the EdgeTPU: 300 + 300 + 40 + 25 + 25 = 690 items/s.
    assert plan.expected_throughput("yolo") == pytest.approx(690.0)
    assert sum(weights.values()) == pytest.approx(1.0)
    assert weights[("x86-gpu", "tensorrt")] == pytest.approx(300 / 690)
    assert weights[("pi-coral", "edgetpu")] == pytest.approx(40 / 690)
    assert weights[("x86-gpu", "onnx")] == pytest.approx(25 / 690)


def test_cme_only_where_measured_and_only_what_memory_holds() -> None:
    nodes = [NodeInfo("x86-gpu", {"gpu": 1}, {"gpu": 8 * GB})]
    model = yolo(placements=(("gpu", "tensorrt"),), max_concurrency=8, memory_bytes={"tensorrt": 3 * GB})
    # Unmeasured: a second instance is assumed to add nothing.
    assert [p.replicas for p in plan_placement([model], nodes).placements] == [1]
    measured = {("yolo", "gpu", "tensorrt", 2): 450.0, ("yolo", "gpu", "tensorrt", 3): 500.0}
    plan = plan_placement([model], nodes, measured=measured)
    # 3 x 3 GB > 90% of 8 GB: memory stops CME at 2, whatever the measured gain at 3.
    [p] = plan.placements
    assert (p.replicas, p.fraction, p.expected_throughput) == (2, 0.5, 450.0)
    assert p.resource_request() == {"gpu": 0.5}


def test_concurrency_level_share_and_memory_cap() -> None:
    assert fractional_share(4) == 0.25
    level = concurrency_level(4, instance_bytes=3 * GB, device_bytes=8 * GB)
    assert (level.k, level.share) == (2, 0.5) and "memory holds 2" in level.reason
    assert concurrency_level(2, instance_bytes=1 * GB, device_bytes=8 * GB).k == 2
    with pytest.raises(ValueError, match="one instance needs 9000.0 MB"):
        concurrency_level(1, instance_bytes=9 * GB, device_bytes=8 * GB)
    with pytest.raises(ValueError):
        fractional_share(0)


def test_node_loss_moves_replicas_where_tags_allow() -> None:
    nodes, models = cluster(), [yolo(), tpu_only()]
    plan = plan_placement(models, nodes)
    nodes_now = [n if n.node_id != "jetson-1" else NodeInfo(n.node_id, n.resources, n.device_memory_bytes, alive=False) for n in nodes]
    after = replan_after_node_loss(plan, nodes_now)
    check_plan(after, nodes_now, models)
    assert survivors_kept(plan, after, {"jetson-1"})
    assert not any(p.node_id == "jetson-1" for p in after.placements)
    assert "yolo" in after.shortfall and "jetson-1" in after.shortfall["yolo"]


def test_node_loss_reports_the_missing_tag() -> None:
    nodes, models = cluster(), [yolo(), tpu_only()]
    plan = plan_placement(models, nodes)
    after = replan_after_node_loss(plan, [n for n in nodes if n.node_id != "pi-coral"])
    assert "faces" in after.unplaced
    assert "no alive node has tag edgetpu" in after.unplaced["faces"] and "pi-coral" in after.unplaced["faces"]
    assert after.for_model("yolo")


def test_node_loss_moves_to_a_free_device_with_the_tag() -> None:
    nodes = [
        NodeInfo("gpu-a", {"gpu": 1}, {"gpu": 8 * GB}),
        NodeInfo("gpu-b", {"gpu": 1}, {"gpu": 8 * GB}),
    ]
    big = ModelDemand("det", (("gpu", "tensorrt"),), {"tensorrt": 6 * GB}, {("gpu", "tensorrt"): 100.0})
    small = ModelDemand("cls", (("gpu", "tensorrt"),), {"tensorrt": 1 * GB}, {("gpu", "tensorrt"): 900.0}, demand_items_s=500.0)
    plan = plan_placement([big, small], nodes)
    # Sharing a GPU would halve cls for +50 items/s of det: each gets its own.
    assert [(p.model, p.node_id) for p in plan.placements] == [("cls", "gpu-a"), ("det", "gpu-b")]
    after = replan_after_node_loss(plan, nodes[:1])
    # 6 + 1 GB fit in 90% of 8 GB: det moves next to cls, and both get half the GPU.
    assert {(p.model, p.node_id, p.fraction) for p in after.placements} == {("cls", "gpu-a", 0.5), ("det", "gpu-a", 0.5)}
    assert not after.unplaced and not after.shortfall


def test_duplicate_model_names_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan_placement([yolo(), yolo()], cluster())


tags = st.sampled_from(("gpu", "edgetpu", "cpu"))
nodes_st = st.lists(
    st.builds(
        lambda i, t, n, mem, alive: NodeInfo(f"n{i}", {t: n}, {t: mem}, alive),
        st.integers(0, 50),
        tags,
        st.integers(1, 2),
        st.integers(50 * MB, 8 * GB),
        st.booleans(),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda n: n.node_id,
)
models_st = st.lists(
    st.builds(
        lambda i, opts, mem, tp, k, demand: ModelDemand(
            f"m{i}",
            tuple((t, f"{t}-rt") for t in opts),
            {f"{t}-rt": mem for t in opts},
            {(t, f"{t}-rt"): tp for t in opts},
            k,
            demand,
        ),
        st.integers(0, 20),
        st.lists(tags, min_size=1, max_size=3, unique=True),
        st.integers(10 * MB, 4 * GB),
        st.floats(1.0, 500.0),
        st.integers(1, 4),
        st.one_of(st.none(), st.floats(1.0, 1000.0)),
    ),
    min_size=1,
    max_size=4,
    unique_by=lambda m: m.name,
)


@settings(max_examples=80, deadline=None)
@given(nodes=nodes_st, models=models_st, cme_gain=st.floats(1.0, 2.0), drop=st.integers(0, 4))
def test_any_plan_respects_tags_memory_and_shares(
    nodes: list[NodeInfo], models: list[ModelDemand], cme_gain: float, drop: int
) -> None:
    measured = {
        (m.name, t, b, k): m.throughput[(t, b)] * cme_gain ** (k - 1) for m in models for t, b in m.placements for k in (2, 3)
    }
    plan = plan_placement(models, nodes, measured=measured)
    check_plan(plan, nodes, models)
    for m in models:
        if plan.for_model(m.name):
            assert sum(route_weights(plan, m.name).values()) == pytest.approx(1.0)
        else:
            assert plan.unplaced[m.name].startswith(f"model {m.name!r} needs")
    nodes_now = [n for i, n in enumerate(nodes) if i != drop % len(nodes)]
    after = replan_after_node_loss(plan, nodes_now)
    check_plan(after, nodes_now, models)
    lost = {n.node_id for n in nodes} - {n.node_id for n in nodes_now if n.alive}
    assert survivors_kept(plan, after, lost)
