"""Per-node cache of registry variants: content-addressed, verified on every use.

Files live under ``blobs/<sha[:2]>/<sha>/<file name>``: the sha256 recorded in
the registry names the folder, so a copy is verifiable offline and identical
files of two versions are downloaded once. An ``index/`` keeps the variant
metadata of each version seen and the last alias resolutions, per registry URI,
so a detector whose registry went away can still find and verify what it has.
Writes are atomic (temporary file + ``os.replace``) so two replicas on one node
can fill the cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from app.errors import Unavailable
from app.security.paths import SAFE_NAME_RE, OutsideRoot, check_sha256, inside
from model_registry.builders import file_sha256


class IntegrityError(Unavailable):
    """A variant's bytes do not match the sha256 the registry recorded: never load it."""


class TamperedRecord(IntegrityError):
    """A value read from the registry or the node index is not what it must be (a hash, a name)."""


def check_record(record: dict, where: str) -> dict:
    """A variant record whose sha256 and file name are safe to turn into cache paths.

    Registry tags and the node index are both editable by whoever reaches them, so a sha256
    of ``../../x`` must never become a folder this node deletes or writes."""
    try:
        check_sha256(record.get("sha256"))
        file_name = Path(str(record.get("file", ""))).name
        if not SAFE_NAME_RE.match(file_name) or ".." in str(record.get("file", "")).split("/"):
            raise ValueError(f"file {str(record.get('file'))[:80]!r} is not a safe file name")
        int(record["batch_size"]), int(record["size_bytes"])
    except (ValueError, TypeError, KeyError) as exc:
        raise TamperedRecord(f"variant record in {where} is invalid ({exc}); it is refused: re-register the "
                             "model (edgebatch models build ...) or delete this node's cache index") from None
    return record


def check_version(version: object, where: str) -> str:
    if not isinstance(version, str) or not version.isdigit():
        raise TamperedRecord(f"version {str(version)[:40]!r} in {where} is not a version number; it is refused")
    return version


class VariantCache:
    """Verified local copies of variant files, plus the metadata to find them offline."""

    def __init__(self, root: Path, registry_uri: str) -> None:
        self.root = Path(root)
        self.registry_key = hashlib.sha256(registry_uri.encode()).hexdigest()[:16]
        self.registry_uri = registry_uri

    # -- blobs ---------------------------------------------------------------
    def blob_path(self, sha256: str, file_name: str) -> Path:
        """Where a verified file lives; refuses any sha256 or name that could point elsewhere."""
        try:
            check_sha256(sha256)
            if not SAFE_NAME_RE.match(file_name):
                raise ValueError(f"file name {file_name[:80]!r} is not a safe file name")
            return inside(self.root, self.root / "blobs" / sha256[:2] / sha256 / file_name)
        except (ValueError, OutsideRoot) as exc:
            raise TamperedRecord(f"refusing a cache path from registry values: {exc}") from None

    def get(self, sha256: str, file_name: str, size_bytes: int | None = None) -> Path | None:
        """The verified cached file, ``None`` when absent; a corrupt copy is removed and refused."""
        path = self.blob_path(sha256, file_name)
        if not path.is_file():
            return None
        actual_size = path.stat().st_size
        actual = file_sha256(path) if size_bytes in (None, actual_size) else f"(size {actual_size})"
        if actual != sha256:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise IntegrityError(
                f"cached variant {path} does not match its recorded sha256 {sha256} (found {actual}): "
                "it was truncated or tampered with, so it is refused and the cache entry removed; "
                "call again with the registry reachable to download a fresh copy"
            )
        return path

    def install(self, sha256: str, file_name: str, fetch: Callable[[Path], Path], source: str) -> Path:
        """Fetch into a scratch folder, verify, then move into place atomically.

        ``fetch(folder)`` downloads the file into ``folder`` and returns its path.
        A mismatch means the registry's artifact itself is bad: nothing is kept.
        """
        target = self.blob_path(sha256, file_name)  # validated before anything is fetched
        scratch_root = self.root / "tmp"
        scratch_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=scratch_root) as scratch:
            fetched = Path(fetch(Path(scratch)))
            actual = file_sha256(fetched)
            if actual != sha256:
                raise IntegrityError(
                    f"artifact {source} has sha256 {actual}, but the registry recorded {sha256} when it "
                    "was registered: the stored file was truncated or tampered with, so it is refused; "
                    "register the model again (edgebatch models build ...) and promote the new version"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(fetched, target)
        return target

    # -- index ---------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        if not SAFE_NAME_RE.match(name) or ".." in name:
            raise TamperedRecord(f"model name {name[:80]!r} is not a safe name")
        return self.root / "index" / self.registry_key / name

    def _write_json(self, path: Path, data: object) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        uri_note = self.root / "index" / self.registry_key / "registry_uri.txt"
        if not uri_note.exists():
            uri_note.write_text(self.registry_uri + "\n")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
        os.replace(tmp, path)

    def _read_json(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def remember_version(self, name: str, version: str, variants: list[dict]) -> None:
        """Keep a version's variant metadata (hashes included) for offline use; the registry's copy
        replaces whatever the index held."""
        path = self._model_dir(name) / "versions" / f"{check_version(version, 'the registry')}.json"
        record = {"name": name, "version": version, "variants": variants}
        if self._read_json(path) != record:
            self._write_json(path, record)

    def version_variants(self, name: str, version: str) -> list[dict] | None:
        """The index's records of a version (offline use only), each checked before use."""
        where = f"this node's cache index ({name}/{version})"
        record = self._read_json(self._model_dir(name) / "versions" / f"{check_version(version, where)}.json")
        if record is None:
            return None
        try:
            return [check_record(r, where) for r in record["variants"]]
        except (KeyError, TypeError, AttributeError):
            raise TamperedRecord(f"{where} is not a list of variant records; delete it") from None

    def remember_alias(self, name: str, alias: str, version: str) -> None:
        path = self._model_dir(name) / "aliases.json"
        aliases = self._read_json(path) or {}
        if aliases.get(alias) != version:
            aliases[alias] = version
            self._write_json(path, aliases)

    def alias_version(self, name: str, alias: str) -> str | None:
        version = (self._read_json(self._model_dir(name) / "aliases.json") or {}).get(alias)
        return None if version is None else check_version(version, f"this node's alias index ({name}@{alias})")

    def known_versions(self, name: str) -> list[str]:
        folder = self._model_dir(name) / "versions"
        if not folder.is_dir():
            return []
        return sorted((p.stem for p in folder.glob("*.json") if p.stem.isdigit()), key=int)
