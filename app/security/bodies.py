"""Bounded work per request body: inflate under a byte limit, JSON under a depth limit, strict numbers.

A 245 KB gzip body may claim 240 MB; a JSON body may nest thousands of levels deep or hold
``NaN``, which RFC 8259 does not allow. Each is refused with a 4xx naming the problem before
it costs more than the body's own size. The callers run these off the event loop.
"""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

import numpy as np

from app.errors import BadRequest, PayloadTooLarge

#: Deepest nesting a request body may have: tensors of up to 8 dimensions inside the v2 header.
MAX_JSON_DEPTH = 16
_INFLATE_CHUNK = 1 << 20
_ESCAPE_RE = re.compile(rb"\\.", re.DOTALL)
_STRING_RE = re.compile(rb'"[^"]*"')
_KEEP = b'[]{}"\\'
_DROP = bytes(b for b in range(256) if b not in _KEEP)


def inflate(body: bytes, encoding: str, limit: int, setting: str = "max_body_bytes") -> bytes:
    """``body`` decompressed (gzip or deflate), refused with 413 as soon as the output passes ``limit``."""
    wbits = (16 + zlib.MAX_WBITS) if encoding == "gzip" else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits=wbits)
    out: list[bytes] = []
    size = 0
    data = body
    try:
        while not d.eof:
            chunk = d.decompress(data, min(_INFLATE_CHUNK, limit - size + 1))
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"decompressed request body exceeds {setting} ({limit} bytes)")
            out.append(chunk)
            data = d.unconsumed_tail
            if not chunk and not data:
                break  # input used up without reaching the end of the stream
        tail = d.flush(limit - size + 1)
    except zlib.error as exc:
        raise BadRequest(f"request body is not valid {encoding} data: {exc}") from None
    if size + len(tail) > limit:
        raise PayloadTooLarge(f"decompressed request body exceeds {setting} ({limit} bytes)")
    if not d.eof:
        raise BadRequest(f"request body is not valid {encoding} data: it ends before the compressed stream does")
    return b"".join(out) + tail


def json_depth(data: bytes) -> int:
    """Deepest ``[``/``{`` nesting of a JSON text, counted in C and numpy (brackets in strings ignored)."""
    skeleton = _STRING_RE.sub(b"", _ESCAPE_RE.sub(b"", data).translate(None, _DROP))
    if not skeleton:
        return 0
    arr = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((arr == ord("[")) | (arr == ord("{")), 1, np.where((arr == ord("]")) | (arr == ord("}")), -1, 0))
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def _no_constant(name: str) -> Any:
    raise BadRequest(f"malformed JSON: {name} is not a JSON number (RFC 8259); send finite numbers, or the "
                     "tensor as binary data")


def loads(data: bytes, max_depth: int = MAX_JSON_DEPTH, what: str = "request body") -> Any:
    """Strict JSON: nesting at most ``max_depth`` deep, no NaN/Infinity; a 400 naming the problem otherwise."""
    depth = json_depth(data)
    if depth > max_depth:
        raise BadRequest(f"malformed request: {what} nests {depth} levels deep; at most {max_depth} are allowed")
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {what} is not valid JSON: {exc}") from None
