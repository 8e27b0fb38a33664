"""What of a stream must outlive the processes that run it (issue 15).

The streams ingress writes a ``StreamRecord`` when a stream starts (its request, the app's
settings, every interruption it saw); the stream's reader writes its ``ReaderProgress`` about
once a second (position and counters). Both live in a ``RecordStore`` (Ray's GCS KV store in a
cluster), so a restarted ingress rebuilds its table and a restarted reader resumes where the
last delivered frame was, and ``streams show`` tells the operator what happened.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

#: how often a reader writes its progress; a restarted reader re-reads at most this much
PROGRESS_INTERVAL_S = 1.0
#: a stream whose reader died this many times is left failed instead of relaunched again
MAX_RELAUNCHES = 5


@dataclass
class Interruption:
    """One fault a stream went through, as ``streams show`` lists it."""

    at: float
    kind: str  # "ingress_restarted" | "reader_restarted" | "reader_relaunched" | "reader_lost"
    detail: str
    resumed_from_frame: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ReaderProgress:
    """The reader's position and counters; totals span every incarnation of the reader."""

    next_frame: int = 0  # files: the source frame after the last one delivered
    frames_in: int = 0
    frames_out: int = 0
    drops: int = 0
    errors: int = 0
    state: str = "running"
    at: float = field(default_factory=time.time)
    restarts: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ReaderProgress:
        if not data:
            return cls()
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StreamRecord:
    """The stream table's row: enough to start the stream again exactly as it was asked for."""

    id: str
    request: dict[str, Any]
    app_config: dict[str, Any]
    created_at: float = field(default_factory=time.time)
    interruptions: list[dict[str, Any]] = field(default_factory=list)
    relaunches: int = 0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StreamRecord:
        return cls(id=str(data["id"]), request=dict(data["request"]), app_config=dict(data["app_config"]),
                   created_at=float(data.get("created_at", time.time())),
                   interruptions=list(data.get("interruptions") or []), relaunches=int(data.get("relaunches", 0)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def note(self, interruption: Interruption) -> None:
        self.interruptions.append(interruption.to_dict())
        del self.interruptions[:-50]  # bounded: a flapping node must not grow the record without end


def progress_key(stream_id: str) -> str:
    return f"{stream_id}/progress"


def is_stream_key(key: str) -> bool:
    return "/" not in key


def resumed_totals(before: ReaderProgress, status: dict[str, Any]) -> dict[str, int]:
    """Counters of the running reader plus those of the incarnations before it."""
    return {"frames_in": before.frames_in + int(status.get("frames_in") or 0),
            "frames_out": before.frames_out + int(status.get("frames_out") or 0),
            "drops": before.drops + int(status.get("drops") or 0),
            "errors": before.errors + int(status.get("errors") or 0)}


def next_frame_after(status: dict[str, Any], fallback: int) -> int:
    """Where a resumed file reader starts: after the last frame delivered (frames in flight at the
    fault are read again rather than lost)."""
    last = status.get("last_frame")
    return int(last) + 1 if isinstance(last, int) else fallback
