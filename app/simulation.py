"""A discrete-event simulation of the batch pipeline, driven by a device profile: the policies offline.

On a small CPU batching buys nothing, so the controller cannot show there what it does on an
accelerator. Here the pure policies of ``policies/batch_size.py`` run in closed loop against a
*device profile*: per batch size, the time a batch takes (d_batch) and the images/s the device
sustains at that size, the stream rate F x k streams, and the memory per variant. Frames arrive
at the stream rate; the batcher takes up to N queued frames when the device is free (waiting at
most N/F for the batch to fill, dropping the oldest past a bounded queue); a batch runs on the
fixed-batch variant of size N (padded); every ``window_s`` the policy gets one Observation per
batch and picks the size for the next window. Everything here is simulated: nothing runs a model.

Profiles come from measured curves (``python -m app.devicecheck``, ``edgebatch bench sweep --json``,
``edgebatch bench pipeline``) or from published tables; each says where its numbers are from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from app.errors import BadRequest
from policies.batch_size import (
    POLICIES,
    ControllerState,
    Observation,
    PolicyConfig,
    ReasonCode,
    get_policy,
)

PROFILE_DIR = Path(__file__).resolve().parent / "bench" / "profiles"
PROFILE_KINDS = ("measured", "published", "synthetic")
PROBE_CODES = (ReasonCode.PROBE, ReasonCode.REPROBE, ReasonCode.SATURATED)
TIE_TOLERANCE = 0.01  # static sizes within 1% of the best throughput count as equal; the smallest wins


@dataclass(frozen=True)
class SizePoint:
    """One batch size of a device: how long a batch takes, how many images/s it sustains, its memory."""

    batch_size: int
    d_batch_s: float
    images_per_s: float | None = None  # None: N / d_batch (stages not overlapped)
    mem_bytes: int | None = None  # device memory with this variant loaded and running

    @property
    def capacity(self) -> float:
        return self.images_per_s if self.images_per_s else self.batch_size / self.d_batch_s

    @property
    def service_s(self) -> float:
        """How often a batch of this size can start (the slowest stage's time when stages overlap)."""
        return self.batch_size / self.capacity


@dataclass(frozen=True)
class DeviceProfile:
    """A device's batch curve and the load it serves; ``source`` says where every number comes from."""

    name: str
    kind: str  # measured | published | synthetic
    description: str
    source: str
    points: tuple[SizePoint, ...]
    fps: float = 30.0  # per stream
    streams: int = 1
    mem_total_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in PROFILE_KINDS:
            raise BadRequest(f"profile {self.name}: kind {self.kind!r} must be one of {', '.join(PROFILE_KINDS)}")
        sizes = [p.batch_size for p in self.points]
        if not sizes or sizes != sorted(set(sizes)) or sizes[0] < 1:
            raise BadRequest(f"profile {self.name}: batch sizes {sizes} must be increasing positive integers")
        if any(not p.d_batch_s > 0 or (p.images_per_s is not None and not p.images_per_s > 0) for p in self.points):
            raise BadRequest(f"profile {self.name}: every d_batch_ms and images_per_s must be > 0")
        if not self.fps > 0 or self.streams < 1:
            raise BadRequest(f"profile {self.name}: fps must be > 0 and streams >= 1")

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(p.batch_size for p in self.points)

    @property
    def rate(self) -> float:
        """Frames per second arriving at the batcher: F x streams (the F of N/F)."""
        return self.fps * self.streams

    def point(self, n: int) -> SizePoint:
        return next(p for p in self.points if p.batch_size == n)

    def fails(self, n: int) -> bool:
        mem = self.point(n).mem_bytes
        return mem is not None and self.mem_total_bytes is not None and mem > self.mem_total_bytes

    def with_load(self, fps: float | None = None, streams: int | None = None) -> DeviceProfile:
        return replace(self, fps=self.fps if fps is None else fps, streams=self.streams if streams is None else streams)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "description": self.description, "source": self.source,
            "fps": self.fps, "streams": self.streams, "mem_total_bytes": self.mem_total_bytes,
            "sizes": [{"batch_size": p.batch_size, "d_batch_ms": round(p.d_batch_s * 1000, 4),
                       "images_per_s": p.images_per_s, "mem_bytes": p.mem_bytes} for p in self.points],
        }


# ---------------------------------------------------------------------------- reading profiles


def profile_from_dict(data: dict[str, Any], label: str) -> DeviceProfile:
    """A profile JSON object, a device check's output (its ``profile``), or a `bench sweep --json` object."""
    if not isinstance(data, dict):
        raise BadRequest(f"{label} is not a JSON object; see docs/adaptive.md for the profile format")
    if "sizes" not in data and isinstance(data.get("profile"), dict):
        return profile_from_dict(data["profile"], label)
    if "sizes" not in data and data.get("bench") == "sweep":
        return _from_sweep(data, label)
    try:
        points = tuple(SizePoint(
            batch_size=int(s["batch_size"]), d_batch_s=float(s["d_batch_ms"]) / 1000.0,
            images_per_s=None if s.get("images_per_s") is None else float(s["images_per_s"]),
            mem_bytes=None if s.get("mem_bytes") is None else int(s["mem_bytes"]),
        ) for s in data["sizes"])
        return DeviceProfile(
            name=str(data.get("name") or label), kind=str(data.get("kind", "measured")),
            description=str(data.get("description", "")), source=str(data.get("source", label)), points=points,
            fps=float(data.get("fps", 30.0)), streams=int(data.get("streams", 1)),
            mem_total_bytes=None if data.get("mem_total_bytes") is None else int(data["mem_total_bytes"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadRequest(f"{label} is not a device profile ({type(exc).__name__}: {exc}): it needs 'sizes', a list "
                         "of {{batch_size, d_batch_ms[, images_per_s, mem_bytes]}}; see docs/adaptive.md") from None


def _from_sweep(data: dict[str, Any], label: str) -> DeviceProfile:
    """`edgebatch bench sweep --json`: the concurrency-1 rows of one backend (p50 per batch as d_batch)."""
    rows = [r for r in data.get("rows", []) if r.get("concurrency") == 1 and r.get("ok", True) and r.get("p50_ms")]
    if not rows:
        raise BadRequest(f"{label}: a bench sweep with no successful concurrency-1 rows cannot make a profile")
    backend = rows[0]["backend"]
    rows = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["batch_size"])
    points = tuple(SizePoint(int(r["batch_size"]), float(r["p50_ms"]) / 1000.0, float(r["throughput"])) for r in rows)
    return DeviceProfile(name=Path(label).stem, kind="measured", description=f"bench sweep, {backend}, k=1",
                         source=label, points=points)


def shipped_profiles() -> dict[str, Path]:
    """Profile name -> file, for the profiles that ship in app/bench/profiles."""
    return {p.stem: p for p in sorted(PROFILE_DIR.glob("*.json"))}


def load_profile(name_or_file: str) -> DeviceProfile:
    """A shipped profile by name, or a JSON file (profile, device check output, or bench sweep --json)."""
    shipped = shipped_profiles()
    path = shipped.get(name_or_file, Path(name_or_file))
    if not path.is_file():
        raise BadRequest(f"no profile {name_or_file!r}: use a file or one of {', '.join(shipped) or '(none shipped)'}")
    text = path.read_text()
    try:
        data = json.loads(text)
    except ValueError:
        lines = [line for line in text.splitlines() if line.strip().startswith("{")]
        try:
            data = json.loads(lines[-1]) if lines else None  # the JSON last line of a bench's output
        except ValueError:
            data = None
        if data is None:
            raise BadRequest(f"{path} is not JSON (nor a bench output whose last line is JSON)") from None
    return profile_from_dict(data, str(path))


# ---------------------------------------------------------------------------- the simulation


@dataclass
class WindowRecord:
    """What one policy window saw and decided."""

    index: int
    batch_size: int
    items: int
    dropped: int
    failed: int
    decision: str
    code: str


@dataclass
class RunResult:
    """One policy (or a static size) over one profile."""

    policy: str
    windows: list[WindowRecord] = field(default_factory=list)
    tail_items: int = 0
    tail_seconds: float = 0.0
    tail_latency_sum_s: float = 0.0
    tail_worst_latency_s: float = 0.0

    @property
    def throughput(self) -> float:
        return self.tail_items / self.tail_seconds if self.tail_seconds else 0.0

    @property
    def mean_latency_s(self) -> float:
        return self.tail_latency_sum_s / self.tail_items if self.tail_items else math.inf

    def settled(self, tail: int) -> tuple[int | None, int]:
        """(the size in force over the last ``tail`` windows or None, the window of the last change + 1)."""
        sizes = [w.batch_size for w in self.windows]
        last_change = max((i for i in range(1, len(sizes)) if sizes[i] != sizes[i - 1]), default=0)
        stable = len(set(sizes[-tail:])) == 1
        return (sizes[-1] if stable else None), last_change

    def probes(self, until: int) -> int:
        """Probe decisions (a size tried to be measured) before window ``until``."""
        return sum(1 for w in self.windows[:until] if w.code in PROBE_CODES)


@dataclass(frozen=True)
class SimulationSettings:
    windows: int = 60
    window_s: float = 2.0
    tail_windows: int = 20  # measured at the end, where a settled policy should be
    queue_batches: int = 2  # the bounded queue holds this many of the largest batch


def simulate(profile: DeviceProfile, policy: str, config: PolicyConfig,
             settings: SimulationSettings = SimulationSettings()) -> RunResult:
    """Run ``policy`` in closed loop on ``profile``; deterministic (evenly spaced arrivals)."""
    decide = get_policy(policy)
    rate = profile.rate
    queue_cap = settings.queue_batches * max(profile.sizes)
    state = ControllerState()
    size = config.initial_size
    result = RunResult(policy)
    next_frame = 0  # index of the oldest frame not yet taken (frame k arrives at k / rate)
    t_free = 0.0
    last_start: tuple[float, int] | None = None  # (start, size) of the previous batch
    tail_from = (settings.windows - settings.tail_windows) * settings.window_s
    for w in range(settings.windows):
        t_end = (w + 1) * settings.window_s
        obs: list[Observation] = []
        items = dropped = failed = 0
        while True:
            point = profile.point(size)
            oldest = next_frame / rate
            full_at = (next_frame + size - 1) / rate
            start = max(t_free, min(full_at, oldest + size / rate))
            if start >= t_end:
                break
            arrived = math.floor(start * rate + 1e-9) + 1
            queued = arrived - next_frame
            if queued > queue_cap:  # drop_oldest: the stream outran the device
                dropped += queued - queue_cap
                next_frame += queued - queue_cap
                queued = queue_cap
            n = min(size, queued)
            first = next_frame
            next_frame += n
            # a batch's throughput: its items over the time since the previous batch began (as a meter would read)
            same = last_start is not None and last_start[1] == size and start > last_start[0]
            rate_now = n / (start - last_start[0]) if same else None  # a size change restarts the meter
            last_start = (start, size)
            if profile.fails(size):
                failed += n
                t_free = start + point.service_s
                obs.append(_observation(profile, size, point, n, None, failed=True))
                continue
            t_free = start + point.service_s
            done = start + point.d_batch_s
            items += n
            obs.append(_observation(profile, size, point, n, rate_now, failed=False))
            if start >= tail_from:
                result.tail_items += n
                mean_arrival = (first + (n - 1) / 2) / rate
                result.tail_latency_sum_s += n * (done - mean_arrival)
                result.tail_worst_latency_s = max(result.tail_worst_latency_s, done - first / rate)
        metered = [o.throughput for o in obs if o.throughput > 0]
        # a batch right after a size change has no meter reading yet: it gets the window's mean
        fill = sum(metered) / len(metered) if metered else items / settings.window_s
        window = [replace(o, throughput=o.throughput if o.throughput > 0 or o.failed else fill,
                          timestamp=w * settings.window_s) for o in obs]
        decision, state = decide(window, replace(state, current=size), config)
        result.windows.append(WindowRecord(w, size, items, dropped, failed, decision.action, str(decision.code)))
        size = decision.batch_size
    result.tail_seconds = settings.tail_windows * settings.window_s
    return result


def _observation(profile: DeviceProfile, size: int, point: SizePoint, n: int, rate: float | None, *,
                 failed: bool) -> Observation:
    mem = point.mem_bytes
    return Observation(
        batch_size=size, d_batch_s=point.d_batch_s, fps=profile.rate, throughput=0.0 if failed else (rate or 0.0),
        mem_used_bytes=mem if profile.mem_total_bytes else None, mem_total_bytes=profile.mem_total_bytes,
        failed=failed, formed_batch_size=float(n), variant_items=((size, n),),
    )


# ---------------------------------------------------------------------------- the comparison


@dataclass(frozen=True)
class PolicyRow:
    """One line of the comparison table: a policy (or a static size) against the best static size."""

    policy: str
    settled_size: int | None
    settle_window: int
    probes: int
    images_per_s: float
    ratio_to_best_static: float
    margin_ms: float | None  # N/F - d_batch at the settled size (positive: keeps up)
    mean_latency_ms: float | None  # None: nothing was served
    dropped_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Comparison:
    profile: DeviceProfile
    statics: list[PolicyRow]
    policies: list[PolicyRow]
    best_static: PolicyRow
    settings: SimulationSettings


def _row(name: str, run: RunResult, profile: DeviceProfile, best: float, settings: SimulationSettings) -> PolicyRow:
    size, last_change = run.settled(settings.tail_windows)
    tail = run.windows[-settings.tail_windows:]
    margin = None
    if size is not None and not profile.fails(size):
        margin = round((size / profile.rate - profile.point(size).d_batch_s) * 1000, 2)
    return PolicyRow(
        policy=name, settled_size=size, settle_window=last_change, probes=run.probes(last_change + 1),
        images_per_s=round(run.throughput, 2), ratio_to_best_static=round(run.throughput / best, 4) if best else 0.0,
        margin_ms=margin, mean_latency_ms=round(run.mean_latency_s * 1000, 2) if run.tail_items else None,
        dropped_per_s=round(sum(w.dropped for w in tail) / (len(tail) * settings.window_s), 2),
    )


def compare(profile: DeviceProfile, policies: list[str] | None = None,
            settings: SimulationSettings = SimulationSettings(), config: PolicyConfig | None = None) -> Comparison:
    """Every static size and every adaptive policy on one profile, the same simulated stream for all."""
    config = config or PolicyConfig(allowed_sizes=profile.sizes)
    names = policies or [p for p in POLICIES if p != "fixed"]
    static_runs = {n: simulate(profile, "fixed", replace(config, start_size=n), settings) for n in profile.sizes}
    top = max(r.throughput for r in static_runs.values())
    best_n = min(n for n, r in static_runs.items() if r.throughput >= top * (1 - TIE_TOLERANCE))
    best = static_runs[best_n].throughput
    statics = [_row(f"static {n}", r, profile, best, settings) for n, r in static_runs.items()]
    rows = [_row(name, simulate(profile, name, config, settings), profile, best, settings) for name in names]
    return Comparison(profile, statics, rows, next(r for r in statics if r.policy == f"static {best_n}"), settings)
