"""The one small engine interface every backend implements.

An engine holds exactly one *fixed-batch* model variant. The pipeline hands it
a float32 NCHW array of exactly ``batch_size`` rows (partial batches are padded
by ``run_padded``) and gets the raw model outputs back.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ModelVariant:
    """One artifact of one model version: a backend built for one batch size."""

    name: str
    version: str
    backend: str  # "onnx" | "tensorrt" | "tflite" | "edgetpu"
    batch_size: int
    path: Path
    input_shape: tuple[int, ...] = ()  # (N, C, H, W) or (N, H, W, C) for TFLite
    precision: str = "fp32"
    sha256: str = ""
    size_bytes: int = 0
    tags: dict[str, str] = field(default_factory=dict)


class Engine(abc.ABC):
    """Load a variant, run a batch, report batch size, input shape and memory."""

    backend: str = "base"

    @abc.abstractmethod
    def load(self, path: Path) -> None:
        """Load the model file; raise ``app.errors.Unavailable`` naming what is missing."""

    @property
    @abc.abstractmethod
    def batch_size(self) -> int:
        """The fixed batch size this variant was built for."""

    @property
    @abc.abstractmethod
    def input_shape(self) -> tuple[int, ...]:
        """Full input shape including the batch dimension."""

    @abc.abstractmethod
    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        """Run exactly ``batch_size`` rows; return the outputs in model order."""

    @abc.abstractmethod
    def memory_bytes(self) -> int:
        """Best estimate of the memory this loaded variant holds (weights + buffers)."""

    @property
    def device(self) -> str:
        """Where it runs, in words ("cpu", "cuda:0", "edgetpu:0")."""
        return "cpu"

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the model; must be idempotent."""


def run_padded(engine: Engine, batch: np.ndarray) -> list[np.ndarray]:
    """Run ``len(batch) <= batch_size`` rows, padding with zeros; padding never comes back."""
    n = batch.shape[0]
    size = engine.batch_size
    if n > size:
        raise ValueError(f"batch of {n} rows exceeds the variant's batch size {size}")
    if n < size:
        pad = np.zeros((size - n, *batch.shape[1:]), dtype=batch.dtype)
        batch = np.concatenate([batch, pad], axis=0)
    outputs = engine.run(np.ascontiguousarray(batch))
    return [o[:n] for o in outputs]
