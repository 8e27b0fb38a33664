"""The arrival stamp Serve's proxy adds for the gateway (deployments/proxy_stamp.py), without Ray;
tests/test_reliability.py shows it loaded by the real proxy."""

from __future__ import annotations

import asyncio

import pytest

from deployments.proxy_stamp import ARRIVED_HEADER, ArrivalStamp, arrival_wait_s, middlewares


def _through_stamp(headers: list[tuple[bytes, bytes]], scope_type: str = "http") -> list[tuple[bytes, bytes]]:
    seen: dict = {}

    async def app(scope, receive, send):
        seen.update(scope)

    stamp = ArrivalStamp(app)
    stamp._node = "node-a"  # the proxy's Ray node id
    asyncio.run(stamp({"type": scope_type, "headers": headers}, None, None))
    return seen["headers"]


def test_the_proxy_stamps_each_request_and_drops_a_clients_own_stamp():
    headers = _through_stamp([(b"content-type", b"image/jpeg"), (b"X-Edgebatch-Arrived", b"1.0@node-a")])
    stamps = [v.decode() for k, v in headers if k.lower() == ARRIVED_HEADER.encode()]
    assert len(stamps) == 1 and stamps[0].endswith("@node-a") and stamps[0] != "1.0@node-a"
    assert (b"content-type", b"image/jpeg") in headers
    assert _through_stamp([], scope_type="websocket") == []  # only HTTP requests are stamped


def test_serve_gets_a_list_of_starlette_middlewares():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert [m.cls for m in validate_http_proxy_callback_return(middlewares())] == [ArrivalStamp]


@pytest.mark.parametrize("raw,expected", [
    ("9.5@node-a", 0.5),  # stamped half a second ago on this node
    ("5.0@node-a", 1.0),  # waited longer than its budget: all of it is gone
    ("10.5@node-a", 0.0),  # a stamp from the future (forged): never lengthens a budget
    ("9.5@node-b", 0.0),  # another node's monotonic clock means nothing here
    ("9.5", 0.0), ("soon@node-a", 0.0), ("nan@node-a", 0.0), ("", 0.0), (None, 0.0),
])
def test_the_wait_in_the_proxy_is_trusted_only_from_this_node_and_never_past_the_budget(raw, expected):
    assert arrival_wait_s(raw, here="node-a", now=10.0, budget_s=1.0) == pytest.approx(expected)
    assert arrival_wait_s(raw, here="", now=10.0, budget_s=1.0) == 0.0  # outside Ray nothing is trusted
