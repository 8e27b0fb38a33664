"""Video sources: what the user typed (file path, URL, camera index) -> an opened OpenCV capture.

A stream is only created after its source was opened and one frame was read from it,
so a typo or an unreachable camera is a 400 at creation, never a stream that dies later.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from app.errors import BadRequest
from app.security.sources import URL_RE, redact

SourceKind = Literal["file", "url", "camera"]
NETWORK_TIMEOUT_MS = 5000


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` a reader uses (tests pass fakes with the same shape)."""

    def isOpened(self) -> bool: ...  # noqa: N802 (OpenCV's name)

    def read(self) -> tuple[bool, np.ndarray | None]: ...

    def grab(self) -> bool: ...

    def get(self, prop: int) -> float: ...

    def release(self) -> None: ...


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source: ``text`` as shown (credentials redacted), ``kind``, and what OpenCV opens."""

    text: str
    kind: SourceKind
    target: str | int

    @property
    def is_live(self) -> bool:
        """Live sources (cameras, network streams) reconnect on loss; files end."""
        return self.kind != "file"

    @classmethod
    def parse(cls, text: str | int) -> SourceSpec:
        raw = str(text).strip()
        if not raw:
            raise BadRequest("empty source: give a video file path, a URL (rtsp://, http://) or a camera index like 0")
        if raw.isdigit():
            return cls(raw, "camera", int(raw))
        if URL_RE.match(raw):
            if raw.lower().startswith("file://"):
                return cls._file(raw, raw[len("file://"):])
            return cls(redact(raw), "url", raw)
        return cls._file(raw, raw)

    @classmethod
    def _file(cls, text: str, path: str) -> SourceSpec:
        """A local file for a trusted caller (bench, local pipeline); HTTP requests go through
        ``app.security.sources.SourcePolicy.check`` instead."""
        p = Path(path).expanduser()
        if not p.exists():
            raise BadRequest(f"source '{text}': no such file; give an existing video path (absolute paths are "
                             "resolved on the node that reads the stream), a URL or a camera index")
        if not p.is_file():
            raise BadRequest(f"source '{text}' is not a file; give a video file such as sample.mp4")
        return cls(text, "file", str(p.resolve()))


@dataclass(frozen=True)
class SourceInfo:
    """What the probe found: frame size, native fps (0 when the source does not say), frame count."""

    width: int
    height: int
    fps: float
    frame_count: int | None

    def to_json(self) -> dict:
        return {"width": self.width, "height": self.height, "fps": round(self.fps, 3), "frame_count": self.frame_count}


Opener = Callable[[SourceSpec], Capture]


def open_capture(spec: SourceSpec) -> Capture:
    """Open ``spec`` with OpenCV; network sources get open/read timeouts so a dead host cannot hang a reader."""
    import cv2

    if spec.kind == "url":
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]
        cap = cv2.VideoCapture(str(spec.target), cv2.CAP_ANY, params)
    else:
        cap = cv2.VideoCapture(spec.target)
    if not cap.isOpened():
        cap.release()
        hint = {
            "file": "OpenCV cannot decode it; is it a video (mp4, avi, mkv)?",
            "url": "check the URL, that the host is reachable from the reading node, and the credentials",
            "camera": "no camera with that index on the reading node; list devices with `v4l2-ctl --list-devices`",
        }[spec.kind]
        raise BadRequest(f"source '{spec.text}' could not be opened: {hint}")
    return cap


def source_info(cap: Capture, frame: np.ndarray) -> SourceInfo:
    import cv2

    fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
    if not (0.0 < fps <= 1000.0):
        fps = 0.0
    count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    return SourceInfo(width=int(frame.shape[1]), height=int(frame.shape[0]), fps=fps, frame_count=count if count > 0 else None)


def probe_source(spec: SourceSpec, opener: Opener = open_capture) -> SourceInfo:
    """Open the source and read one frame; ``BadRequest`` naming the source and why when that fails."""
    cap = opener(spec)
    try:
        ok, frame = cap.read()
        if not ok or frame is None or getattr(frame, "ndim", 0) != 3:
            raise BadRequest(f"source '{spec.text}' opened but no frame could be read from it; "
                             "check that it is a video (not an image or an empty file) and that the stream is live")
        return source_info(cap, frame)
    finally:
        cap.release()
