"""Batch-size policies of the Adaptive Batch Controller.

Pure decision functions: a window of measurements and the controller's state in,
a decision and the next state out. Nothing here talks to Ray, a clock or a log, so
every policy can be replayed on a recorded trace and checked offline.

Policies (see ``docs/policies.md`` for the formulas):

- ``algorithm1``: Kum et al., Sensors 2022, Algorithm 1. Raise to the next allowed
  size while the real-time criterion ``d_batch < N / F`` holds and memory is below the
  threshold, keep when memory is short, lower when the criterion is missed.
- ``aimd``: Clipper (NSDI 2017). Additive increase while the objective holds,
  multiplicative decrease on a miss, snapped down to an allowed size.
- ``fixed``: always the configured size (the baseline to compare against).
- ``throughput_aware`` (default): algorithm1 plus the measured throughput of each
  size. A raise is a probe; it is kept only if the larger size gave at least
  ``min_gain`` more items/s, else the controller steps back and settles. A settled
  controller re-probes only when its own measurements drift or, if configured, after
  a back-off that doubles each time the probe confirms the earlier verdict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

Action = Literal["raise", "lower", "keep"]


class ReasonCode(StrEnum):
    """Why a decision was made, in one low-cardinality word (metrics labels, tests, scripts).

    Set where the decision is made (a policy, or the controller for an operator's act); the
    decision's ``reason`` keeps the sentence with the numbers for people.
    """

    CRITERION_MET = "criterion_met"  # every batch met N/F for raise_after windows: raise
    PROBE = "probe"  # throughput_aware: try the next size and measure it
    REPROBE = "reprobe"  # a settled controller tries again (drift or back-off due)
    DEADLINE_MISSED = "deadline_missed"  # d_batch >= N/F: lower
    SLO_MISSED = "slo_missed"  # worst frame latency over max_latency_s: lower
    LOAD_FAILED = "load_failed"  # the variant did not load or run: lower or keep the size in force
    NO_THROUGHPUT_GAIN = "no_throughput_gain"  # the probe gave less than min_gain: step back
    VARIANT_NOT_RUN = "variant_not_run"  # the probed size's variant served too few items to measure a gain
    SETTLED = "settled"
    SATURATED = "saturated"  # throughput_aware: full batches, the stream outruns the device: probe a larger size
    MEMORY_SHORT = "memory_short"
    AT_LARGEST = "at_largest"
    AT_SMALLEST = "at_smallest"
    COOLDOWN = "cooldown"
    MISSED_ONCE = "missed_once"  # missed, fewer than lower_after windows in a row
    MET_STREAK = "met_streak"  # met, fewer than raise_after windows in a row
    PROBING = "probing"  # measuring a probe
    HOLD = "hold"  # aimd: the target moves, the size does not (yet)
    FIXED = "fixed"  # at the fixed size
    PIN_APPLIED = "pin_applied"  # the fixed policy moved the size to its pin
    NO_OBSERVATIONS = "no_observations"
    # set by the controller for what an operator (or the cluster) did, not by a policy
    PINNED = "pinned"  # `edgebatch batch set`
    POLICY_SET = "policy_set"  # `edgebatch batch auto`
    MANUAL = "manual"  # `edgebatch batch manual`: observe only
    PIN_CLEARED = "pin_cleared"  # the size changed outside the controller (Serve config): the pin yields
    CONFIG_CHANGED = "config_changed"  # the controller's config names another policy: it replaces the operator's
    MODEL_CHANGED = "model_changed"  # the detector now serves another model: its state starts afresh


@dataclass(frozen=True)
class Observation:
    """One measurement of the pipeline at the batch size in force.

    ``batch_size`` is the size in force (the batcher's maximum, what a policy decides);
    ``formed_batch_size`` the mean number of items in the batches that actually formed
    (the N of the real-time criterion; None when the source does not report it, then the
    size in force stands in). ``d_batch_s`` is the whole time a batch spends in the
    pipeline (pre-processing, inference, post-processing); ``fps`` is the stream rate F
    that fills batches. ``variant_items`` counts the items each variant (by its batch
    size) served in the window: a throughput is a measurement of the size in force only
    when that size's variant ran them (empty: not reported).
    """

    batch_size: int
    d_batch_s: float
    fps: float
    throughput: float
    device_util: float | None = None
    mem_used_bytes: int | None = None
    mem_total_bytes: int | None = None
    failed: bool = False
    timestamp: float = 0.0
    formed_batch_size: float | None = None
    variant_items: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.d_batch_s < 0 or self.throughput < 0:
            raise ValueError("d_batch_s and throughput must be >= 0")
        if self.formed_batch_size is not None and not self.formed_batch_size > 0:
            raise ValueError(f"formed_batch_size must be > 0, got {self.formed_batch_size}")

    @property
    def filled_size(self) -> float:
        """N of the criterion: the batches that formed, else the size in force."""
        return self.formed_batch_size if self.formed_batch_size is not None else float(self.batch_size)

    @property
    def items_on_own_variant(self) -> tuple[int, int] | None:
        """(items the size in force's variant served, all items), or None when not reported."""
        if not self.variant_items:
            return None
        return dict(self.variant_items).get(self.batch_size, 0), sum(n for _, n in self.variant_items)

    @property
    def mem_fraction(self) -> float | None:
        """Fraction of device memory in use, or None when the device does not report it."""
        if self.mem_used_bytes is None or not self.mem_total_bytes:
            return None
        return self.mem_used_bytes / self.mem_total_bytes

    @property
    def budget(self) -> RealTimeBudget:
        return RealTimeBudget(self.filled_size, self.fps)


@dataclass(frozen=True)
class RealTimeBudget:
    """The real-time criterion of a batch: N frames arrive in N / F seconds.

    A batch that takes longer than that to go through the pipeline makes the queue
    grow without bound, so ``d_batch < N / F`` is the condition for keeping up. N is the
    size of the batches that form (a mean over a window, so not always a whole number).
    """

    batch_size: float
    fps: float

    @staticmethod
    def criterion(batch_size: float, fps: float) -> float:
        """N / F in seconds."""
        return batch_size / fps

    @property
    def criterion_s(self) -> float:
        return self.criterion(self.batch_size, self.fps)

    def margin_s(self, d_batch_s: float) -> float:
        """N / F - d_batch: positive means time to spare."""
        return self.criterion_s - d_batch_s

    def is_met(self, d_batch_s: float) -> bool:
        return d_batch_s < self.criterion_s

    def worst_frame_latency_s(self, d_batch_s: float) -> float:
        """The first frame of a batch waits (N - 1) / F for the others, then d_batch."""
        return (self.batch_size - 1) / self.fps + d_batch_s


@dataclass(frozen=True)
class PolicyConfig:
    """Knobs shared by all batch-size policies."""

    allowed_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    mem_threshold: float = 0.9
    min_gain: float = 0.05
    raise_after: int = 2
    lower_after: int = 1
    cooldown_windows: int = 1
    aimd_step: float = 1.0
    aimd_factor: float = 0.5
    max_latency_s: float | None = None
    start_size: int | None = None
    drift_tolerance: float = 0.2
    reprobe_after_windows: int | None = None
    min_variant_share: float = 0.5  # a size's throughput counts only when its variant served this share

    def __post_init__(self) -> None:
        sizes = self.allowed_sizes
        if not sizes or any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
            raise ValueError(f"allowed_sizes must be strictly increasing positive integers, got {sizes}")
        if not 0 < self.mem_threshold <= 1:
            raise ValueError(f"mem_threshold must be in (0, 1], got {self.mem_threshold}")
        if self.min_gain < 0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain}")
        if self.raise_after < 1 or self.lower_after < 1 or self.cooldown_windows < 0:
            raise ValueError("raise_after and lower_after must be >= 1, cooldown_windows >= 0")
        if self.aimd_step <= 0 or not 0 < self.aimd_factor < 1:
            raise ValueError("aimd_step must be > 0 and aimd_factor in (0, 1)")
        if self.max_latency_s is not None and self.max_latency_s <= 0:
            raise ValueError(f"max_latency_s must be > 0, got {self.max_latency_s}")
        if self.start_size is not None and self.start_size not in sizes:
            raise ValueError(f"start_size {self.start_size} is not one of the allowed sizes {sizes}")
        if self.drift_tolerance <= 0:
            raise ValueError(f"drift_tolerance must be > 0, got {self.drift_tolerance}")
        if self.reprobe_after_windows is not None and self.reprobe_after_windows < 1:
            raise ValueError("reprobe_after_windows must be >= 1 or None")
        if not 0 < self.min_variant_share <= 1:
            raise ValueError(f"min_variant_share must be in (0, 1], got {self.min_variant_share}")

    @property
    def initial_size(self) -> int:
        return self.start_size if self.start_size is not None else self.allowed_sizes[0]

    def size_above(self, n: int) -> int | None:
        """The next allowed size above n, or None at the top."""
        return next((s for s in self.allowed_sizes if s > n), None)

    def size_below(self, n: int) -> int:
        """The next allowed size below n (the smallest allowed size at the bottom)."""
        below = [s for s in self.allowed_sizes if s < n]
        return below[-1] if below else self.allowed_sizes[0]

    def snap_down(self, target: float) -> int:
        """The largest allowed size <= target (the smallest allowed size if none)."""
        fits = [s for s in self.allowed_sizes if s <= target + 1e-9]
        return fits[-1] if fits else self.allowed_sizes[0]


@dataclass(frozen=True)
class ControllerState:
    """What a policy remembers between windows. Frozen: each decision returns a new one.

    ``throughput`` is the best throughput measured per batch size (since the last
    reset), as sorted ``(size, items_per_s)`` pairs. ``ceiling`` is the smallest size
    the controller will not try again until a re-probe is due; ``probe_from`` is set
    while the size in force is a probe above that smaller size.
    """

    current: int | None = None
    windows: int = 0
    raise_streak: int = 0
    lower_streak: int = 0
    cooldown: int = 0
    throughput: tuple[tuple[int, float], ...] = ()
    probe_from: int | None = None
    ceiling: int | None = None
    ceiling_reason: str = ""
    reference_throughput: float | None = None
    reference_fps: float | None = None
    next_reprobe_at: int | None = None
    reprobe_interval: int | None = None
    aimd_target: float | None = None
    last_action: Action = "keep"

    def throughput_at(self, size: int) -> float | None:
        return dict(self.throughput).get(size)

    def with_throughput(self, size: int, items_per_s: float) -> ControllerState:
        table = dict(self.throughput)
        table[size] = max(items_per_s, table.get(size, 0.0))
        return replace(self, throughput=tuple(sorted(table.items())))

    def forget_throughput(self, keep: Callable[[int], bool]) -> ControllerState:
        return replace(self, throughput=tuple((s, t) for s, t in self.throughput if keep(s)))


@dataclass(frozen=True)
class Decision:
    """The batch size for the next window, and why: ``code`` for machines, ``reason`` in words with the numbers."""

    batch_size: int
    action: Action
    reason: str
    policy: str
    from_size: int = field(default=0)
    code: ReasonCode = field(kw_only=True)


@dataclass(frozen=True)
class WindowSummary:
    """A window reduced to the figures the policies compare (observations at the size in force)."""

    batch_size: int
    fps: float
    d_batch_s: float
    worst_d_batch_s: float
    throughput: float
    mem_fraction: float | None
    failed: bool
    count: int
    formed_batch_size: float
    own_variant_share: float | None  # share of the items the size in force's variant served; None: not reported
    formed_reported: bool = False  # the source reported the formed batch sizes (so full batches can be told)

    @property
    def budget(self) -> RealTimeBudget:
        return RealTimeBudget(self.formed_batch_size, self.fps)

    def measures_own_size(self, config: PolicyConfig) -> bool:
        """The window's throughput is a figure of the size in force (its variant ran the items)."""
        return self.own_variant_share is None or self.own_variant_share >= config.min_variant_share

    @property
    def missed(self) -> bool:
        """The mean batch delay misses N / F: the queue grows."""
        return not self.budget.is_met(self.d_batch_s)

    @property
    def all_met(self) -> bool:
        """Every batch of the window met N / F: the only ground for a raise."""
        return self.budget.is_met(self.worst_d_batch_s)


def summarize(window: Sequence[Observation]) -> WindowSummary:
    """Reduce a window to the observations at the size in force (that of the last one)."""
    if not window:
        raise ValueError("summarize needs at least one observation")
    n = window[-1].batch_size
    at_n = [o for o in window if o.batch_size == n]
    ok = [o for o in at_n if not o.failed]
    mems = [m for m in (o.mem_fraction for o in at_n) if m is not None]
    shares = [s for s in (o.items_on_own_variant for o in ok) if s is not None]
    total = sum(t for _, t in shares)
    return WindowSummary(
        batch_size=n,
        fps=window[-1].fps,
        d_batch_s=math.fsum(o.d_batch_s for o in ok) / len(ok) if ok else math.inf,
        worst_d_batch_s=max((o.d_batch_s for o in ok), default=math.inf),
        throughput=math.fsum(o.throughput for o in ok) / len(ok) if ok else 0.0,
        mem_fraction=max(mems) if mems else None,
        failed=any(o.failed for o in at_n),
        count=len(at_n),
        formed_batch_size=math.fsum(o.filled_size for o in ok) / len(ok) if ok else float(n),
        own_variant_share=(sum(own for own, _ in shares) / total if total else 0.0) if shares else None,
        formed_reported=bool(ok) and all(o.formed_batch_size is not None for o in ok),
    )


BatchPolicy = Callable[[Sequence[Observation], ControllerState, PolicyConfig], tuple[Decision, ControllerState]]


def _describe(w: WindowSummary) -> str:
    b = w.budget
    rel = "<" if b.is_met(w.d_batch_s) else ">="
    mem = "memory n/a" if w.mem_fraction is None else f"memory {w.mem_fraction:.0%}"
    formed = f"{w.formed_batch_size:.3g}" + ("" if w.formed_batch_size == w.batch_size else f" formed of max {w.batch_size}")
    return (
        f"d_batch {w.d_batch_s:.3f} s {rel} N/F {b.criterion_s:.3f} s "
        f"(N={formed}, F={w.fps:g} fps, margin {b.margin_s(w.d_batch_s):+.3f} s), "
        f"{w.throughput:.1f} items/s, {mem}"
    )


def _slo_missed(w: WindowSummary, config: PolicyConfig) -> str | None:
    if config.max_latency_s is None or w.failed:
        return None
    latency = w.budget.worst_frame_latency_s(w.d_batch_s)
    if latency > config.max_latency_s:
        return f"worst frame latency {latency:.3f} s > SLO {config.max_latency_s:.3f} s"
    return None


def _memory_short(w: WindowSummary, config: PolicyConfig) -> bool:
    return w.mem_fraction is not None and w.mem_fraction >= config.mem_threshold


def _tick(state: ControllerState, w: WindowSummary, config: PolicyConfig) -> ControllerState:
    """Count the window and update streaks from its verdict."""
    bad = w.failed or w.missed or _slo_missed(w, config) is not None
    good = not bad and w.all_met
    return replace(
        state,
        current=w.batch_size,
        windows=state.windows + 1,
        raise_streak=state.raise_streak + 1 if good else 0,
        lower_streak=state.lower_streak + 1 if bad else 0,
        cooldown=max(0, state.cooldown - 1),
    )


def _change(
    name: str, state: ControllerState, w: WindowSummary, new: int, reason: str, config: PolicyConfig,
    code: ReasonCode,
) -> tuple[Decision, ControllerState]:
    if new == w.batch_size:
        return Decision(new, "keep", reason, name, w.batch_size, code=code), replace(state, last_action="keep")
    action: Action = "raise" if new > w.batch_size else "lower"
    nxt = replace(
        state,
        current=new,
        raise_streak=0,
        lower_streak=0,
        cooldown=config.cooldown_windows,
        last_action=action,
    )
    return Decision(new, action, reason, name, w.batch_size, code=code), nxt


def _keep(
    name: str, state: ControllerState, w: WindowSummary, reason: str, code: ReasonCode
) -> tuple[Decision, ControllerState]:
    return Decision(w.batch_size, "keep", reason, name, w.batch_size, code=code), replace(state, last_action="keep")


def _empty(name: str, state: ControllerState, config: PolicyConfig) -> tuple[Decision, ControllerState]:
    size = state.current if state.current is not None else config.initial_size
    return Decision(size, "keep", "no observations in this window", name, size, code=ReasonCode.NO_OBSERVATIONS), state


def _failure_or_miss(
    name: str, state: ControllerState, w: WindowSummary, config: PolicyConfig
) -> tuple[Decision, ControllerState] | None:
    """Shared safety rule: lower on a failed load at once, on a miss after ``lower_after`` windows."""
    n = w.batch_size
    slo = _slo_missed(w, config)
    if w.failed:
        down = config.size_below(n)
        why, code = f"load or run failed at batch {n} (out of memory?)", ReasonCode.LOAD_FAILED
    elif w.missed or slo:
        if state.lower_streak < config.lower_after:
            return _keep(name, state, w, f"{_describe(w)}: missed {state.lower_streak} of {config.lower_after} windows",
                         ReasonCode.MISSED_ONCE)
        down = config.size_below(n)
        if slo and not w.missed:
            why, code = slo, ReasonCode.SLO_MISSED
        else:
            why, code = _describe(w), ReasonCode.DEADLINE_MISSED
    else:
        return None
    if down == n:
        return _keep(name, state, w, f"{why}: already at the smallest allowed size {n}",
                     ReasonCode.LOAD_FAILED if w.failed else ReasonCode.AT_SMALLEST)
    return _change(name, state, w, down, f"{why}: lower to {down}", config, code)


def algorithm1(
    window: Sequence[Observation], state: ControllerState, config: PolicyConfig
) -> tuple[Decision, ControllerState]:
    """Kum et al. Algorithm 1: raise while d_batch < N/F and memory < threshold, lower on a miss."""
    name = "algorithm1"
    if not window:
        return _empty(name, state, config)
    w = summarize(window)
    state = _tick(state, w, config)
    safety = _failure_or_miss(name, state, w, config)
    if safety is not None:
        return safety
    n = w.batch_size
    up = config.size_above(n)
    if _memory_short(w, config):
        return _keep(name, state, w, f"{_describe(w)} >= threshold {config.mem_threshold:.0%}: keep {n}",
                     ReasonCode.MEMORY_SHORT)
    if up is None:
        return _keep(name, state, w, f"{_describe(w)}: at the largest allowed size {n}", ReasonCode.AT_LARGEST)
    if state.cooldown > 0:
        return _keep(name, state, w, f"{_describe(w)}: cooling down {state.cooldown} more window(s)", ReasonCode.COOLDOWN)
    if state.raise_streak < config.raise_after:
        return _keep(name, state, w, f"{_describe(w)}: met {state.raise_streak} of {config.raise_after} windows",
                     ReasonCode.MET_STREAK)
    return _change(name, state, w, up, f"{_describe(w)}: raise to {up}", config, ReasonCode.CRITERION_MET)


def aimd(
    window: Sequence[Observation], state: ControllerState, config: PolicyConfig
) -> tuple[Decision, ControllerState]:
    """Clipper's AIMD on a continuous target, snapped down to an allowed size."""
    name = "aimd"
    if not window:
        return _empty(name, state, config)
    w = summarize(window)
    state = _tick(state, w, config)
    n = w.batch_size
    target = state.aimd_target if state.aimd_target is not None else float(n)
    # The size in force may differ from the target (e.g. set from outside): trust the measurement.
    if config.snap_down(target) != config.snap_down(n):
        target = float(n)
    slo = _slo_missed(w, config)
    lo, hi = config.allowed_sizes[0], config.allowed_sizes[-1]
    if w.failed or w.missed or slo:
        if not w.failed and state.lower_streak < config.lower_after:
            state = replace(state, aimd_target=target)
            return _keep(name, state, w, f"{_describe(w)}: missed {state.lower_streak} of {config.lower_after} windows",
                         ReasonCode.MISSED_ONCE)
        target = max(float(lo), min(target, float(n)) * config.aimd_factor)
        new = min(config.snap_down(target), config.size_below(n))
        if w.failed:
            why, code = "load or run failed", ReasonCode.LOAD_FAILED
        elif slo and not w.missed:
            why, code = slo, ReasonCode.SLO_MISSED
        else:
            why, code = _describe(w), ReasonCode.DEADLINE_MISSED
        state = replace(state, aimd_target=target)
        if new == n:
            return _keep(name, state, w, f"{why}: already at the smallest allowed size {n}",
                         ReasonCode.LOAD_FAILED if w.failed else ReasonCode.AT_SMALLEST)
        return _change(name, state, w, new, f"{why}: target x{config.aimd_factor:g} = {target:.2f}, lower to {new}",
                       config, code)
    if _memory_short(w, config) or state.cooldown > 0 or not w.all_met:
        if _memory_short(w, config):
            why, code = "memory short", ReasonCode.MEMORY_SHORT
        elif state.cooldown:
            why, code = "cooling down", ReasonCode.COOLDOWN
        else:
            why, code = "a batch missed", ReasonCode.MISSED_ONCE
        state = replace(state, aimd_target=target)
        return _keep(name, state, w, f"{_describe(w)}: {why}, hold target {target:.2f}", code)
    target = min(float(hi), target + config.aimd_step)
    new = max(config.snap_down(target), n) if n in config.allowed_sizes else config.snap_down(target)
    state = replace(state, aimd_target=target)
    if new == n:
        return _keep(name, state, w, f"{_describe(w)}: target +{config.aimd_step:g} = {target:.2f}, keep {n}",
                     ReasonCode.AT_LARGEST if n == hi else ReasonCode.HOLD)
    return _change(name, state, w, new, f"{_describe(w)}: target +{config.aimd_step:g} = {target:.2f}, raise to {new}",
                   config, ReasonCode.CRITERION_MET)


def fixed(
    window: Sequence[Observation], state: ControllerState, config: PolicyConfig
) -> tuple[Decision, ControllerState]:
    """Always the configured size (``start_size``, else the smallest allowed)."""
    name = "fixed"
    size = config.initial_size
    if not window:
        return Decision(size, "keep", f"fixed at {size}", name, size, code=ReasonCode.FIXED), replace(state, current=size)
    w = summarize(window)
    state = _tick(state, w, config)
    if size == w.batch_size:
        return _keep(name, state, w, f"fixed at {size} ({_describe(w)})", ReasonCode.FIXED)
    return _change(name, state, w, size, f"fixed at {size}: the size in force was {w.batch_size}; back to {size} "
                   f"({_describe(w)})", config, ReasonCode.PIN_APPLIED)


def _drifted(state: ControllerState, w: WindowSummary, config: PolicyConfig) -> str | None:
    ref, ref_fps = state.reference_throughput, state.reference_fps
    if ref is None or ref_fps is None:
        return None
    if ref > 0 and abs(w.throughput / ref - 1) > config.drift_tolerance:
        return f"throughput at {w.batch_size} moved from {ref:.1f} to {w.throughput:.1f} items/s"
    if abs(w.fps / ref_fps - 1) > config.drift_tolerance:
        return f"stream rate moved from {ref_fps:g} to {w.fps:g} fps"
    return None


def _settle(state: ControllerState, ceiling: int, reason: str, config: PolicyConfig) -> ControllerState:
    """Stop below ``ceiling`` until the measurements drift or the (backed-off) re-probe is due."""
    interval = state.reprobe_interval or config.reprobe_after_windows
    return replace(
        state,
        probe_from=None,
        ceiling=ceiling,
        ceiling_reason=reason,
        reference_throughput=None,
        reference_fps=None,
        reprobe_interval=interval,
        next_reprobe_at=None if interval is None else state.windows + interval,
    )


def _saturated(w: WindowSummary, config: PolicyConfig) -> str | None:
    """Why the device, not the batch size, is behind: full batches formed and fewer items/s came out than went in.

    Only a window that reports its formed batch sizes can say so (a half-empty batch is a latency
    question, not a capacity one); a failure, full memory or a missed latency SLO is never saturation.
    """
    if (w.failed or not w.formed_reported or w.formed_batch_size < w.batch_size - 0.5 or _memory_short(w, config)
            or _slo_missed(w, config) is not None or not w.measures_own_size(config)):
        return None
    if w.throughput >= w.fps * (1 - config.min_gain):
        return None
    return f"full batches of {w.batch_size}, {w.throughput:.1f} items/s out of {w.fps:g} in"


def predicted_capacity(measured: Mapping[int, float], size: int) -> float:
    """Items/s at ``size`` from the capacities measured at other sizes: batch time affine in N.

    With one measured size the batch time is taken as no longer than there (an optimistic bound:
    capacity grows at most linearly), with two or more the line through the two largest.
    """
    sizes = sorted(measured)
    top = sizes[-1]
    t_top = top / measured[top]
    slope = 0.0
    if len(sizes) > 1:
        low = sizes[-2]
        slope = max(0.0, (t_top - low / measured[low]) / (top - low))
    batch_time = t_top + slope * (size - top)
    return size / batch_time if batch_time > 0 else math.inf


def _saturation_target(n: int, state: ControllerState, fps: float, config: PolicyConfig) -> tuple[int, float] | None:
    """The size to probe when saturated at ``n``: the smallest untried size predicted to keep up with ``fps``,
    else the one predicted best if that beats the best measured by ``min_gain``; None: nothing worth trying.

    After a jump that did not pay (a ceiling is set), the curve between the smallest measured size and
    that ceiling is unknown: the next size up is tried once before the prediction decides again.
    """
    measured = dict(state.throughput)
    if not measured:
        return None
    candidates = [s for s in config.allowed_sizes if s > n and s not in measured
                  and (state.ceiling is None or s < state.ceiling)]
    predicted = {s: predicted_capacity(measured, s) for s in candidates}
    if state.ceiling is not None and candidates:
        inside = [s for s in measured if min(measured) < s < state.ceiling]
        if not inside:
            return candidates[0], predicted[candidates[0]]
    keeping_up = [s for s in candidates if predicted[s] >= fps]
    if keeping_up and state.ceiling is None:
        return keeping_up[0], predicted[keeping_up[0]]
    best = max(candidates, key=lambda s: predicted[s], default=None)
    if best is not None and predicted[best] >= (1 + config.min_gain) * max(measured.values()):
        return best, predicted[best]
    return None


def _saturated_move(
    name: str, state: ControllerState, w: WindowSummary, config: PolicyConfig, why: str
) -> tuple[Decision, ControllerState]:
    """Saturated: judge a running probe, then jump to the size the measured curve predicts (at most a few probes)."""
    n = w.batch_size
    if state.cooldown > 0:
        return _keep(name, state, w, f"{why}: cooling down", ReasonCode.COOLDOWN)
    if state.probe_from is not None:
        small = state.probe_from
        t_small, t_big = state.throughput_at(small) or 0.0, state.throughput_at(n) or 0.0
        gain = t_big / t_small - 1 if t_small > 0 else math.inf
        if gain < config.min_gain:
            back = max(state.throughput, key=lambda st: st[1])[0]
            verdict = f"{why}: batch {n} gave {t_big:.1f} items/s vs {t_small:.1f} at {small} ({gain:+.1%})"
            state = _settle(state, n, verdict, config)
            return _change(name, state, w, back, f"{verdict}: back to {back}, the best measured", config,
                           ReasonCode.NO_THROUGHPUT_GAIN)
        state = replace(state, probe_from=None)
    target = _saturation_target(n, state, w.fps, config)
    if target is None:
        best = max(state.throughput, key=lambda st: st[1])[0] if state.throughput else n
        if best != n:
            state = _settle(state, n, f"{why}: batch {best} measured more", config)
            return _change(name, state, w, best, f"{why}: batch {best} measured more items/s: back to {best}",
                           config, ReasonCode.NO_THROUGHPUT_GAIN)
        return _keep(name, state, w, f"settled at {n}: {why}; no untried size is predicted to do better",
                     ReasonCode.SETTLED)
    size, predicted = target
    decision, nxt = _change(name, state, w, size, f"{why}: probe {size} (predicted {predicted:.1f} items/s)",
                            config, ReasonCode.SATURATED)
    return decision, replace(nxt, probe_from=n, ceiling_reason="")


def throughput_aware(
    window: Sequence[Observation], state: ControllerState, config: PolicyConfig
) -> tuple[Decision, ControllerState]:
    """Algorithm 1 that only keeps a larger batch when it buys at least ``min_gain`` more items/s."""
    name = "throughput_aware"
    if not window:
        return _empty(name, state, config)
    w = summarize(window)
    n = w.batch_size
    state = _tick(state, w, config)
    if state.probe_from is not None and state.probe_from >= n:
        state = replace(state, probe_from=None)  # the size was changed from outside
    if not w.failed and w.measures_own_size(config):
        state = state.with_throughput(n, w.throughput)  # only what this size's variant ran counts as its figure

    saturated = _saturated(w, config)
    if saturated is not None:  # lowering cannot help a device that is behind: measure larger sizes instead
        return _saturated_move(name, state, w, config, saturated)

    safety = _failure_or_miss(name, state, w, config)
    if safety is not None:
        decision, nxt = safety
        if decision.action == "lower":
            nxt = _settle(nxt, n, decision.reason, config)
        return decision, nxt

    # A probe: after raise_after windows at the larger size, keep it only if it paid.
    if state.probe_from is not None:
        if state.raise_streak < config.raise_after:
            return _keep(name, state, w, f"{_describe(w)}: probing {n}, window {state.raise_streak} of {config.raise_after}",
                         ReasonCode.PROBING)
        small = state.probe_from
        t_big = state.throughput_at(n)
        if t_big is None:  # the larger variant hardly ran: there is no gain of it to keep
            share = w.own_variant_share or 0.0
            verdict = (
                f"batch {n}'s variant served {share:.0%} of the items (batches of {w.formed_batch_size:.2g} formed, "
                f"need {config.min_variant_share:.0%} on it to measure a gain)"
            )
            state = _settle(state, n, verdict, config)
            return _change(name, state, w, small, f"{verdict}: step back to {small}", config, ReasonCode.VARIANT_NOT_RUN)
        below = [t for s, t in state.throughput if s < n]
        t_small = state.throughput_at(small) or max(below, default=0.0)
        gain = t_big / t_small - 1 if t_small > 0 else math.inf
        verdict = (
            f"batch {n} gave {t_big:.1f} items/s vs {t_small:.1f} at {small} "
            f"({gain:+.1%}, need {config.min_gain:+.0%})"
        )
        if gain < config.min_gain:
            state = _settle(state, n, verdict, config)
            return _change(name, state, w, small, f"{verdict}: step back to {small}", config, ReasonCode.NO_THROUGHPUT_GAIN)
        state = replace(
            state, probe_from=None, ceiling=None, ceiling_reason="", reprobe_interval=config.reprobe_after_windows
        )

    up = config.size_above(n)
    if _memory_short(w, config):
        return _keep(name, state, w, f"{_describe(w)} >= threshold {config.mem_threshold:.0%}: keep {n}",
                     ReasonCode.MEMORY_SHORT)
    if up is None:
        return _keep(name, state, w, f"{_describe(w)}: at the largest allowed size {n}", ReasonCode.AT_LARGEST)

    if state.ceiling is not None and up >= state.ceiling:
        if state.reference_throughput is None:
            state = replace(state, reference_throughput=w.throughput, reference_fps=w.fps)
        drift = _drifted(state, w, config)
        due = state.next_reprobe_at is not None and state.windows >= state.next_reprobe_at
        if not drift and not due:
            return _keep(name, state, w, f"settled at {n}: {state.ceiling_reason}", ReasonCode.SETTLED)
        if drift:
            # Conditions changed: the old figures no longer describe this device.
            state = replace(state, throughput=((n, w.throughput),), reprobe_interval=config.reprobe_after_windows)
            why = f"re-probe: {drift}"
        else:
            # Back off: if this probe confirms the old verdict, the next one waits twice as long.
            state = replace(state, reprobe_interval=2 * (state.reprobe_interval or 1))
            state = state.forget_throughput(lambda s: s <= n)
            why = f"re-probe due after {state.reprobe_interval // 2} windows settled"
        state = replace(state, ceiling=None, ceiling_reason=why, reference_throughput=None, reference_fps=None)

    if state.cooldown > 0:
        return _keep(name, state, w, f"{_describe(w)}: cooling down {state.cooldown} more window(s)", ReasonCode.COOLDOWN)
    if state.raise_streak < config.raise_after:
        return _keep(name, state, w, f"{_describe(w)}: met {state.raise_streak} of {config.raise_after} windows",
                     ReasonCode.MET_STREAK)
    if w.formed_reported and abs(w.throughput / w.fps - 1) < config.min_gain:
        # every frame of the stream is served: a larger batch can add no items/s, only latency
        return _keep(name, state, w, f"settled at {n}: the stream is served in full ({w.throughput:.1f} items/s of "
                     f"{w.fps:g}), a larger batch would add latency, not throughput", ReasonCode.SETTLED)
    reprobe = state.ceiling_reason.startswith("re-probe")
    prefix = f"{state.ceiling_reason}; " if reprobe else ""
    decision, nxt = _change(name, state, w, up, f"{prefix}{_describe(w)}: probe {up}", config,
                            ReasonCode.REPROBE if reprobe else ReasonCode.PROBE)
    return decision, replace(nxt, probe_from=n, ceiling_reason="")


POLICIES: Mapping[str, BatchPolicy] = MappingProxyType(
    {
        "algorithm1": algorithm1,
        "aimd": aimd,
        "fixed": fixed,
        "throughput_aware": throughput_aware,
    }
)
DEFAULT_POLICY = "throughput_aware"


def get_policy(name: str = DEFAULT_POLICY) -> BatchPolicy:
    """The policy called ``name``; a ValueError lists the valid names."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown batch-size policy {name!r}; valid: {', '.join(sorted(POLICIES))}") from None


def replay(
    policy: BatchPolicy,
    windows: Sequence[Mapping[int, Sequence[Observation]]],
    config: PolicyConfig,
    state: ControllerState | None = None,
) -> list[Decision]:
    """Run a policy in closed loop over a trace that holds, per window, what each size measured.

    Why per size: a recorded sweep says what the pipeline did at every allowed size in
    each time slice, so any policy can be replayed on it, not just the one that ran.
    """
    state = state if state is not None else ControllerState()
    size = config.initial_size
    decisions: list[Decision] = []
    for by_size in windows:
        decision, state = policy(list(by_size.get(size, ())), replace(state, current=size), config)
        decisions.append(decision)
        size = decision.batch_size
    return decisions
