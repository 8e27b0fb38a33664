"""Small JSON records that must outlive the process that wrote them (a replica, a reader).

The stream table and the batch controller's per-detector policy and pins are kept in a
``RecordStore`` rather than in one replica's memory, so Serve restarting that replica loses
nothing (issue 15). In a cluster the store is Ray's GCS key-value store
(``deployments.records.GcsRecords``); the core only sees this protocol.
"""

from __future__ import annotations

from typing import Any, Protocol


class RecordStore(Protocol):
    """Key -> JSON object; keys are plain strings under the store's own prefix."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def put(self, key: str, value: dict[str, Any]) -> None: ...

    def delete(self, key: str) -> None: ...

    def keys(self) -> list[str]: ...
