"""What every edgebatch HTTP ingress does the same way: read a body under a limit, map errors to
replies, check the API token, and describe those replies in the OpenAPI document.

``install_error_handlers(api)`` is the one place exceptions become HTTP replies (mosec's style):
an ``EdgebatchError`` answers its own status with ``{"error": message}``; anything else is logged
with a request id and answers a JSON 500 naming that id. Routes raise; none catches.
"""

# no `from __future__ import annotations`: FastAPI must see real types (Request) where these are used

import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from app.errors import BadRequest, EdgebatchError, PayloadTooLarge
from app.security.auth import TokenCheck

log = logging.getLogger("ray.serve")

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ERROR_SCHEMA = {"type": "object", "required": ["error"],
                 "properties": {"error": {"type": "string", "description": "what is wrong and how to fix it"}}}


def as_edgebatch_error(exc: BaseException) -> EdgebatchError | None:
    """Our error, also from under Ray's ``RayTaskError`` wrapper (which keeps the class, not the fields)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, EdgebatchError):
        return cause
    return exc if isinstance(exc, EdgebatchError) else None


def error_response(exc: EdgebatchError) -> JSONResponse:
    """The JSON error body: the message names the problem."""
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=getattr(exc, "headers", None))


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routes that answer ``{"error": ...}`` with these statuses."""
    words = {400: "bad request, the message names the field", 401: "missing or wrong API bearer token",
             404: "unknown model, version or id", 413: "body over max_body_bytes (also after decompression)",
             429: "no capacity left; the message says how much is", 503: "still loading or a dependency is down"}
    return {s: {"description": words.get(s, "error"), "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
            for s in statuses}


def require_token_for_writes(check: TokenCheck) -> Callable[[Request], Any]:
    """A FastAPI dependency for a whole app: every state-changing method needs the API token
    (when one is configured), so a route added later is guarded without remembering to."""

    async def dependency(request: Request) -> None:
        if request.method not in SAFE_METHODS:
            check.require(request.headers, f"{request.method} {request.url.path}")

    return dependency


class CollectionPath:
    """ASGI middleware: an app's route prefix itself (``/v1/streams``) is routed as ``/v1/streams/`` instead
    of answering a 307 redirect, so ``POST /v1/streams`` works for clients that do not follow redirects."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("root_path") and scope.get("path") == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/", "raw_path": (scope["path"] + "/").encode()}
        await self.app(scope, receive, send)


class _InternalErrors:
    """ASGI middleware: an exception that is not ours becomes a logged JSON 500 with a request id
    (Starlette's own 500 handler would answer plain text and re-raise)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: dict) -> None:
            nonlocal started
            started = started or message.get("type") == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            ours = as_edgebatch_error(exc)
            if ours is not None:
                response = error_response(ours)
            else:
                request_id = uuid.uuid4().hex[:12]
                log.exception("internal error, request %s %s %s", request_id, scope.get("method"), scope.get("path"))
                response = JSONResponse({"error": f"internal error (request id {request_id}); the replica's log has "
                                                  "the traceback", "request_id": request_id}, status_code=500)
            if not started:  # a reply already under way cannot be replaced
                await response(scope, receive, send)


def install_error_handlers(api: FastAPI) -> None:
    """The ingress's one exception mapping: ``EdgebatchError`` -> its status, anything else -> 500."""

    async def ours(request: Request, exc: Exception) -> JSONResponse:
        return error_response(as_edgebatch_error(exc) or exc)  # type: ignore[arg-type]  # registered for ours only

    api.add_exception_handler(EdgebatchError, ours)
    api.add_middleware(_InternalErrors)


async def read_inference_body(request: Request, limit: int, token: TokenCheck, guarded: bool) -> bytes:
    """An inference request's body: the API token first when the operator guards inference
    (``auth_inference``), so nothing about the model is told to a client without it."""
    if guarded:
        token.require(request.headers, "inference")
    return await read_body(request, limit)


async def read_body(request: Request, limit: int, setting: str = "max_body_bytes") -> bytes:
    """The request body, refused with 413 past ``limit`` bytes: at once from Content-Length, else
    while streaming (a chunked body declares no length), so an oversized body is never held whole."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds {setting} ({limit} bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds {setting} ({limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


JSON_BODY_LIMIT = 64 * 1024  # an operator's request (a batch size, a policy, an alias): small


async def read_json_model(request: Request, model: type[BaseModel], example: str) -> Any:
    """A small JSON body validated by ``model``; a 400 naming each bad field (FastAPI's own 422 lists
    would not be ``{"error": ...}``), or saying what the body should look like."""
    raw = await read_body(request, JSON_BODY_LIMIT, "the JSON body limit")
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()]
        raise BadRequest(f"invalid request body ({'; '.join(problems)}); send JSON like {example}") from None
