"""Model placement across heterogeneous edge nodes: DMP (Hao et al.) and CME.

Dynamic model placement decides which models run on which node, device kind and
backend; concurrent model executions (CME) put k instances on one device, each with
a 1/k share. Ray's fractional GPUs are a logical share with no memory isolation
(ray issue 41432), so device memory is budgeted here, per device, before Ray sees
any replica.

Pure functions over plain data: the planner is replayable on a recorded cluster
snapshot and a table of measured throughputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

# (model, tag, backend, k) -> items/s of ALL k instances of that model on one device.
MeasuredTable = Mapping[tuple[str, str, str, int], float]


@dataclass(frozen=True)
class NodeInfo:
    """One cluster node: ``resources`` counts devices per tag, memory is per device of a kind.

    Tags are ours (lowercase: "gpu", "edgetpu", "jetson", "x86", "cpu"), given to Ray as
    custom resources; "cpu": 1 means the host CPU counted as one device.
    """

    node_id: str
    resources: Mapping[str, float]
    device_memory_bytes: Mapping[str, int]
    alive: bool = True

    def devices(self, tag: str) -> int:
        return int(self.resources.get(tag, 0))


@dataclass(frozen=True)
class ModelDemand:
    """What a model can run on, what an instance costs, and what it yields.

    ``placements`` lists allowed (tag, backend) pairs; ``memory_bytes`` is per instance
    and per backend; ``throughput`` is items/s of ONE instance alone on a device of that
    (tag, backend). ``demand_items_s`` (None: as much as possible) caps what more
    replicas are worth.
    """

    name: str
    placements: tuple[tuple[str, str], ...]
    memory_bytes: Mapping[str, int]
    throughput: Mapping[tuple[str, str], float]
    max_concurrency: int = 1
    demand_items_s: float | None = None

    def __post_init__(self) -> None:
        if not self.placements:
            raise ValueError(f"model {self.name!r} has no allowed placements")
        if self.max_concurrency < 1:
            raise ValueError(f"model {self.name!r}: max_concurrency must be >= 1")
        missing = sorted({b for _, b in self.placements if b not in self.memory_bytes})
        if missing:
            raise ValueError(f"model {self.name!r}: no memory figure for backend(s) {', '.join(missing)}")


@dataclass(frozen=True)
class Placement:
    """Replicas of one model on one device: each replica asks Ray for ``fraction`` of it."""

    model: str
    node_id: str
    tag: str
    backend: str
    replicas: int
    fraction: float
    expected_throughput: float
    device_index: int = 0

    def resource_request(self) -> dict[str, float]:
        """The per-replica Ray resource for this placement, e.g. {"gpu": 0.5}."""
        return {self.tag: self.fraction}


@dataclass(frozen=True)
class PlacementPlan:
    """The placements, the models that got none (and why), and what was planned from."""

    placements: tuple[Placement, ...]
    unplaced: Mapping[str, str]
    shortfall: Mapping[str, str] = field(default_factory=dict)
    models: tuple[ModelDemand, ...] = ()
    measured: MeasuredTable = field(default_factory=dict)
    memory_fraction: float = 0.9

    def for_model(self, model: str) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if p.model == model)

    def expected_throughput(self, model: str) -> float:
        """Sum over the model's placements: routing spreads requests across all of them."""
        return math.fsum(p.expected_throughput for p in self.for_model(model))


@dataclass(frozen=True)
class ConcurrencyLevel:
    """How many instances share one device, and each one's fractional share 1/k."""

    k: int
    share: float
    reason: str


def fractional_share(k: int) -> float:
    """CME: k instances on one device each ask for 1/k of it."""
    if k < 1:
        raise ValueError(f"concurrency level must be >= 1, got {k}")
    return 1.0 / k


def concurrency_level(
    requested: int, *, instance_bytes: int, device_bytes: int, memory_fraction: float = 0.9
) -> ConcurrencyLevel:
    """The k to run: the requested level, cut to what device memory holds (Ray will not check)."""
    if requested < 1:
        raise ValueError(f"concurrency level must be >= 1, got {requested}")
    budget = device_bytes * memory_fraction
    fits = int(budget // instance_bytes) if instance_bytes > 0 else requested
    if fits < 1:
        raise ValueError(
            f"one instance needs {_mb(instance_bytes)}, device budget is {_mb(budget)} "
            f"({memory_fraction:.0%} of {_mb(device_bytes)})"
        )
    k = min(requested, fits)
    why = f"{requested} requested" if k == requested else f"{requested} requested, memory holds {fits}"
    return ConcurrencyLevel(k, fractional_share(k), f"k={k}: {why} x {_mb(instance_bytes)} in {_mb(budget)}")


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass
class _Device:
    """Planner scratch state for one device (mutable, local to a planning call)."""

    node_id: str
    tag: str
    index: int
    budget: float
    used: float = 0.0
    instances: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def k(self) -> int:
        return sum(self.instances.values())


def _device_total(model: ModelDemand, tag: str, backend: str, j: int, measured: MeasuredTable) -> float:
    """Items/s of j instances of a model alone on a device; unmeasured levels gain nothing over k=1."""
    if j <= 0:
        return 0.0
    got = measured.get((model.name, tag, backend, j))
    if got is not None:
        return got
    single = measured.get((model.name, tag, backend, 1), model.throughput.get((tag, backend), 0.0))
    best = single
    for level in range(2, j):
        best = max(best, measured.get((model.name, tag, backend, level), 0.0))
    return best


def _model_on_device(
    model: ModelDemand, dev: _Device, instances: Mapping[tuple[str, str], int], measured: MeasuredTable
) -> float:
    """A model's share of a device: its j of k instances get j/k of the device time at level k."""
    k = sum(instances.values())
    total = 0.0
    for (name, backend), j in instances.items():
        if name == model.name and j > 0:
            total += _device_total(model, dev.tag, backend, k, measured) * j / k
    return total


def _value(totals: Mapping[str, float], models: Mapping[str, ModelDemand]) -> float:
    """What the plan is worth: throughput, counted only up to each model's demand."""
    return math.fsum(
        min(t, models[m].demand_items_s) if models[m].demand_items_s is not None else t for m, t in totals.items()
    )


def _devices(nodes: Iterable[NodeInfo], memory_fraction: float) -> list[_Device]:
    out = []
    for node in sorted(nodes, key=lambda n: n.node_id):
        if not node.alive:
            continue
        for tag in sorted(node.resources):
            mem = node.device_memory_bytes.get(tag)
            if mem is None:
                continue
            out.extend(_Device(node.node_id, tag, i, mem * memory_fraction) for i in range(node.devices(tag)))
    return out


def _totals(devs: Sequence[_Device], models: Mapping[str, ModelDemand], measured: MeasuredTable) -> dict[str, float]:
    totals = dict.fromkeys(models, 0.0)
    for dev in devs:
        for name in {m for m, _ in dev.instances}:
            totals[name] += _model_on_device(models[name], dev, dev.instances, measured)
    return totals


def _fits(model: ModelDemand, backend: str, dev: _Device) -> bool:
    mine = sum(j for (m, _), j in dev.instances.items() if m == model.name)
    return dev.used + model.memory_bytes[backend] <= dev.budget + 1e-6 and mine < model.max_concurrency


def _gain(
    model: ModelDemand, backend: str, dev: _Device, models: Mapping[str, ModelDemand], measured: MeasuredTable,
    totals: Mapping[str, float],
) -> float:
    """Change in plan value from one more instance on this device (others on it lose share)."""
    before = {name: _model_on_device(models[name], dev, dev.instances, measured) for name, _ in dev.instances}
    after_inst = dict(dev.instances)
    after_inst[(model.name, backend)] = after_inst.get((model.name, backend), 0) + 1
    names = {name for name, _ in after_inst}
    new_totals = dict(totals)
    for name in names:
        new_totals[name] = totals[name] - before.get(name, 0.0) + _model_on_device(models[name], dev, after_inst, measured)
    return _value(new_totals, models) - _value(totals, models)


def _why_unplaced(model: ModelDemand, nodes: Sequence[NodeInfo], devs: Sequence[_Device], lost: Sequence[str] = ()) -> str:
    tags = sorted({t for t, _ in model.placements})
    wanted = ", ".join(f"{t} ({b})" for t, b in model.placements)
    alive_with = [d for d in devs if any(d.tag == t for t in tags)]
    if not alive_with:
        gone = [n.node_id for n in nodes if any(n.devices(t) for t in tags) and not n.alive]
        gone += [n for n in lost if n not in gone]
        extra = f"; lost: {', '.join(sorted(gone))}" if gone else ""
        return f"model {model.name!r} needs one of tags {wanted}; no alive node has tag {' or '.join(tags)}{extra}"
    need = min(model.memory_bytes[b] for _, b in model.placements)
    most = max(d.budget - d.used for d in alive_with)
    return (
        f"model {model.name!r} needs {_mb(need)} on a device tagged {' or '.join(tags)}; "
        f"the most free on any is {_mb(most)}"
    )


def _grow(
    devs: list[_Device], models: Mapping[str, ModelDemand], measured: MeasuredTable, order: Sequence[str],
    limit: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Phase 1: one instance per model (most constrained first). Phase 2: add the best marginal instance."""
    added = dict.fromkeys(models, 0)

    def options(name: str) -> list[tuple[float, _Device, str]]:
        model = models[name]
        totals = _totals(devs, models, measured)
        out = []
        for dev in devs:
            for tag, backend in model.placements:
                if dev.tag == tag and _fits(model, backend, dev):
                    out.append((_gain(model, backend, dev, models, measured, totals), dev, backend))
        return out

    def place(dev: _Device, name: str, backend: str) -> None:
        dev.instances[(name, backend)] = dev.instances.get((name, backend), 0) + 1
        dev.used += models[name].memory_bytes[backend]
        added[name] += 1

    def key(o: tuple[float, _Device, str]) -> tuple[float, str, str, int, str]:
        g, dev, backend = o
        return (-g, dev.node_id, dev.tag, dev.index, backend)

    for name in order:
        has = any(m == name for dev in devs for m, _ in dev.instances)
        if not has and (limit is None or limit.get(name, 0) > 0):
            opts = options(name)
            if opts:
                _, dev, backend = min(opts, key=key)
                place(dev, name, backend)
    while True:
        best: tuple[float, _Device, str, str] | None = None
        for name in order:
            if limit is not None and added[name] >= limit.get(name, 0):
                continue
            if not any(m == name for dev in devs for m, _ in dev.instances):
                continue
            for g, dev, backend in options(name):
                cand = (g, dev, backend, name)
                if g > 1e-9 and (best is None or key((g, dev, backend)) < key((best[0], best[1], best[2]))):
                    best = cand
        if best is None:
            return added
        place(best[1], best[3], best[2])


def _to_plan(
    devs: Sequence[_Device], models: Mapping[str, ModelDemand], measured: MeasuredTable, nodes: Sequence[NodeInfo],
    memory_fraction: float, lost: Sequence[str] = (), shortfall: Mapping[str, str] | None = None,
) -> PlacementPlan:
    placements = []
    for dev in devs:
        k = dev.k
        for (name, backend), j in sorted(dev.instances.items()):
            tp = _device_total(models[name], dev.tag, backend, k, measured) * j / k
            placements.append(Placement(name, dev.node_id, dev.tag, backend, j, fractional_share(k), tp, dev.index))
    placed = {p.model for p in placements}
    unplaced = {name: _why_unplaced(m, nodes, devs, lost) for name, m in models.items() if name not in placed}
    return PlacementPlan(
        tuple(placements), unplaced, dict(shortfall or {}), tuple(models.values()), dict(measured), memory_fraction
    )


def _order(models: Mapping[str, ModelDemand], devs: Sequence[_Device]) -> list[str]:
    """Most constrained first: fewest devices it may run on, then name."""
    def reach(m: ModelDemand) -> int:
        return sum(1 for d in devs for t, _ in m.placements if d.tag == t)
    return sorted(models, key=lambda n: (reach(models[n]), n))


def plan_placement(
    models: Sequence[ModelDemand], nodes: Sequence[NodeInfo], *, measured: MeasuredTable | None = None,
    memory_fraction: float = 0.9,
) -> PlacementPlan:
    """Greedy placement by marginal throughput under per-device memory, respecting tags.

    ``measured`` maps (model, tag, backend, k) to the items/s of k concurrent instances
    on one device; a level that was never measured is assumed to gain nothing over one
    instance, so CME is only planned where a benchmark showed it pays.
    """
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate model names: {sorted(n for n in set(names) if names.count(n) > 1)}")
    by_name = {m.name: m for m in models}
    table = dict(measured or {})
    devs = _devices(nodes, memory_fraction)
    _grow(devs, by_name, table, _order(by_name, devs))
    return _to_plan(devs, by_name, table, nodes, memory_fraction)


def route_weights(plan: PlacementPlan, model: str) -> dict[tuple[str, str], float]:
    """Share of a model's requests per (node, backend), proportional to expected throughput."""
    caps: dict[tuple[str, str], float] = {}
    for p in plan.for_model(model):
        caps[(p.node_id, p.backend)] = caps.get((p.node_id, p.backend), 0.0) + p.expected_throughput
    if not caps:
        why = plan.unplaced.get(model, f"model {model!r} is not in this plan")
        raise ValueError(f"no route for model {model!r}: {why}")
    total = math.fsum(caps.values())
    if total <= 0:
        return {k: 1.0 / len(caps) for k in caps}
    return {k: v / total for k, v in caps.items()}


def replan_after_node_loss(
    plan: PlacementPlan, nodes_now: Sequence[NodeInfo], *, measured: MeasuredTable | None = None
) -> PlacementPlan:
    """Keep what survives in place, move the lost replicas where tags and memory allow.

    Surviving placements are not disturbed (no restarts of healthy replicas); a model that
    cannot be moved is reported in ``unplaced`` with the tag that is missing, one that got
    back fewer replicas than it lost in ``shortfall``.
    """
    alive = {n.node_id for n in nodes_now if n.alive}
    lost_nodes = sorted({p.node_id for p in plan.placements if p.node_id not in alive})
    by_name = {m.name: m for m in plan.models}
    table = dict(plan.measured)
    table.update(measured or {})
    devs = _devices(nodes_now, plan.memory_fraction)
    index = {(d.node_id, d.tag, d.index): d for d in devs}
    lost_replicas: dict[str, int] = dict.fromkeys(by_name, 0)
    for p in plan.placements:
        dev = index.get((p.node_id, p.tag, p.device_index))
        if dev is None:
            lost_replicas[p.model] += p.replicas
            continue
        dev.instances[(p.model, p.backend)] = dev.instances.get((p.model, p.backend), 0) + p.replicas
        dev.used += by_name[p.model].memory_bytes[p.backend] * p.replicas
    # Models unplaced before get another chance too (a node may have joined).
    for name in plan.unplaced:
        lost_replicas[name] = max(lost_replicas.get(name, 0), 1)
    added = _grow(devs, by_name, table, _order(by_name, devs), limit=lost_replicas)
    shortfall = {}
    for name, n_lost in lost_replicas.items():
        got = added.get(name, 0)
        has_any = any(m == name for d in devs for m, _ in d.instances)
        if has_any and got < n_lost and name not in plan.unplaced:
            model = by_name[name]
            room = any(d.tag == t and _fits(model, b, d) for d in devs for t, b in model.placements)
            why = (
                "another replica on the devices left would add no throughput"
                if room
                else _why_unplaced(model, nodes_now, devs, lost_nodes)
            )
            shortfall[name] = f"model {name!r} lost {n_lost} replica(s) on {', '.join(lost_nodes)}; moved {got}: {why}"
    return _to_plan(devs, by_name, table, nodes_now, plan.memory_fraction, lost_nodes, shortfall)
