"""A closed-loop HTTP load client that runs in its own process (not inside the server's).

``protocol="v1"`` posts JPEG bodies to ``/v1/detect``; ``protocol="v2"`` posts
pre-processed FP32 tensors with the binary tensor extension to
``/v2/models/{model}/infer`` (what Triton's perf_analyzer sends), so the same
client measures edgebatch and a Triton server alike.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class LoadResult:
    ok: int = 0
    failed: int = 0
    seconds: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    refused: int = 0  # 503s: shed by the server's deadline admission (also counted in failed)
    refused_latencies_s: list[float] = field(default_factory=list)
    server_latencies_s: list[float] = field(default_factory=list)  # the server's own time (Server-Timing), if sent
    timeline: list[tuple[float, float, int]] = field(default_factory=list)  # (t_done, latency, status)
    started_at_wall: float = 0.0  # time.time() when the measured window began (t_done is relative to it)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def v2_body(tensor: np.ndarray, input_name: str = "images", output_name: str = "output0") -> tuple[bytes, dict[str, str]]:
    header = {
        "inputs": [{
            "name": input_name,
            "shape": list(tensor.shape),
            "datatype": "FP32",
            "parameters": {"binary_data_size": tensor.nbytes},
        }],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }
    h = json.dumps(header).encode()
    return h + np.ascontiguousarray(tensor, dtype=np.float32).tobytes(), {
        "Inference-Header-Content-Length": str(len(h)),
        "Content-Type": "application/octet-stream",
    }


def v2_bytes_body(data: bytes, input_name: str = "image", output_name: str = "detections") -> tuple[bytes, dict[str, str]]:
    """One encoded image as a v2 BYTES input of shape [1, 1] (binary extension: 4-byte length, then the
    bytes): how a Triton model that does the whole job takes the JPEG that /v1/detect takes as its body."""
    payload = struct.pack("<I", len(data)) + data
    header = {
        "inputs": [{"name": input_name, "shape": [1, 1], "datatype": "BYTES",
                    "parameters": {"binary_data_size": len(payload)}}],
        "outputs": [{"name": output_name, "parameters": {"binary_data": True}}],
    }
    h = json.dumps(header).encode()
    return h + payload, {"Inference-Header-Content-Length": str(len(h)), "Content-Type": "application/octet-stream"}


def server_timing_s(header: str | None) -> float | None:
    """Seconds of the first ``dur`` in a ``Server-Timing`` header (``gateway;dur=12.5`` is 0.0125)."""
    if not header:
        return None
    for part in header.split(",")[0].split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key == "dur":
            try:
                return float(value) / 1000.0
            except ValueError:
                return None
    return None


async def _run(url: str, bodies: Sequence[tuple[bytes, dict[str, str]]], clients: int, duration_s: float,
               warmup_s: float, max_requests: int | None, timeout_s: float, backoff: bool = False) -> LoadResult:
    import aiohttp

    result = LoadResult()
    t0 = time.perf_counter()
    t_measure = t0 + warmup_s
    t_end = t_measure + duration_s
    result.started_at_wall = time.time() + warmup_s
    sent = 0
    conn = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:

        async def worker(wid: int) -> None:
            nonlocal sent
            i = wid
            while True:
                now = time.perf_counter()
                if now >= t_end or (max_requests is not None and sent >= max_requests):
                    return
                body, headers = bodies[i % len(bodies)]
                i += clients
                start = time.perf_counter()
                status = 0
                retry_after = server_s = None
                try:
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                        retry_after = resp.headers.get("Retry-After")
                        server_s = server_timing_s(resp.headers.get("Server-Timing"))
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    key = type(exc).__name__
                    if start >= t_measure:
                        result.errors[key] = result.errors.get(key, 0) + 1
                        result.failed += 1
                    continue
                done = time.perf_counter()
                if start >= t_measure:
                    sent += 1
                    result.timeline.append((done - t_measure, done - start, status))
                    if status == 200:
                        result.ok += 1
                        result.latencies_s.append(done - start)
                        if server_s is not None:
                            result.server_latencies_s.append(server_s)
                    else:
                        result.failed += 1
                        result.errors[f"HTTP {status}"] = result.errors.get(f"HTTP {status}", 0) + 1
                        if status == 503:
                            result.refused += 1
                            result.refused_latencies_s.append(done - start)
                if backoff and status == 503 and retry_after and retry_after.isdigit():
                    await asyncio.sleep(min(float(retry_after), max(0.0, t_end - time.perf_counter())))

        await asyncio.gather(*(worker(w) for w in range(clients)))
    result.seconds = min(time.perf_counter(), t_end) - t_measure if max_requests is None else time.perf_counter() - t_measure
    return result


def _child(conn, url, bodies, clients, duration_s, warmup_s, max_requests, timeout_s, backoff) -> None:
    try:
        res = asyncio.run(_run(url, bodies, clients, duration_s, warmup_s, max_requests, timeout_s, backoff))
        conn.send(("ok", res))
    except BaseException as exc:  # report to the parent instead of dying silently
        conn.send(("error", repr(exc)))
    finally:
        conn.close()


def run_load(url: str, bodies: Sequence[tuple[bytes, dict[str, str]]], *, clients: int = 8, duration_s: float = 10.0,
             warmup_s: float = 2.0, max_requests: int | None = None, timeout_s: float = 60.0,
             backoff: bool = False) -> LoadResult:
    """Run the load from a separate process and return its measurements; ``backoff``: a refused (503)
    client waits the ``Retry-After`` it was given before it sends again."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, url, list(bodies), clients, duration_s, warmup_s, max_requests, timeout_s,
                                                     backoff), daemon=True)
    proc.start()
    child.close()
    limit = warmup_s + duration_s + timeout_s + 30
    if not parent.poll(limit):
        proc.kill()
        raise TimeoutError(f"load client did not finish within {limit:.0f} s")
    kind, payload = parent.recv()
    proc.join(timeout=10)
    if kind != "ok":
        raise RuntimeError(f"load client failed: {payload}")
    return payload
