"""Read metrics back from Prometheus (HTTP API v1), and write a scrape config for a Ray cluster.

Prometheus stores and aggregates what the Ray nodes export; the batch controller and
the CLI ask it with PromQL instead of keeping their own time series.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml

from app.errors import BadRequest, EdgebatchError, Unavailable


@dataclass(frozen=True)
class Sample:
    """One series' value at one instant (an instant-vector element, or a scalar with no labels)."""

    labels: dict[str, str]
    value: float
    timestamp: float = 0.0


@dataclass(frozen=True)
class Series:
    """One series over a range: ``points`` are (timestamp, value) pairs."""

    labels: dict[str, str]
    points: list[tuple[float, float]] = field(default_factory=list)


def _number(text: Any) -> float:
    """Prometheus sends values as strings, including ``NaN`` and ``+Inf``."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


class PromQLClient:
    """A small client of Prometheus's ``/api/v1/query`` and ``/api/v1/query_range``."""

    def __init__(self, url: str, timeout_s: float = 5.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise BadRequest(f"Prometheus URL {url!r} must start with http:// or https://, e.g. http://127.0.0.1:9090")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)

    def _get(self, path: str, params: dict[str, Any], expr: str) -> dict[str, Any]:
        try:
            response = httpx.get(f"{self.url}{path}", params=params, timeout=self.timeout_s)
        except httpx.TimeoutException:
            raise Unavailable(f"Prometheus at {self.url} did not answer within {self.timeout_s:g} s "
                              f"(query {expr!r}); is it overloaded, or the query too heavy?") from None
        except httpx.HTTPError as exc:
            raise Unavailable(f"Prometheus at {self.url} does not answer ({exc}); start it with "
                              "`prometheus --config.file=<file from `edgebatch monitor prometheus-config`>`") from None
        try:
            body = response.json()
        except ValueError:
            raise Unavailable(f"{self.url} answered HTTP {response.status_code} without JSON: "
                              "is that a Prometheus server?") from None
        if body.get("status") == "success":
            return body.get("data") or {}
        kind, error = body.get("errorType", "error"), body.get("error", response.text[:300])
        if response.status_code in (400, 422) or kind in ("bad_data", "execution"):
            raise BadRequest(f"PromQL {kind} in {expr!r}: {error}")
        if response.status_code == 503 or kind in ("unavailable", "timeout", "canceled"):
            raise Unavailable(f"Prometheus at {self.url} could not run {expr!r}: {kind}: {error}")
        raise EdgebatchError(f"Prometheus at {self.url} failed on {expr!r}: HTTP {response.status_code} {kind}: {error}",
                             status=502)

    def query(self, expr: str, at: float | None = None) -> list[Sample]:
        """Evaluate ``expr`` now (or at ``at``, seconds since the epoch)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", params, expr)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "vector":
            return [Sample(dict(r.get("metric", {})), _number(r["value"][1]), float(r["value"][0])) for r in result or []]
        if kind in ("scalar", "string"):
            return [Sample({}, _number(result[1]), float(result[0]))]
        if kind == "matrix":
            raise BadRequest(f"{expr!r} is a range vector; use query_range, or wrap it (e.g. avg_over_time({expr}))")
        return []

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[Series]:
        """Evaluate ``expr`` from ``start`` to ``end`` (epoch seconds) every ``step_s`` seconds."""
        if end < start or step_s <= 0:
            raise BadRequest(f"query_range needs start <= end and step_s > 0 (got {start}, {end}, {step_s})")
        data = self._get("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step_s}, expr)
        return [
            Series(dict(r.get("metric", {})), [(float(t), _number(v)) for t, v in r.get("values", [])])
            for r in data.get("result") or []
        ]

    def ready(self) -> bool:
        """Is the server up and ready to answer queries?"""
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=self.timeout_s).status_code == 200
        except httpx.HTTPError:
            return False


def prometheus_config(
    targets: Sequence[str],
    *,
    service_discovery_files: Sequence[str] = (),
    scrape_interval_s: float = 10.0,
    job: str = "ray",
) -> str:
    """A prometheus.yml that scrapes Ray's metrics export ports (``host:port`` each).

    Ray's dashboard also keeps a file-based service discovery list
    (``<session dir>/prom_metrics_service_discovery.json``) that follows nodes joining
    and leaving; pass it as ``service_discovery_files`` when it exists.
    """
    if not targets and not service_discovery_files:
        raise BadRequest("no scrape targets: pass host:port of each Ray node's metrics export port "
                         "or Ray's prom_metrics_service_discovery.json")
    for target in targets:
        host, sep, port = target.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise BadRequest(f"scrape target {target!r} is not host:port")
    interval = f"{scrape_interval_s:g}s"
    scrape: dict[str, Any] = {"job_name": job, "scrape_interval": interval}
    if targets:
        scrape["static_configs"] = [{"targets": list(targets)}]
    if service_discovery_files:
        scrape["file_sd_configs"] = [{"files": list(service_discovery_files)}]
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [scrape],
    }
    header = "# prometheus.yml for the Ray cluster's metrics export ports (edgebatch monitor prometheus-config)\n"
    return header + yaml.safe_dump(config, sort_keys=False)
