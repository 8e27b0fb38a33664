"""Serve's HTTP proxy stamps each request's arrival, so the gateway can count the proxy's wait.

Through Serve's proxy a request waits where the gateway's clock cannot see it: in the proxy's
router and in the hand-off to the gateway replica. Under 200 clients on two cores that wait took
the p99 seen by clients over the deadline (docs/reliability.md). Serve loads these middlewares into
every proxy from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (set in ``ray start``'s environment:
``PROXY_ENV``); the gateway starts a request's budget at the stamp (``arrival_wait_s``).

The stamp is this host's monotonic clock plus the node's id: it is trusted only on the node that
made it (the gateway is pinned beside the head's proxy), so clocks of other hosts never matter. A
client's own header of that name is dropped; one sent around the proxy (direct ingress) can only
shorten the sender's own budget, since the gateway never starts a budget later than its handler.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.middleware import Middleware

ARRIVED_HEADER = "x-edgebatch-arrived"
_ARRIVED = ARRIVED_HEADER.encode()
#: what `ray start` must export for Serve's proxies to load the stamp
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "deployments.proxy_stamp:middlewares"}


def node_id() -> str:
    """This process's Ray node id ('' outside Ray: then no stamp is ever trusted)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:
        return ""


class ArrivalStamp:
    """Pure ASGI middleware (no body buffering): one header added to each HTTP request's scope."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._node = ""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http":
            if not self._node:
                self._node = node_id()
            stamp = f"{time.monotonic():.6f}@{self._node}".encode()
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != _ARRIVED]
            scope = {**scope, "headers": [*headers, (_ARRIVED, stamp)]}
        await self.app(scope, receive, send)


def middlewares() -> list[Middleware]:
    """What Serve's proxy calls (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``)."""
    return [Middleware(ArrivalStamp)]


def arrival_wait_s(raw: str | None, *, here: str, now: float, budget_s: float) -> float:
    """Seconds since the proxy on this node (``here``) stamped ``raw``, in [0, budget_s]; 0 when there
    is no stamp, it is malformed, or another node made it."""
    if not raw or not here:
        return 0.0
    at, _, node = raw.partition("@")
    if node != here:
        return 0.0
    try:
        waited = now - float(at)
    except ValueError:
        return 0.0
    return min(max(waited, 0.0), budget_s) if waited == waited else 0.0
