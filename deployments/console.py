"""The operator's console, served by the ``edgebatch`` app itself at ``/ui``: static pages from the
package (``app/console/static``) and three small JSON reads the pages poll (nodes, placements,
detectors). Streams, the controller and the registry are read and changed through their own
endpoints (``/v1/streams``, ``/v1/batch``, ``/v1/registry``), exactly as any other client does.

This module only fetches (Ray's node table, the collectors, Serve's details, the detectors'
reports by handle); ``app/console/views.py`` shapes the answers. Each read is shared for
``CONSOLE_READ_TTL_S`` by every open console, so ten browser tabs cost the replica one read.
"""

# no `from __future__ import annotations`: FastAPI must see real types on the routes

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from ray import serve

import app.console
from app.console.views import detector_view, node_views, placement_views
from app.constants import CONTROLLER_APP, CONTROLLER_DEPLOYMENT, DETECTOR_DEPLOYMENT
from app.errors import NotFound, Unavailable, one_line
from deployments.controller import POLICY_CHOICES

STATIC = Path(app.console.__file__).with_name("static")
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".js": "text/javascript; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png",
                 ".txt": "text/plain; charset=utf-8"}
# Same-origin only, no inline script or style: data put into the page can never run as code.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
CONSOLE_READ_TTL_S = 1.0

router = APIRouter()


def static_files() -> dict[str, tuple[bytes, str]]:
    """The console's files by name, read once: the only paths ``/ui/{name}`` can answer."""
    return {p.name: (p.read_bytes(), CONTENT_TYPES[p.suffix]) for p in sorted(STATIC.iterdir())
            if p.is_file() and p.suffix in CONTENT_TYPES}


class SharedReads:
    """The last answer of each read for ``ttl_s``; callers arriving meanwhile await the same one."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[float, asyncio.Task]] = {}

    async def get(self, key: str, read: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        entry = self._entries.get(key)
        stale = entry is None or now - entry[0] > self.ttl_s or (entry[1].done() and (entry[1].cancelled() or entry[1].exception()))
        if stale:
            entry = (now, asyncio.ensure_future(read()))
            self._entries[key] = entry
        return await asyncio.shield(entry[1])


def _serve_details() -> dict[str, Any]:
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def _pending() -> dict[str, dict[str, str]]:
    from deployments.tenancy import pending_reasons

    return pending_reasons()


class ConsoleState:
    """What the console keeps in its host replica: its files, the shared reads, handles by deployment."""

    def __init__(self) -> None:
        self.files = static_files()
        self.reads = SharedReads(CONSOLE_READ_TTL_S)
        self.handles: dict[tuple[str, str], Any] = {}

    def handle(self, app_name: str, deployment: str) -> Any:
        key = (app_name, deployment)
        if key not in self.handles:
            self.handles[key] = serve.get_deployment_handle(deployment, app_name=app_name)
        return self.handles[key]


class ConsoleRoutes:
    """Mixed into the ``edgebatch`` app's HTTP gateway (``deployments/gateway.py``), which sets ``self._console``:
    the console's reads run there, not in a detector replica's process."""

    _console: ConsoleState

    # -- the pages ---------------------------------------------------------------
    @router.get("/ui", include_in_schema=False)
    @router.get("/ui/", include_in_schema=False)
    async def console_index(self) -> Response:
        return self._console_file("index.html")

    @router.get("/ui/{name}", include_in_schema=False)
    async def console_static(self, name: str) -> Response:
        return self._console_file(name)

    def _console_file(self, name: str) -> Response:
        found = self._console.files.get(name)
        if found is None:
            raise NotFound(f"the console has no file {name!r}; open /ui")
        return Response(content=found[0], media_type=found[1], headers=SECURITY_HEADERS)

    # -- the reads the pages poll ----------------------------------------------------
    @router.get("/ui/api/nodes")
    async def console_nodes(self) -> dict:
        return await self._console.reads.get("nodes", self._read_nodes)

    @router.get("/ui/api/placements")
    async def console_placements(self) -> dict:
        return await self._console.reads.get("placements", self._read_placements)

    @router.get("/ui/api/detectors")
    async def console_detectors(self) -> dict:
        return await self._console.reads.get("detectors", self._read_detectors)

    async def _read_nodes(self) -> dict[str, Any]:
        import ray

        from deployments.collectors import latest_samples_async

        nodes = await asyncio.to_thread(ray.nodes)
        note = None
        try:
            samples = {k: v.to_dict() for k, v in (await latest_samples_async(timeout_s=3)).items()}
        except Unavailable as exc:
            samples, note = {}, exc.message
        return {"at": time.time(), "nodes": node_views(nodes, samples), "samples_note": note}

    async def _read_placements(self) -> dict[str, Any]:
        import ray

        details, nodes = await asyncio.gather(asyncio.to_thread(_serve_details), asyncio.to_thread(ray.nodes))
        try:
            pending, note = await asyncio.to_thread(_pending), None
        except Exception as exc:  # Ray's state API slow or busy: the placements still show
            pending, note = {}, one_line(exc)
        return {"at": time.time(), "deployments": placement_views(details, pending, nodes), "pending_note": note}

    async def _read_detectors(self) -> dict[str, Any]:
        status = await asyncio.to_thread(serve.status)
        running = {name: app for name, app in status.applications.items()
                   if str(getattr(app.status, "value", app.status)) == "RUNNING"}
        controls: dict[str, Any] = {}
        if CONTROLLER_APP in running:
            try:
                got = await asyncio.wait_for(self._console.handle(CONTROLLER_APP, CONTROLLER_DEPLOYMENT).status.remote(), 10)
                controls = got.get("detectors", {})
            except Exception as exc:  # the detectors still show, without the controller's side
                controls = {"__error__": one_line(exc)}
        controller_error = controls.pop("__error__", None)
        by_app = {c.get("app"): c for c in controls.values()}

        async def one(app_name: str) -> dict[str, Any]:
            handle = self._console.handle(app_name, DETECTOR_DEPLOYMENT)
            try:
                info, stats = await asyncio.wait_for(asyncio.gather(handle.info.remote(), handle.stats.remote()), 10)
            except Exception as exc:
                return {"app": app_name, "error": one_line(exc)}
            return detector_view(app_name, info.to_dict(), stats.to_dict(), by_app.get(app_name))

        apps = sorted(n for n, a in running.items() if DETECTOR_DEPLOYMENT in a.deployments)
        detectors = await asyncio.gather(*(one(a) for a in apps))
        return {"at": time.time(), "detectors": list(detectors), "policies": list(POLICY_CHOICES),
                "controller": CONTROLLER_APP in running, "controller_error": controller_error}
