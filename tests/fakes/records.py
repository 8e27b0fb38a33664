"""A RecordStore in a dict: stands in for Ray's GCS KV store where the test needs no cluster.

The dict outlives the objects that wrote to it, as the GCS outlives a replica.
"""

from __future__ import annotations

import copy
import json
from typing import Any


class DictRecords:
    def __init__(self) -> None:
        self.data: dict[str, str] = {}

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self.data.get(key)
        return None if raw is None else json.loads(raw)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.data[key] = json.dumps(copy.deepcopy(value), default=str)  # JSON like the GCS store: no shared objects

    def delete(self, key: str) -> None:
        self.data.pop(key, None)

    def keys(self) -> list[str]:
        return sorted(self.data)
