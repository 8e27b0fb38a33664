"""What every edgebatch HTTP ingress does the same way: read a body under a limit, answer an error,
check the API token, and describe those answers in the OpenAPI document."""

# no `from __future__ import annotations`: FastAPI must see real types (Request) where these are used

from typing import Any, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from app.errors import EdgebatchError, PayloadTooLarge
from app.security.auth import TokenCheck

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_ERROR_SCHEMA = {"type": "object", "required": ["error"],
                 "properties": {"error": {"type": "string", "description": "what is wrong and how to fix it"}}}


def error_response(exc: EdgebatchError) -> JSONResponse:
    """The JSON error body every route answers with: the message names the problem."""
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=getattr(exc, "headers", None))


async def edgebatch_error_handler(request: Request, exc: EdgebatchError) -> JSONResponse:
    """FastAPI exception handler: an EdgebatchError raised in a dependency gets the same JSON body."""
    return error_response(exc)


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
