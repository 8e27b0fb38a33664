"""Detections against ground truth: the check that proves coordinate mapping and NMS."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix1, iy1 = max(a[0], b[0]), max(a[1], b[1])
    ix2, iy2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, ix2 - ix1) * max(0.0, iy2 - iy1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class MatchCounts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: MatchCounts) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0


def match(dets: Iterable[tuple[Sequence[float], int]], gts: Iterable[tuple[Sequence[float], int]], iou: float = 0.5) -> MatchCounts:
    """Greedy one-to-one matching of (box, class_id) pairs, same class and IoU >= ``iou``."""
    gts = list(gts)
    used = [False] * len(gts)
    counts = MatchCounts()
    for box, cls in dets:
        best, best_j = 0.0, -1
        for j, (gbox, gcls) in enumerate(gts):
            if used[j] or gcls != cls:
                continue
            v = box_iou(box, gbox)
            if v > best:
                best, best_j = v, j
        if best >= iou:
            used[best_j] = True
            counts.tp += 1
        else:
            counts.fp += 1
    counts.fn = used.count(False)
    return counts
