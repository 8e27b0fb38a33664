"""Stream admission: a stream starts only if the detector's capacity covers it beside the others.

Six looped 30 fps streams once took /v1/detect from 28.5 to 0.5 requests/s. The capacity is
the operator's ``max_stream_fps`` when set, else the detector's measured engine rate (the
fastest loaded variant's batch size over its measured seconds per batch) times ``headroom``,
which leaves the rest to HTTP clients and to the readers' own decoding on the same CPUs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from app.errors import TooManyRequests, Unavailable
from app.replica_status import DetectorInfo


class AdmissionConfig(BaseModel):
    """The ``admission`` arg of the streams app."""

    model_config = ConfigDict(extra="forbid")

    max_stream_fps: float | None = Field(None, gt=0, description="total fps all streams may take; unset = measured")
    headroom: float = Field(0.75, gt=0, le=1.0, description="share of the detector's measured rate streams may use")


@dataclass(frozen=True)
class Capacity:
    """Frames per second streams may take in all, and where the figure came from."""

    fps: float
    basis: str


def measured_rate(run_s_by_size: Mapping[int | str, float]) -> float | None:
    """Images/s of the fastest loaded variant (batch size / measured seconds per batch)."""
    rates = [int(b) / float(s) for b, s in run_s_by_size.items() if float(s or 0) > 0]
    return max(rates) if rates else None


def stream_capacity(config: AdmissionConfig, detector_info: DetectorInfo) -> Capacity:
    if config.max_stream_fps is not None:
        return Capacity(config.max_stream_fps, "the configured admission.max_stream_fps")
    rate = measured_rate({size: v.run_s for size, v in detector_info.loaded_variants.items()})
    if rate is None:
        raise Unavailable("the detector has not measured its speed yet (no variant loaded); retry shortly")
    return Capacity(rate * config.headroom,
                    f"{rate:.0f} images/s measured on the detector x admission.headroom {config.headroom:g}")


def admit(capacity: Capacity, admitted_fps: float, streams: int, wanted_fps: float) -> None:
    """TooManyRequests saying what is left unless ``wanted_fps`` fits beside ``admitted_fps``."""
    left = capacity.fps - admitted_fps
    if wanted_fps > left + 1e-9:
        raise TooManyRequests(
            f"stream of {wanted_fps:g} fps refused: streams may take {capacity.fps:.1f} fps in all "
            f"({capacity.basis}); {streams} stream(s) already take {admitted_fps:g} fps, so "
            f"{max(left, 0.0):.1f} fps are left. Lower --fps, remove a stream, or raise admission.max_stream_fps"
        )
