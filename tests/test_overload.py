"""Deadlines and load shedding in the core (no Ray): parsing budgets, admission, the drain rate."""

from __future__ import annotations

import pytest

from app.errors import BadRequest, Overloaded
from app.overload import QueueState, ServiceRate, admit, request_budget_s


def test_the_budget_comes_from_the_header_then_the_v2_timeout_then_the_default():
    assert request_budget_s({"x-request-timeout": "0.5"}, None, default_s=3, max_s=30) == 0.5
    assert request_budget_s({"request-timeout": "2"}, None, default_s=3, max_s=30) == 2.0
    assert request_budget_s({}, {"timeout": 250_000}, default_s=3, max_s=30) == 0.25  # tritonclient: microseconds
    assert request_budget_s({}, {}, default_s=3, max_s=30) == 3
    assert request_budget_s({"x-request-timeout": "3600"}, None, default_s=3, max_s=30) == 30  # capped


@pytest.mark.parametrize("headers,params,named", [
    ({"x-request-timeout": "soon"}, None, "x-request-timeout"),
    ({"x-request-timeout": "-1"}, None, "x-request-timeout"),
    ({"x-request-timeout": "nan"}, None, "x-request-timeout"),
    ({}, {"timeout": "1s"}, "parameters.timeout"),
    ({}, {"timeout": True}, "parameters.timeout"),
    ({}, {"timeout": 0}, "parameters.timeout"),
])
def test_a_malformed_budget_is_a_400_naming_where_it_came_from(headers, params, named):
    with pytest.raises(BadRequest, match=named.replace(".", r"\.")):
        request_budget_s(headers, params, default_s=3, max_s=30)


def state(waiting, capacity=100.0, d_batch=0.08):
    return QueueState(waiting=waiting, capacity_items_s=capacity, d_batch_s=d_batch, max_batch_size=8,
                      concurrent_batches=2)


def test_admission_refuses_what_the_measured_rate_cannot_serve_in_time():
    admit(state(200), budget_s=3.0)  # 2 s of queue + 0.08 s: fits
    with pytest.raises(Overloaded) as refused:
        admit(state(400), budget_s=3.0)  # 4.08 s > 3 s
    err = refused.value
    assert err.status == 503 and err.headers["Retry-After"] == str(err.retry_after_s)
    assert err.queue["waiting"] == 400 and err.queue["capacity_items_s"] == 100.0
    assert 1 <= err.retry_after_s <= 2  # 400 - (3 - 0.08) * 100 = 108 items over: ~1.1 s to drain
    body = err.to_json()
    assert "400 items wait" in body["error"] and body["queue"]["max_batch_size"] == 8


def test_admission_is_bounded_before_anything_was_measured():
    cold = QueueState(waiting=0, capacity_items_s=None, d_batch_s=None, max_batch_size=8, concurrent_batches=2)
    admit(cold, budget_s=0.01)
    full = QueueState(waiting=64, capacity_items_s=None, d_batch_s=None, max_batch_size=8, concurrent_batches=2)
    with pytest.raises(Overloaded, match="not measured its throughput yet"):
        admit(full, budget_s=30)


def test_the_drain_rate_is_the_gap_between_batches_while_items_wait():
    rate = ServiceRate(alpha=1.0)
    rate.observe(8, 0.2, concurrent=1, now=10.0, backlog=0)
    assert rate.capacity_items_s == pytest.approx(40.0)  # idle: items / d_batch
    rate.observe(8, 0.2, concurrent=1, now=10.1, backlog=30)  # two batches overlapped: one done every 0.1 s
    assert rate.capacity_items_s == pytest.approx(80.0)
    rate.observe(0, 0.0, concurrent=1, now=10.2, backlog=30)  # nothing ran: ignored
    assert rate.capacity_items_s == pytest.approx(80.0)
