"""Deadlines and load shedding: overload is answered, not queued (issue 15).

Every request carries a time budget: the client's (``X-Request-Timeout`` in seconds, or the Open
Inference Protocol's ``timeout`` parameter in microseconds, as ``tritonclient`` sends it), capped
by ``max_deadline_s``, else the detector's ``deadline_s``. The replica admits an item only if the
items queued ahead of it, drained at the rate the replica has measured, leave time for its own
batch before the budget runs out; otherwise ``Overloaded`` (503 + ``Retry-After``) at once. So the
queue is bounded by what the measured throughput serves within the deadline, never by a fixed
count, and an item whose budget still runs out in the queue is refused before it is decoded.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from app.errors import BadRequest, Overloaded

#: headers a client may give its time budget in, in seconds (first found wins)
DEADLINE_HEADERS = ("x-request-timeout", "request-timeout")
#: before any batch was measured, this many items may wait per batch the replica runs at once
COLD_ITEMS_PER_BATCH = 4


def request_budget_s(headers: Mapping[str, str], parameters: Mapping[str, Any] | None, *, default_s: float,
                     max_s: float) -> float:
    """The request's time budget in seconds; a malformed value is a 400 naming where it came from."""
    for name in DEADLINE_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"header {name} must be a number of seconds, got {raw!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise BadRequest(f"header {name} must be > 0 seconds, got {raw!r}")
        return min(value, max_s)
    timeout = (parameters or {}).get("timeout")
    if timeout is not None:  # OIP v2 / Triton: microseconds
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise BadRequest(f"parameters.timeout must be a positive number of microseconds, got {timeout!r}")
        return min(float(timeout) / 1e6, max_s)
    return default_s


@dataclass(frozen=True)
class QueueState:
    """What the replica knows when an item arrives; named in every refusal."""

    waiting: int  # items in this replica that are not in a running batch yet
    capacity_items_s: float | None  # items/s this replica drains (None: nothing measured yet)
    d_batch_s: float | None  # how long one of its batches takes
    max_batch_size: int
    concurrent_batches: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("capacity_items_s", "d_batch_s"):
            d[k] = None if d[k] is None else round(d[k], 4)
        return d

    def expected_wait_s(self) -> float | None:
        """Until an item that arrives now is done: the queue ahead drained at capacity, then its batch."""
        if not self.capacity_items_s or self.d_batch_s is None:
            return None
        return self.waiting / self.capacity_items_s + self.d_batch_s


def admit(state: QueueState, budget_s: float) -> None:
    """Raise ``Overloaded`` when an item with ``budget_s`` cannot be done in time."""
    wait = state.expected_wait_s()
    if wait is None:  # cold: a bounded queue until the first batches say how fast this replica is
        bound = COLD_ITEMS_PER_BATCH * state.max_batch_size * state.concurrent_batches
        if state.waiting >= bound:
            raise Overloaded(f"overloaded: {state.waiting} items already wait and this replica has not measured its "
                             f"throughput yet (at most {bound} may wait until it has); retry shortly",
                             retry_after_s=1.0, queue=state.to_dict())
        return
    if wait <= budget_s:
        return
    assert state.capacity_items_s  # expected_wait_s is None otherwise
    fits = max(0, int((budget_s - (state.d_batch_s or 0.0)) * state.capacity_items_s))
    drain_s = (state.waiting - fits) / state.capacity_items_s
    raise Overloaded(f"overloaded: {state.waiting} items wait ahead, served at {state.capacity_items_s:.1f} items/s "
                     f"this would take {wait:.2f} s, over the request's {budget_s:.2f} s deadline; retry after "
                     "Retry-After seconds or give a longer X-Request-Timeout", retry_after_s=drain_s,
                     queue=state.to_dict())


class RefusedClients:
    """The clients refused lately, as a queue they wait in on their own side: each refusal's
    ``Retry-After`` is the time the ones refused before it take to be served at the measured rate.

    A fixed Retry-After brings every refused client back at once: at 200 clients they came back
    faster than the HTTP hops could refuse them, and refusals took most of a second. With tickets
    the returns spread out and refusals settle near the service rate, whatever the number of clients.
    """

    def __init__(self, max_wait_s: float = 30.0) -> None:
        self.max_wait_s = max_wait_s
        self.backlog = 0.0  # refused clients not yet due back (the queue ahead of the next one refused)
        self._at: float | None = None

    def ticket(self, capacity_items_s: float | None, now: float) -> float:
        """Seconds the client refused at ``now`` should wait (monotonic seconds in, at least 1 s out)."""
        rate = capacity_items_s if capacity_items_s and capacity_items_s > 0 else 1.0
        if self._at is not None:
            self.backlog = max(0.0, self.backlog - rate * max(0.0, now - self._at))
        self._at = now
        self.backlog = min(self.backlog + 1.0, rate * self.max_wait_s)
        return max(1.0, self.backlog / rate)


class ServiceRate:
    """Items/s the replica drains, smoothed (EWMA). While items wait behind a batch, the gap between
    batch completions is the true drain rate (every stage overlapped as it really runs); when
    nothing waits, items / d_batch times the batches run at once stands in for it."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.capacity_items_s: float | None = None
        self.d_batch_s: float | None = None
        self.d_batch_dev_s = 0.0
        self._last_done: float | None = None

    def observe(self, items: int, d_batch_s: float, *, concurrent: int, now: float, backlog: int) -> None:
        """One batch of ``items`` finished at ``now`` (monotonic seconds) with ``backlog`` items still waiting."""
        if items <= 0 or d_batch_s <= 0:
            return
        last, self._last_done = self._last_done, now
        if backlog > 0 and last is not None and now > last:
            rate = items / (now - last)
        else:
            rate = items / d_batch_s * max(1, concurrent)
        a = self.alpha
        self.capacity_items_s = rate if self.capacity_items_s is None else (1 - a) * self.capacity_items_s + a * rate
        if self.d_batch_s is None:
            self.d_batch_s, self.d_batch_dev_s = d_batch_s, d_batch_s / 2
        else:
            self.d_batch_dev_s = 0.75 * self.d_batch_dev_s + 0.25 * abs(d_batch_s - self.d_batch_s)
            self.d_batch_s = (1 - a) * self.d_batch_s + a * d_batch_s

    def batch_time_s(self) -> float | None:
        """How long a batch may take here, bounded as TCP bounds a round trip (mean plus four mean
        deviations): an item with less than this left would likely be answered late. Batches vary most
        when engine instances share the cores with the HTTP hops; the mean alone let late items run."""
        return None if self.d_batch_s is None else self.d_batch_s + 4 * self.d_batch_dev_s



class BusyRate:
    """Items/s completed while the caller kept the service full, measured where the caller stands.

    The detector's own rate counts only its batches; under overload the hops in front of it share
    the same cores and the end-to-end rate is lower (about half at 200 clients on 2 cores). A window
    counts when at least ``full_at`` items were outstanding on average over it (the service was
    saturated, so completions/s is its capacity, not the offered load); stale after ``stale_s``.
    """

    def __init__(self, window_s: float = 1.0, alpha: float = 0.3, stale_s: float = 10.0) -> None:
        self.window_s, self.alpha, self.stale_s = window_s, alpha, stale_s
        self.value: float | None = None
        self._measured_at = -1e9
        self._start: float | None = None
        self._done = 0
        self._area = 0.0  # outstanding x seconds over the window
        self._last = 0.0
        self._outstanding = 0

    def _advance(self, now: float) -> None:
        if self._start is None:
            self._start, self._last = now, now
        self._area += self._outstanding * max(0.0, now - self._last)
        self._last = now

    def change(self, outstanding: int, now: float, *, completed: int = 0, full_at: int = 1) -> None:
        """The outstanding count becomes ``outstanding`` at ``now``; ``completed`` items finished then."""
        self._advance(now)
        self._outstanding = outstanding
        self._done += completed
        span = now - self._start if self._start is not None else 0.0
        if span < self.window_s:
            return
        if self._area / span >= full_at and self._done > 0:
            rate = self._done / span
            self.value = rate if self.value is None or now - self._measured_at > self.stale_s \
                else (1 - self.alpha) * self.value + self.alpha * rate
            self._measured_at = now
        self._start, self._done, self._area = now, 0, 0.0

    def current(self, now: float) -> float | None:
        """The measured rate, or None when nothing saturated was measured in the last ``stale_s``."""
        return self.value if self.value is not None and now - self._measured_at <= self.stale_s else None


class ServedRate:
    """Items/s answered with a result lately, idle and refusing windows counted as the zeros they are.

    Refused clients are spread at this rate (``RefusedClients``). The saturated rate (``BusyRate``)
    is unknown when nothing is kept full, and the detector's own batch rate is faster than the HTTP
    path in front of it carries under overload: tickets at that rate brought 200 refused clients back
    faster than Serve's proxy could take them, and goodput fell to nothing (docs/reliability.md).
    At the rate really served, a path that serves nothing sends clients away for long, and it drains.
    """

    def __init__(self, window_s: float = 1.0, alpha: float = 0.3) -> None:
        self.window_s, self.alpha = window_s, alpha
        self.value: float | None = None
        self._start: float | None = None
        self._done = 0

    def _roll(self, now: float) -> None:
        if self._start is None:
            self._start = now
            return
        span = now - self._start
        if span >= self.window_s:
            rate = self._done / span
            self.value = rate if self.value is None else (1 - self.alpha) * self.value + self.alpha * rate
            self._start, self._done = now, 0

    def served(self, now: float, items: int = 1) -> None:
        self._roll(now)
        self._done += items

    def current(self, now: float) -> float | None:
        """The smoothed rate, or None before the first window closed."""
        self._roll(now)
        return self.value


class HopReserve:
    """The time a served item spends outside the detector's own stages (the hops to and from it, the
    reply's serialisation, the event loop it waits on), as Jacobson's estimator for TCP's retransmit
    timer: a smoothed mean plus four mean deviations. The gateway keeps that much of every budget
    for the way back: admission and the detector's deadline use the rest."""

    def __init__(self, alpha: float = 0.125, beta: float = 0.25, cap_s: float = 5.0) -> None:
        self.alpha, self.beta, self.cap_s = alpha, beta, cap_s
        self.mean_s: float | None = None
        self.dev_s = 0.0

    def observe(self, outside_s: float) -> None:
        x = min(max(0.0, outside_s), self.cap_s)
        if self.mean_s is None:
            self.mean_s, self.dev_s = x, x / 2
            return
        self.dev_s = (1 - self.beta) * self.dev_s + self.beta * abs(x - self.mean_s)
        self.mean_s = (1 - self.alpha) * self.mean_s + self.alpha * x

    def reserve_s(self, budget_s: float) -> float:
        """What to keep back from ``budget_s`` (never more than half of it: the rest must stay usable)."""
        if self.mean_s is None:
            return 0.0
        return min(self.mean_s + 4 * self.dev_s, budget_s / 2)


class LoopLag:
    """How late the gateway's event loop runs a ready callback, from a periodic probe (Jacobson's
    estimator, as for the hops). A reply waits on that loop twice where the gateway's own clock does not
    see it: before its handler starts and while it is written. The gateway keeps that much of a budget
    back, so what the client measures, not only what the gateway measures, stays within the deadline."""

    PROBE_S = 0.05  # how often the probe wakes: often enough to follow load, cheap (20 wake-ups a second)

    def __init__(self) -> None:
        self._estimate = HopReserve()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the probe on the running loop (once; again if it ever ended)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            asked = loop.time()
            await asyncio.sleep(self.PROBE_S)
            self.observe(loop.time() - asked - self.PROBE_S)

    def observe(self, late_s: float) -> None:
        self._estimate.observe(late_s)

    def reserve_s(self, budget_s: float) -> float:
        """Twice the bound on one wait (before the handler, and the write), at most a quarter of the budget."""
        return min(2 * self._estimate.reserve_s(budget_s), budget_s / 4)
