"""Deadlines and load shedding in the core (no Ray): parsing budgets, admission, the drain rate."""

from __future__ import annotations

import time

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


def test_refused_clients_are_told_to_come_back_one_after_another():
    """Before: every refusal said Retry-After 1, so at 200 clients they all came back together, faster
    than the HTTP hops could refuse them (refusals took 0.9-2.7 s). Each refusal now waits for the ones
    refused before it to be served at the measured rate."""
    from app.overload import RefusedClients

    queue = RefusedClients(max_wait_s=30)
    waits = [queue.ticket(40.0, now=100.0) for _ in range(200)]  # 200 refused in one instant, 40 items/s
    assert waits[0] == 1.0 and waits[-1] == pytest.approx(5.0)  # the 200th waits 200 / 40 s
    assert waits == sorted(waits)
    assert queue.ticket(40.0, now=105.0) == 1.0  # 5 s later the queue of refused clients has drained
    assert RefusedClients(max_wait_s=3).ticket(None, now=0.0) == 1.0  # nothing measured: 1 item/s, at least 1 s
    capped = RefusedClients(max_wait_s=3)
    assert max(capped.ticket(1.0, now=0.0) for _ in range(50)) == 3.0
    from app.errors import Overloaded

    later = Overloaded("overloaded: x", retry_after_s=1.0, queue={"waiting": 3}).later(4.2)
    assert later.headers["Retry-After"] == "5" and later.queue == {"waiting": 3}


def test_the_gateway_keeps_back_what_the_hops_take():
    from app.overload import HopReserve

    hops = HopReserve()
    assert hops.reserve_s(1.0) == 0.0  # nothing served yet
    for x in [0.05] * 50:
        hops.observe(x)
    assert 0.05 <= hops.reserve_s(1.0) < 0.06  # steady hops: about their mean
    for x in [0.05, 0.25] * 20:
        hops.observe(x)
    assert hops.reserve_s(1.0) > 0.25  # jittery hops: mean plus four deviations
    assert hops.reserve_s(0.2) == 0.1  # never more than half the budget


def test_the_gateway_keeps_back_twice_what_its_event_loop_lags_and_measures_it_live():
    import asyncio

    from app.overload import LoopLag

    lag = LoopLag()
    assert lag.reserve_s(1.0) == 0.0
    for x in [0.02] * 50:
        lag.observe(x)
    assert 0.04 <= lag.reserve_s(1.0) < 0.05  # a reply waits on the loop before its handler and for its write
    assert lag.reserve_s(0.1) == 0.025  # never more than a quarter of the budget

    async def blocked_loop() -> float:
        live = LoopLag()
        live.start()
        await asyncio.sleep(0)  # the probe's first timer is armed
        time.sleep(0.3)  # a handler that holds the loop (the lag being measured, not synchronisation)
        while live.reserve_s(10.0) == 0.0:
            await asyncio.sleep(LoopLag.PROBE_S)
        return live.reserve_s(10.0)

    assert asyncio.run(blocked_loop()) >= 0.25


def test_the_gateway_rate_counts_only_windows_that_kept_the_service_full():
    from app.overload import BusyRate

    rate = BusyRate(window_s=1.0, alpha=1.0, stale_s=10.0)
    rate.change(1, now=0.0)  # one item at a time for 1 s: offered load, not capacity
    rate.change(0, now=1.0, completed=1, full_at=8)
    assert rate.current(1.0) is None
    rate.change(16, now=2.0, full_at=8)  # 16 outstanding for a second, 30 done in it
    rate.change(16, now=3.0, completed=30, full_at=8)
    assert rate.current(3.0) == pytest.approx(30.0)
    assert rate.current(14.0) is None  # stale: the load went away


def test_the_batch_time_an_item_must_have_left_covers_the_spread_of_batch_times():
    """Two engine instances sharing two cores with the HTTP hops make batch times vary: the mean alone
    let items start that then finished late, so the bound is the mean plus four mean deviations."""
    from app.overload import ServiceRate

    rate = ServiceRate()
    assert rate.batch_time_s() is None
    for k, d in enumerate([0.10, 0.30, 0.10, 0.30, 0.10, 0.30]):
        rate.observe(4, d, concurrent=2, now=float(k), backlog=0)
    assert rate.d_batch_s is not None and rate.batch_time_s() > rate.d_batch_s + 0.2
    steady = ServiceRate()
    for k in range(40):
        steady.observe(4, 0.2, concurrent=2, now=float(k), backlog=0)
    assert abs(steady.batch_time_s() - 0.2) < 0.01  # steady batches: the bound is the batch time itself


def test_refused_clients_are_spread_at_the_rate_really_served_so_a_path_serving_nothing_drains():
    """Before: with nothing kept full, tickets used the detector's own batch rate, faster than Serve's
    proxy carried under 200 clients; refused clients came back at once and goodput fell to nothing."""
    from app.overload import RefusedClients, ServedRate

    served = ServedRate(window_s=1.0, alpha=1.0)
    assert served.current(0.0) is None  # nothing measured: the caller falls back to the detector's rate
    for k in range(20):
        served.served(k * 0.05)  # 20 served in the first second
    assert served.current(1.0) == pytest.approx(20.0)
    assert served.current(3.0) == pytest.approx(0.0)  # two seconds with nothing served count as zeros
    tickets = RefusedClients(max_wait_s=30.0)
    waits = [tickets.ticket(served.current(3.0), 3.0) for _ in range(200)]
    assert waits[-1] == pytest.approx(30.0)  # nothing served: refused clients stay away as long as allowed
    busy = RefusedClients(max_wait_s=30.0)
    assert max(busy.ticket(20.0, 3.0) for _ in range(200)) == pytest.approx(10.0)  # 200 at 20/s: the last in 10 s
