"""Application metrics of one detector replica over a sliding time window (no Ray here).

The Adaptive Batch Controller decides on what the pipeline itself measured: the
per-stage delays, the batch delay ``d_batch`` (pre-processing + inference +
post-processing of a batch), the batch sizes the batcher actually formed, the
queue in front of the batcher and the real-time margin ``N / F - d_batch``.

Pre- and post-processing run per request in a CPU pool, concurrently with the
engine, so they are recorded per item (``record_item``) and a batch's pre/post
delays are the recent per-item means (``recent_item_stages``). The recorder is
a plain object owned by the replica; the replica exports it through Ray's
metrics and answers ``stats()`` with ``snapshot``.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

STAGES = ("queue", "pre", "infer", "post")


@dataclass(frozen=True)
class BatchRecord:
    """One formed batch: how many items, on which variant, and what each stage took."""

    at: float
    batch_size: int
    variant_batch_size: int
    queue_s: float
    pre_s: float
    infer_s: float
    post_s: float
    queue_len: int

    @property
    def d_batch_s(self) -> float:
        """The whole time a batch spends in the pipeline (the paper's d_batch)."""
        return self.pre_s + self.infer_s + self.post_s


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def _p99(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, math.ceil(0.99 * len(ordered)) - 1)  # nearest-rank percentile
    return ordered[rank]


class AppMetrics:
    """Windowed recorder of batches, per-item stage times and drops; thread-safe."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic, max_records: int = 20000) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._batches: deque[BatchRecord] = deque(maxlen=max_records)
        self._items: deque[tuple[float, float, float]] = deque(maxlen=max_records)  # (at, pre_s, post_s)
        self._drops: deque[tuple[float, str]] = deque(maxlen=max_records)
        self._drops_total: dict[str, int] = {}
        self._lock = threading.Lock()

    # -- recording -------------------------------------------------------
    def record_batch(
        self,
        batch_size: int,
        variant_batch_size: int,
        queue_s: float,
        pre_s: float,
        infer_s: float,
        post_s: float,
        queue_len: int,
    ) -> BatchRecord:
        rec = BatchRecord(
            self._clock(), int(batch_size), int(variant_batch_size), max(queue_s, 0.0), max(pre_s, 0.0),
            max(infer_s, 0.0), max(post_s, 0.0), max(int(queue_len), 0),
        )
        with self._lock:
            self._batches.append(rec)
        return rec

    def record_item(self, pre_s: float, post_s: float) -> None:
        """Per-request pre- and post-processing times (they run outside the batch, in the CPU pool)."""
        with self._lock:
            self._items.append((self._clock(), max(pre_s, 0.0), max(post_s, 0.0)))

    def record_drop(self, reason: str) -> None:
        with self._lock:
            self._drops.append((self._clock(), reason))
            self._drops_total[reason] = self._drops_total.get(reason, 0) + 1

    def recent_item_stages(self, last: int = 64) -> tuple[float, float]:
        """Mean (pre_s, post_s) of the last ``last`` items: a batch's pre/post delay estimate."""
        with self._lock:  # the newest ``last`` only: this runs on every batch, under record_item's lock
            items = list(itertools.islice(reversed(self._items), last))
        return _mean([i[1] for i in items]), _mean([i[2] for i in items])

    # -- reading ---------------------------------------------------------
    def snapshot(self, stream_fps: float | None = None, since: float | None = None) -> dict[str, Any]:
        """Window figures; ``since`` (this recorder's clock) cuts the window at a batch-size change.

        ``stream_fps`` is the stream rate F of the real-time criterion. Without it there is no
        margin: the arrival rate is what got through (after drops upstream), never the target,
        so a margin against it would look healthy for a stream that is losing frames.
        """
        now = self._clock()
        start = max(now - self.window_s, self._started)
        cut = since is not None and since >= start  # a batch at the change itself ran before it

        def inside(at: float) -> bool:
            return at > since if cut else at >= start

        if cut:
            start = since
        with self._lock:
            batches = [b for b in self._batches if inside(b.at)]
            items = [i for i in self._items if inside(i[0])]
            drops = [d for d in self._drops if inside(d[0])]
            drops_total = dict(self._drops_total)
        span = max(now - start, 1e-9)
        n_items = sum(b.batch_size for b in batches)
        throughput = n_items / span
        arrival_fps = (n_items + len(drops)) / span
        fps = stream_fps if stream_fps and stream_fps > 0 else None
        pre = [i[1] for i in items] or [b.pre_s for b in batches]
        post = [i[2] for i in items] or [b.post_s for b in batches]
        per_stage = {
            "queue": [b.queue_s for b in batches],
            "pre": pre,
            "infer": [b.infer_s for b in batches],
            "post": post,
        }
        stages = {k: {"mean_s": _mean(v), "p99_s": _p99(v)} for k, v in per_stage.items()}
        d_batch = [b.d_batch_s for b in batches]
        d_batch_mean = _mean(d_batch)
        mean_n = n_items / len(batches) if batches else 0.0
        sizes: dict[int, int] = {}
        variants: dict[int, int] = {}
        variant_items: dict[int, int] = {}  # items each variant served: a size's throughput is its variant's
        for b in batches:
            sizes[b.batch_size] = sizes.get(b.batch_size, 0) + 1
            variants[b.variant_batch_size] = variants.get(b.variant_batch_size, 0) + 1
            variant_items[b.variant_batch_size] = variant_items.get(b.variant_batch_size, 0) + b.batch_size
        drop_reasons: dict[str, int] = {}
        for _, reason in drops:
            drop_reasons[reason] = drop_reasons.get(reason, 0) + 1
        return {
            "window_s": round(span, 3),
            "batches": len(batches),
            "items": n_items,
            "throughput": throughput,
            "arrival_fps": arrival_fps,
            "stream_fps": fps,
            "stages": stages,
            "d_batch_s": d_batch_mean,
            "d_batch_p99_s": _p99(d_batch),
            "d_batch_max_s": max(d_batch, default=0.0),
            "mean_batch_size": mean_n,
            "batch_sizes": dict(sorted(sizes.items())),
            "variant_batch_sizes": dict(sorted(variants.items())),
            "variant_items": dict(sorted(variant_items.items())),
            "queue_len_mean": _mean([b.queue_len for b in batches]),
            "queue_len_max": max((b.queue_len for b in batches), default=0),
            "margin_s": margin_s(mean_n, fps, d_batch_mean) if batches and fps else None,
            "drops": drop_reasons,
            "drops_total": drops_total,
            "clock": now,
        }

    def now(self) -> float:
        return self._clock()


def margin_s(batch_size: float, fps: float, d_batch_s: float) -> float:
    """Real-time margin N / F - d_batch: the time to spare before the queue starts to grow."""
    if fps <= 0:
        return -math.inf
    return batch_size / fps - d_batch_s
