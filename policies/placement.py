"""Placement arithmetic for multi-tenancy: CME device shares and capacity-weighted routing.

Concurrent model executions (CME) put k instances on one device, each with a 1/k share.
Ray's fractional GPUs are a logical share with no memory isolation (ray issue 41432), so
``concurrency_level`` cuts a requested k to what device memory holds before Ray sees any
replica. Which node kinds a model runs on is declared (``deployments/tenancy_example.yaml``)
and Ray places the replicas by node tag (DMP); ``route_weights`` spreads a model's requests
over its placements in proportion to their capacity; ``placement_shortfall`` says which
resources a placement that runs short lacks (the router's gauge and `edgebatch status` use it).

Pure functions over plain data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Placement:
    """Replicas of one model on one placement (a Serve deployment): each asks Ray for ``fraction`` of a device."""

    model: str
    node_id: str
    tag: str
    backend: str
    replicas: int
    fraction: float
    expected_throughput: float


@dataclass(frozen=True)
class PlacementPlan:
    """The placements of every model, and the models that have none (and why)."""

    placements: tuple[Placement, ...]
    unplaced: Mapping[str, str] = field(default_factory=dict)

    def for_model(self, model: str) -> tuple[Placement, ...]:
        return tuple(p for p in self.placements if p.model == model)


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


@dataclass(frozen=True)
class Shortfall:
    """A placement running fewer replicas than configured, and the resources no alive node offers."""

    running: int
    target: int
    missing: tuple[str, ...]  # empty: nodes with every resource exist, but they are full or still starting

    @property
    def short(self) -> int:
        return self.target - self.running


def placement_shortfall(
    required: Mapping[str, float], running: int, target: int, alive_nodes: Sequence[Mapping[str, float]]
) -> Shortfall | None:
    """None when the placement runs all its replicas; else how short it is and which resources of
    one replica's request (``required``) no alive node offers in that amount."""
    if running >= target:
        return None
    missing = tuple(
        name for name, amount in sorted(required.items())
        if amount and not any(node.get(name, 0.0) + 1e-9 >= amount for node in alive_nodes)
    )
    return Shortfall(running=running, target=target, missing=missing)
