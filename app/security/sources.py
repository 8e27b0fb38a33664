"""Which video sources a client may name, decided before anything is opened.

Default: video files inside the state folder's ``videos/`` and nothing else. An operator
adds media folders, URL schemes and camera hosts (names, or IP networks for literal
addresses) in the ``edgebatch-streams`` app's ``sources`` args. Every refusal of a local
path is the same sentence, so a client learns nothing about files outside the media
folders (not even whether they exist). Credentials in URLs never appear in messages,
status or logs: ``redact`` replaces them.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.errors import BadRequest
from app.security.paths import OutsideRoot, inside

if TYPE_CHECKING:  # app.streams.source imports this module
    from app.streams.source import SourceSpec

URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_USERINFO_RE = re.compile(r"(?<=://)[^/@\s]*@")
_SECRET_QUERY_RE = re.compile(r"(?i)([?&](?:password|passwd|pwd|token|key|secret|auth|signature)=)[^&#\s]*")


def redact(text: str) -> str:
    """``text`` with URL credentials (``user:pass@`` and secret-looking query values) replaced by ``***``."""
    return _SECRET_QUERY_RE.sub(r"\1***", _USERINFO_RE.sub("***@", str(text)))


class SourcePolicy(BaseModel):
    """The allowlist (the ``sources`` arg of the streams app); empty lists allow nothing of that kind."""

    model_config = ConfigDict(extra="forbid")

    media_folders: list[str] | None = Field(
        None, description="folders whose video files may be streamed; default: the state folder's videos/")
    schemes: list[str] = Field(["rtsp", "rtsps", "http", "https"], description="URL schemes allowed for listed hosts")
    hosts: list[str] = Field(default_factory=list,
                             description="camera hosts by name, or IP networks (10.0.0.0/24) for literal addresses")
    cameras: bool = Field(False, description="allow local camera indexes (0, 1, ...) on the reader's node")

    @field_validator("schemes")
    @classmethod
    def _schemes(cls, v: list[str]) -> list[str]:
        bad = [s for s in v if s.lower() in ("file", "") or not re.match(r"^[a-z][a-z0-9+.-]*$", s.lower())]
        if bad:
            raise ValueError(f"not allowed as URL schemes: {bad}; list network schemes such as rtsp, https")
        return [s.lower() for s in v]

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if "/" in h:
                try:
                    ipaddress.ip_network(h, strict=False)
                except ValueError:
                    raise ValueError(f"{h!r} is neither a host name nor an IP network like 10.0.0.0/24") from None
            elif not re.match(r"^[A-Za-z0-9.:-]+$", h):
                raise ValueError(f"{h!r} is not a host name or IP address")
        return [h.lower() for h in v]

    def folders(self, default: Path) -> list[Path]:
        return [Path(f) for f in self.media_folders] if self.media_folders is not None else [default]

    def precheck(self, source: str | int) -> None:
        """What can be decided without the reader's filesystem: cameras and URLs in full, nothing for paths."""
        raw = str(source).strip()
        if raw.isdigit() or (URL_RE.match(raw) and not raw.lower().startswith("file://")):
            self.check(raw, Path("/nonexistent"))

    def check(self, source: str | int, default_folder: Path) -> SourceSpec:
        """The allowed ``SourceSpec`` for ``source``, or one BadRequest; nothing is opened here."""
        from app.streams.source import SourceSpec

        raw = str(source).strip()
        if not raw:
            raise BadRequest("empty source: give a video file name from the media folder, an allowed URL "
                             "or (when enabled) a camera index")
        if raw.isdigit():
            if not self.cameras:
                raise BadRequest(f"source {raw!r}: camera sources are not enabled on this server; an operator "
                                 "sets sources.cameras: true in the edgebatch-streams args")
            return SourceSpec(raw, "camera", int(raw))
        if URL_RE.match(raw) and not raw.lower().startswith("file://"):
            return SourceSpec(redact(raw), "url", self._check_url(raw))
        path = raw[len("file://"):] if raw.lower().startswith("file://") else raw
        return SourceSpec(redact(raw), "file", str(self._check_file(path, default_folder)))

    def _check_url(self, raw: str) -> str:
        shown = redact(raw)
        try:
            parts = urlsplit(raw)
            host = (parts.hostname or "").lower()
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise BadRequest(f"source {shown!r} is not a valid URL") from None
        if parts.scheme.lower() not in self.schemes:
            raise BadRequest(f"source {shown!r}: URL scheme {parts.scheme!r} is not allowed; allowed: "
                             f"{', '.join(self.schemes) or 'none'}")
        if not host or not self._host_allowed(host):
            raise BadRequest(f"source {shown!r}: host {host or '(none)'!r} is not in the allowed camera hosts; "
                             "an operator adds it to sources.hosts in the edgebatch-streams args")
        return raw

    def _host_allowed(self, host: str) -> bool:
        if host in self.hosts:
            return True
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return False  # a name must be listed by name: resolving it here would let DNS pick the target
        return any("/" in h and addr in ipaddress.ip_network(h, strict=False) for h in self.hosts)

    def _check_file(self, path: str, default_folder: Path) -> Path:
        folders = self.folders(default_folder)
        refused = BadRequest(f"source {redact(path)!r} is not a video in this server's media folder; give the "
                             "name of a file there (for example sample.mp4), an allowed camera URL, or ask an "
                             "operator to add a folder to sources.media_folders")
        candidate = Path(path).expanduser()
        contained = False
        for folder in folders:
            full = candidate if candidate.is_absolute() else folder / candidate
            try:
                real = inside(folder, full)
            except OutsideRoot:
                continue
            contained = True
            if real.is_file():
                return real
        if contained:
            raise BadRequest(f"source {redact(path)!r}: no such video in the media folder; list the folder's "
                             "files or make the sample with `edgebatch sample-video`")
        raise refused
