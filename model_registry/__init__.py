"""MLflow-backed model repository: one fixed-batch variant per (backend, batch size) per version.

Import the pieces from their modules (``model_registry.repository``,
``model_registry.builders``, ...); this package imports nothing heavy at import time.
"""

from __future__ import annotations

__all__ = ["ModelRepository", "VariantFile", "parse_model_ref", "ensure_demo_model"]


def __getattr__(name: str):
    """Lazy re-exports, so ``import model_registry`` does not pull in MLflow or ONNX."""
    if name in ("ModelRepository", "parse_model_ref"):
        from model_registry import repository

        return getattr(repository, name)
    if name == "VariantFile":
        from model_registry.builders import VariantFile

        return VariantFile
    if name == "ensure_demo_model":
        from model_registry.demo import ensure_demo_model

        return ensure_demo_model
    raise AttributeError(name)
