"""Is an inference server answering at a base URL? One probe for client commands, a bounded
wait for `up`; both answer with one line that says what to do."""

from __future__ import annotations

import time

from app.errors import Unavailable

READY_PATH = "/v2/health/ready"  # Open Inference Protocol v2: edgebatch, Triton and KServe all answer it


def require_ready(base: str, timeout_s: float = 3.0) -> None:
    """One probe before a command sends real load: an unreachable URL is one line, not a table of failures."""
    import httpx

    try:
        httpx.get(f"{base}{READY_PATH}", timeout=timeout_s).raise_for_status()
    except httpx.HTTPError as exc:
        raise Unavailable(f"no ready inference server at {base} ({type(exc).__name__}: {str(exc)[:120]}); "
                          "start it with `edgebatch up`, or pass --url") from None


def wait_ready(base: str, timeout_s: float) -> None:
    """Poll until the server answers ready (after a deploy), or fail naming the last answer."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}{READY_PATH}", timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.3)  # polling a server that is starting; not used as synchronisation in tests
    raise Unavailable(f"{base}{READY_PATH} not ready after {timeout_s:.0f} s ({last})")
