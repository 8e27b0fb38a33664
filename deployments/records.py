"""``RecordStore`` on Ray's GCS key-value store: what a replica keeps there survives its restart
(and every node's processes see the same records). The GCS lives as long as the cluster, so
``edgebatch down`` ends the records with everything else.

Ray exposes its KV store as ``ray.experimental.internal_kv`` (the store Serve itself keeps its
checkpoints in); the calls are blocking and take about a millisecond.
"""

from __future__ import annotations

import json
from typing import Any

from ray.experimental import internal_kv

NAMESPACE = "edgebatch"


class GcsRecords:
    """JSON records under ``prefix/`` in the ``edgebatch`` namespace of the GCS KV store."""

    def __init__(self, prefix: str) -> None:
        if not prefix or "/" in prefix:
            raise ValueError(f"record prefix must be one plain word, got {prefix!r}")
        self.prefix = prefix

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}"

    def get(self, key: str) -> dict[str, Any] | None:
        raw = internal_kv._internal_kv_get(self._key(key), namespace=NAMESPACE)
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return None  # a torn or foreign value reads as absent, never as a crash
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        internal_kv._internal_kv_put(self._key(key), json.dumps(value, default=str), True, namespace=NAMESPACE)

    def delete(self, key: str) -> None:
        internal_kv._internal_kv_del(self._key(key), namespace=NAMESPACE)

    def keys(self) -> list[str]:
        head = f"{self.prefix}/"
        raw = internal_kv._internal_kv_list(head, namespace=NAMESPACE)
        return sorted(k.decode()[len(head):] for k in raw)
