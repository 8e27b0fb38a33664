"""Open Inference Protocol v2 bodies decoded off the replica's event loop.

``json.loads`` holds the GIL for the whole call (1.2 s for a 12 MB body on the 2-core box
here), so a thread does not free the event loop for a large JSON body: those, and compressed
bodies whose inflated size is unknown up front, are decoded in a Ray worker process, one at a
time per replica. Small bodies and the binary extension's short JSON header stay in the
replica's CPU thread pool, where the copy to another process would cost more than it saves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from concurrent.futures import Executor
from typing import Any

import ray

from app.errors import EdgebatchError, Unavailable
from app.oip import INFERENCE_HEADER_CONTENT_LENGTH, InferRequest, ModelSignature, decode_infer_request

#: JSON parts larger than this are parsed in a worker process.
LARGE_JSON_BYTES = 512 * 1024


@ray.remote(num_cpus=0, max_retries=0)
def _decode_in_worker(body: bytes, headers: dict[str, str], sig: ModelSignature, limit: int) -> Any:
    try:
        return decode_infer_request(body, headers, sig, limit)
    except EdgebatchError as exc:  # returned, not raised: the caller re-raises it with its HTTP status
        return exc


def _json_part_bytes(body: bytes, headers: Mapping[str, str]) -> int | None:
    """Bytes of JSON to parse; ``None`` when unknown before inflating (a compressed body)."""
    if (headers.get("content-encoding") or "identity").strip().lower() not in ("identity", ""):
        return None
    declared = headers.get(INFERENCE_HEADER_CONTENT_LENGTH.lower())
    if declared is not None and declared.strip().isdigit():
        return min(int(declared), len(body))
    return len(body)


class V2BodyDecoder:
    """``decode``: small bodies in ``threads``, large or compressed ones in a worker process."""

    def __init__(self, threads: Executor, large_bytes: int = LARGE_JSON_BYTES) -> None:
        self.threads = threads
        self.large_bytes = large_bytes
        self._worker_slot = asyncio.Semaphore(1)

    async def decode(self, body: bytes, headers: Mapping[str, str], sig: ModelSignature, limit: int) -> InferRequest:
        headers = {k.lower(): v for k, v in headers.items()}
        size = _json_part_bytes(body, headers)
        if size is not None and size <= self.large_bytes:
            return await asyncio.get_running_loop().run_in_executor(
                self.threads, decode_infer_request, body, headers, sig, limit)
        async with self._worker_slot:
            try:
                out = await _decode_in_worker.remote(body, headers, sig, limit)
            except ray.exceptions.RayError as exc:
                raise Unavailable(f"the request decoder process failed ({type(exc).__name__}); retry") from None
        if isinstance(out, EdgebatchError):
            raise out
        return out
