"""The detector's windowed application metrics: stages, d_batch, margin, drops, throughput (no Ray)."""

from __future__ import annotations

import math

import pytest

from app.monitoring.appmetrics import AppMetrics, margin_s


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def test_margin_is_n_over_f_minus_d_batch():
    assert margin_s(8, 30.0, 0.2) == pytest.approx(8 / 30 - 0.2)
    assert margin_s(1, 30.0, 0.05) < 0  # one frame every 33 ms, 50 ms per batch: falls behind
    assert margin_s(4, 0.0, 0.01) == -math.inf


def test_snapshot_stages_d_batch_margin_and_throughput():
    clock = FakeClock()
    m = AppMetrics(window_s=10.0, clock=clock)
    for _ in range(4):
        m.record_item(pre_s=0.010, post_s=0.002)
    clock.advance(1.0)
    for infer in (0.040, 0.060):
        m.record_batch(4, 4, queue_s=0.005, pre_s=0.010, infer_s=infer, post_s=0.002, queue_len=3)
    clock.advance(1.0)
    snap = m.snapshot(stream_fps=30.0)
    assert snap["batches"] == 2 and snap["items"] == 8
    assert snap["window_s"] == pytest.approx(2.0)
    assert snap["throughput"] == pytest.approx(8 / 2.0)
    assert snap["stages"]["infer"]["mean_s"] == pytest.approx(0.050)
    assert snap["stages"]["infer"]["p99_s"] == pytest.approx(0.060)
    assert snap["stages"]["pre"]["mean_s"] == pytest.approx(0.010)
    assert snap["d_batch_s"] == pytest.approx(0.010 + 0.050 + 0.002)
    assert snap["d_batch_max_s"] == pytest.approx(0.072)
    assert snap["margin_s"] == pytest.approx(4 / 30.0 - 0.062)
    assert snap["batch_sizes"] == {4: 2} and snap["variant_batch_sizes"] == {4: 2}
    assert snap["mean_batch_size"] == 4 and snap["variant_items"] == {4: 8}
    assert snap["queue_len_max"] == 3 and snap["queue_len_mean"] == 3


def test_window_forgets_old_batches_and_since_cuts_at_a_change():
    clock = FakeClock()
    m = AppMetrics(window_s=5.0, clock=clock)
    m.record_batch(1, 1, 0.0, 0.0, 0.5, 0.0, 0)
    clock.advance(6.0)  # beyond the window
    m.record_batch(2, 2, 0.0, 0.0, 0.1, 0.0, 0)
    snap = m.snapshot(stream_fps=10.0)
    assert snap["batch_sizes"] == {2: 1} and snap["d_batch_s"] == pytest.approx(0.1)
    changed_at = m.now()
    clock.advance(0.5)
    m.record_batch(8, 8, 0.0, 0.0, 0.3, 0.0, 0)
    clock.advance(0.5)
    after = m.snapshot(stream_fps=10.0, since=changed_at)
    assert after["batch_sizes"] == {8: 1}
    assert after["throughput"] == pytest.approx(8 / 1.0)


def test_drops_by_reason_and_arrival_rate_without_stream_fps():
    clock = FakeClock()
    m = AppMetrics(window_s=10.0, clock=clock)
    m.record_batch(2, 2, 0.0, 0.0, 0.01, 0.0, 0)
    m.record_drop("BadRequest")
    m.record_drop("BadRequest")
    m.record_drop("Unavailable")
    clock.advance(1.0)
    snap = m.snapshot()
    assert snap["drops"] == {"BadRequest": 2, "Unavailable": 1}
    assert snap["drops_total"] == {"BadRequest": 2, "Unavailable": 1}
    assert snap["arrival_fps"] == pytest.approx(5.0)  # 2 served + 3 dropped in 1 s
    # what got in is no target: without a stream rate F there is no real-time margin to report
    assert snap["stream_fps"] is None and snap["margin_s"] is None


def test_empty_window_has_no_margin_and_zero_throughput():
    m = AppMetrics(window_s=1.0, clock=FakeClock())
    snap = m.snapshot(stream_fps=30.0)
    assert snap["batches"] == 0 and snap["throughput"] == 0.0 and snap["margin_s"] is None
    with pytest.raises(ValueError):
        AppMetrics(window_s=0)
