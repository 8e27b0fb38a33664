"""What a detector replica reports about itself: typed, so the CLI, the controller and streams read fields.

``to_dict()`` gives the JSON shape of ``GET /v1/info`` and ``edgebatch status`` (the keys those
always had, plus the new ones), so HTTP clients see plain JSON while Python callers of the
deployment handle get the dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from app.pipeline import PostprocessSettings


@dataclass(frozen=True)
class VariantInfo:
    """One resident fixed-batch variant."""

    backend: str
    device: str
    memory_bytes: int
    instances: int
    load_s: float
    sha256: str
    run_s: float  # measured seconds per batch (moving average): stream admission's capacity


@dataclass(frozen=True)
class SwapRecord:
    """The last model-version swap: to which version, how long loading and warming took."""

    to_version: str
    seconds: float
    at: float


@dataclass(frozen=True)
class LoadFailure:
    """A batch size that could not be loaded; the replica kept serving ``kept_batch_size``."""

    batch_size: int
    error: str
    at: float
    kept_batch_size: int


@dataclass(frozen=True)
class ConfigRefusal:
    """A ``user_config`` the replica refused while it kept serving the last good one."""

    reason: str  # names the field, e.g. "user_config.max_batch_size: ..."
    at: float
    refused: dict[str, Any]  # the refused config's fields that differ from the one in force
    serving: dict[str, Any]  # the same fields as they stay


@dataclass(frozen=True)
class DetectorInfo:
    """``GET /v1/info``, ``edgebatch status`` and the streams app's view of one replica."""

    model: str | None
    version: str | None
    alias: str | None  # only while the alias decides the version: None when a version is pinned
    pinned_version: str | None
    backend: str | None
    max_batch_size: int | None
    batch_wait_timeout_s: float | None
    engine_instances: int | None
    resident_variants: int | None
    loaded_variants: dict[int, VariantInfo]
    labels: list[str]
    postprocess: PostprocessSettings | None
    input_size: tuple[int, int] | None
    counters: dict[str, int]
    batch_sizes_seen: dict[int, int]
    last_swap: SwapRecord | None
    last_load_failure: LoadFailure | None
    config_refused: ConfigRefusal | None
    pid: int

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["loaded_variants"] = {str(k): dataclasses.asdict(v) for k, v in sorted(self.loaded_variants.items())}
        out["batch_sizes_seen"] = dict(sorted(self.batch_sizes_seen.items()))
        out["input_size"] = list(self.input_size) if self.input_size else None
        return out


@dataclass(frozen=True)
class DetectorStats:
    """The batch controller's reading of one replica."""

    model: str | None
    version: str | None
    max_batch_size: int | None
    batch_sizes: list[int]
    loaded_variants: list[int]
    resident_bytes: dict[int, int]
    last_load_failure: LoadFailure | None
    batch_size_changed_at: float
    node_id: str
    pid: int
    metrics: dict[str, Any] = field(default_factory=dict)  # AppMetrics.snapshot()

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["resident_bytes"] = {str(k): v for k, v in self.resident_bytes.items()}
        return out
