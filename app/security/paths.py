"""Confinement: a client names a file, the server decides the folder.

Stream outputs (``jsonl``, ``video_out``) are *names* resolved inside one configured
output folder; registry values that become cache paths (sha256, file names) are
validated before they touch the filesystem. Nothing here creates, opens or truncates
a file: callers validate first and only then open.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.errors import BadRequest

#: A file name a client may give: letters, digits, '_', '-', '.', not starting with '.', no separators.
SAFE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class OutsideRoot(ValueError):
    """A path resolved outside the folder it must stay in (a bug or tampering, never client input)."""


def check_name(name: str, what: str) -> str:
    """``name`` if it is a plain safe file name; BadRequest naming ``what`` otherwise."""
    if not isinstance(name, str) or not SAFE_NAME_RE.match(name) or ".." in name:
        raise BadRequest(f"{what} must be a plain file name (letters, digits, '_', '-', '.'; no folders, "
                         f"no '..', at most 128 characters), got {str(name)[:80]!r}")
    return name


def check_sha256(value: object, what: str = "sha256") -> str:
    """A registry sha256 is 64 lower-case hex characters, nothing else (it names a cache folder)."""
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise ValueError(f"{what} {str(value)[:80]!r} is not a sha256 (64 hex characters)")
    return value


def check_output_name(name: str, what: str, suffixes: tuple[str, ...] = ()) -> str:
    """The lexical part of ``OutputFolder.resolve``: usable where the folder is on another node."""
    check_name(name, what)
    if suffixes and Path(name).suffix.lower() not in suffixes:
        raise BadRequest(f"{what} {name!r} must end in {' or '.join(suffixes)}")
    return name


def inside(root: Path, path: Path) -> Path:
    """``path`` resolved (symlinks followed); ``OutsideRoot`` unless it stays inside ``root``."""
    real_root = Path(root).resolve()
    real = Path(path).resolve()
    if real != real_root and real_root not in real.parents:
        raise OutsideRoot(f"{path} resolves outside {real_root}")
    return real


JSONL_SUFFIXES = (".jsonl",)
VIDEO_SUFFIXES = (".mp4", ".avi")


class OutputFolder:
    """The one folder stream outputs may be written to (default ``<state>/outputs``)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def resolve(self, name: str, what: str, suffixes: tuple[str, ...] = ()) -> Path:
        """The path for a client-given output ``name``, validated; nothing is created or opened.

        A name that is not a plain file name, has the wrong suffix, or resolves outside the
        folder (a symlink planted inside it) is a BadRequest that names only the output name.
        """
        check_output_name(name, what, suffixes)
        try:
            path = inside(self.root, self.root / name)
        except OutsideRoot:
            raise BadRequest(f"{what} {name!r} is not inside the output folder; give a plain file name") from None
        if path.is_dir():
            raise BadRequest(f"{what} {name!r} is a folder in the output folder; give a file name")
        return path

    def ensure(self) -> Path:
        """Make the folder (owner-only) when a stream first writes to it."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return self.root
