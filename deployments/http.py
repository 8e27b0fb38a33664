"""What every edgebatch HTTP ingress does the same way: read a body under a limit, answer an error."""

# no `from __future__ import annotations`: FastAPI must see real types (Request) where these are used

from fastapi import Request
from fastapi.responses import JSONResponse

from app.errors import EdgebatchError, PayloadTooLarge


def error_response(exc: EdgebatchError) -> JSONResponse:
    """The JSON error body every route answers with: the message names the problem."""
    return JSONResponse({"error": exc.message}, status_code=exc.status)


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
