"""Layer-wise model loading plans (EdgeCaffe) and the order of requests across models (MASA).

A model is a sequence of stages (groups of layers). A policy turns it into an ordered
list of Load / Run / Free steps, each on a worker ("loader" or "executor") with the
steps it waits for. The plan's peak memory is computed from the steps, and a plan that
would not fit the budget is refused before anything is loaded: on an edge device an
out-of-memory kill mid-inference loses the request and the process.

Policies (EdgeCaffe names): ``bulk`` loads everything then runs; ``linear`` loads and
runs stage by stage and keeps what it loaded; ``partial`` also frees each stage after
it runs (least memory); ``interleaved`` (EdgeCaffe's ``deepeye``) loads stage i+1 on
the loader while the executor runs stage i, with at most two stages resident.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

LoadingPolicy = Literal["bulk", "linear", "partial", "interleaved"]
Worker = Literal["loader", "executor"]
LOADING_POLICIES: tuple[LoadingPolicy, ...] = ("bulk", "linear", "partial", "interleaved")


@dataclass(frozen=True)
class StageSpec:
    """One stage: bytes it holds while resident, and estimated seconds to load and to run."""

    index: int
    load_bytes: int
    est_load_s: float
    est_exec_s: float

    def __post_init__(self) -> None:
        if self.load_bytes < 0 or self.est_load_s < 0 or self.est_exec_s < 0:
            raise ValueError(f"stage {self.index}: bytes and times must be >= 0")


@dataclass(frozen=True)
class ModelSpec:
    """A model as an ordered sequence of stages (index 0 runs first)."""

    name: str
    stages: tuple[StageSpec, ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise ValueError(f"model {self.name!r} has no stages")
        if [s.index for s in self.stages] != list(range(len(self.stages))):
            raise ValueError(f"model {self.name!r}: stage indices must be 0..{len(self.stages) - 1} in order")

    @property
    def total_bytes(self) -> int:
        return sum(s.load_bytes for s in self.stages)

    @property
    def est_service_s(self) -> float:
        """Load plus run time of every stage, without overlap (the HRRN service estimate)."""
        return math.fsum(s.est_load_s + s.est_exec_s for s in self.stages)


@dataclass(frozen=True)
class Step:
    """One step of a plan; ``deps`` are indices of earlier steps in the same plan."""

    op: ClassVar[str] = "step"
    stage: int
    worker: Worker
    deps: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"{type(self).__name__}({self.stage})@{self.worker}"


@dataclass(frozen=True)
class Load(Step):
    """Bring a stage's weights into memory (allocates its bytes when it starts)."""

    op: ClassVar[str] = "load"


@dataclass(frozen=True)
class Run(Step):
    """Execute a stage on the activations of the previous one."""

    op: ClassVar[str] = "run"


@dataclass(frozen=True)
class Free(Step):
    """Release a stage's memory."""

    op: ClassVar[str] = "free"


@dataclass(frozen=True)
class StepTiming:
    start_s: float
    end_s: float


@dataclass(frozen=True)
class LoadPlan:
    """Ordered steps, the peak bytes they need, and the simulated makespan."""

    model: str
    policy: LoadingPolicy
    steps: tuple[Step, ...]
    peak_bytes: int
    peak_stage: int
    est_makespan_s: float
    timings: tuple[StepTiming, ...]


class BudgetExceeded(ValueError):
    """A plan needs more memory than the budget; raised before anything runs."""

    def __init__(self, model: str, policy: str, needed_bytes: int, stage: int, budget_bytes: int) -> None:
        self.model = model
        self.policy = policy
        self.needed_bytes = needed_bytes
        self.stage = stage
        self.budget_bytes = budget_bytes
        super().__init__(
            f"model {model!r} with {policy} loading needs {needed_bytes / 1e6:.1f} MB at stage {stage}, "
            f"budget {budget_bytes / 1e6:.1f} MB"
        )


def _steps(model: ModelSpec, policy: LoadingPolicy) -> list[Step]:
    steps: list[Step] = []

    def add(step: Step) -> int:
        steps.append(step)
        return len(steps) - 1

    n = len(model.stages)
    if policy == "bulk":
        loads = []
        for i in range(n):
            loads.append(add(Load(i, "loader", (loads[-1],) if loads else ())))
        prev = None
        for i in range(n):
            prev = add(Run(i, "executor", (loads[-1],) if prev is None else (prev,)))
    elif policy in ("linear", "partial"):
        prev = None  # the last step: strictly one thing at a time
        for i in range(n):
            load = add(Load(i, "loader", () if prev is None else (prev,)))
            prev = add(Run(i, "executor", (load,)))
            if policy == "partial":
                prev = add(Free(i, "executor", (prev,)))
    elif policy == "interleaved":
        loads: list[int] = []
        runs: list[int] = []
        frees: list[int] = []
        for i in range(n):
            deps = tuple(d for d in ((loads[-1] if loads else None), (frees[i - 2] if i >= 2 else None)) if d is not None)
            loads.append(add(Load(i, "loader", deps)))
            if i >= 1:
                runs.append(add(Run(i - 1, "executor", (loads[i - 1],) + ((runs[-1],) if runs else ()))))
                frees.append(add(Free(i - 1, "executor", (runs[-1],))))
        runs.append(add(Run(n - 1, "executor", (loads[n - 1],) + ((runs[-1],) if runs else ()))))
        frees.append(add(Free(n - 1, "executor", (runs[-1],))))
    else:
        raise ValueError(f"unknown loading policy {policy!r}; valid: {', '.join(LOADING_POLICIES)}")
    return steps


def _simulate(model: ModelSpec, steps: Sequence[Step]) -> tuple[StepTiming, ...]:
    """Each worker runs its steps in plan order; a step starts when its worker and its deps are done."""
    free_at: dict[str, float] = {}
    out: list[StepTiming] = []
    for step in steps:
        stage = model.stages[step.stage]
        dur = stage.est_load_s if isinstance(step, Load) else stage.est_exec_s if isinstance(step, Run) else 0.0
        start = max([free_at.get(step.worker, 0.0)] + [out[d].end_s for d in step.deps])
        out.append(StepTiming(start, start + dur))
        free_at[step.worker] = start + dur
    return tuple(out)


def _ancestors(steps: Sequence[Step]) -> list[frozenset[int]]:
    anc: list[frozenset[int]] = []
    for step in steps:
        acc: set[int] = set(step.deps)
        for d in step.deps:
            acc |= anc[d]
        anc.append(frozenset(acc))
    return anc


def _peak(model: ModelSpec, steps: Sequence[Step], timings: Sequence[StepTiming]) -> tuple[int, int]:
    """Peak resident bytes and the stage whose load reaches it.

    Memory only grows when a Load starts. At that instant a stage counts as resident if
    its Load has started (and does not wait for this one) and its Free is neither
    finished strictly before nor an ancestor of this Load: a tie with an unrelated step
    counts against us, so zero-length estimates cannot hide memory.
    """
    anc = _ancestors(steps)
    free_of = {f.stage: k for k, f in enumerate(steps) if isinstance(f, Free)}
    loads = [j for j, s in enumerate(steps) if isinstance(s, Load)]
    peak, at = 0, 0
    for i in loads:
        t = timings[i].start_s
        resident = 0
        for j in loads:
            if j != i and j not in anc[i] and (timings[j].start_s > t or i in anc[j]):
                continue  # not started yet (or cannot have: it waits for this load)
            k = free_of.get(steps[j].stage)
            if j != i and k is not None and (k in anc[i] or timings[k].end_s < t):
                continue  # already freed
            resident += model.stages[steps[j].stage].load_bytes
        if resident > peak:
            peak, at = resident, steps[i].stage
    return peak, at


def plan_loading(model: ModelSpec, policy: LoadingPolicy, budget_bytes: int | None = None) -> LoadPlan:
    """The step list for a model under a policy; raises BudgetExceeded if its peak exceeds the budget."""
    steps = _steps(model, policy)
    timings = _simulate(model, steps)
    peak, at = _peak(model, steps, timings)
    if budget_bytes is not None and peak > budget_bytes:
        raise BudgetExceeded(model.name, policy, peak, at, budget_bytes)
    makespan = max((t.end_s for t in timings), default=0.0)
    return LoadPlan(model.name, policy, tuple(steps), peak, at, makespan, timings)


@dataclass(frozen=True)
class Request:
    """A queued request: the model it needs, when it arrived, its remaining service time,
    and the bytes its next stage must load (0 when that stage is already resident)."""

    request_id: str
    model: str
    arrival_s: float
    est_service_s: float
    next_stage_bytes: int

    def response_ratio(self, now: float) -> float:
        """HRRN: (wait + service) / service; favours short jobs and ages long waits."""
        wait = max(0.0, now - self.arrival_s)
        if self.est_service_s <= 0:
            return math.inf
        return (wait + self.est_service_s) / self.est_service_s


def order_requests(
    queue: Sequence[Request],
    *,
    policy: Literal["masa", "fcfs"] = "masa",
    now: float,
    resident_bytes: int,
    budget_bytes: int,
) -> list[Request]:
    """The requests to start now, in order; each admitted one takes its next stage's bytes.

    ``fcfs`` admits in arrival order and stops at the first that does not fit (head of
    line blocking). ``masa`` skips what does not fit and, among the rest, takes the
    highest response ratio first.
    """
    free = budget_bytes - resident_bytes
    admitted: list[Request] = []
    if policy == "fcfs":
        for req in sorted(queue, key=lambda r: r.arrival_s):
            if req.next_stage_bytes > free:
                break
            admitted.append(req)
            free -= req.next_stage_bytes
        return admitted
    if policy != "masa":
        raise ValueError(f"unknown request order policy {policy!r}; valid: fcfs, masa")
    for req in sorted(queue, key=lambda r: (-r.response_ratio(now), r.arrival_s, r.request_id)):
        if req.next_stage_bytes <= free:
            admitted.append(req)
            free -= req.next_stage_bytes
    return admitted
