"""ONNX Runtime engine: the default backend, CPU everywhere, CUDA/TensorRT where the build has them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from app.constants import onnx_type
from app.engines.base import Engine
from app.errors import BadRequest, ConfigError, Unavailable

log = logging.getLogger(__name__)

# Best first: ORT falls through the list per node, so a partial TensorRT graph still runs.
PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")



def choose_providers(available: list[str], requested: list[str] | None = None) -> list[str]:
    """The providers to ask for: ``requested`` (checked against the build) or the best available ones."""
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise Unavailable(
                f"ONNX Runtime execution provider(s) {missing} are not in this build (available: {available}); "
                "install onnxruntime-gpu for CUDA/TensorRT, or drop options['providers']"
            )
        return list(requested)
    chosen = [p for p in PREFERRED_PROVIDERS if p in available]
    return chosen or ["CPUExecutionProvider"]


def _static_dim(dim: Any) -> int | None:
    return dim if isinstance(dim, int) and dim > 0 else None


class OnnxRuntimeEngine(Engine):
    """One ``InferenceSession`` for one fixed-batch ONNX file (a symbolic batch also runs at one size)."""

    backend = "onnx"

    def __init__(self, options: dict | None = None) -> None:
        self.options: dict = dict(options or {})
        self._session: Any = None
        self._input_name = ""
        self._input_dtype: type = np.float32
        self._input_shape: tuple[int, ...] = ()
        self._output_names: list[str] = []
        self._file_bytes = 0
        self._buffer_bytes = 0
        self._providers: list[str] = []

    def load(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise Unavailable("ONNX Runtime is not installed: pip install onnxruntime") from exc
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"ONNX model file not found: {path}")
        providers = choose_providers(ort.get_available_providers(), self.options.get("providers"))
        so = ort.SessionOptions()
        if self.options.get("intra_op_num_threads"):
            so.intra_op_num_threads = int(self.options["intra_op_num_threads"])
        if self.options.get("inter_op_num_threads"):
            so.inter_op_num_threads = int(self.options["inter_op_num_threads"])
        if "allow_spinning" in self.options:  # ORT spins by default; a shared CPU wants it off
            spin = "1" if self.options["allow_spinning"] else "0"
            so.add_session_config_entry("session.intra_op.allow_spinning", spin)
            so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        gpu = {"device_id": int(self.options.get("device_index", 0))}
        provider_options = [gpu if p != "CPUExecutionProvider" and p in PREFERRED_PROVIDERS else {} for p in providers]
        try:
            session = ort.InferenceSession(
                str(path), sess_options=so, providers=providers, provider_options=provider_options
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise ConfigError(f"ONNX Runtime could not load {path.name}: {exc}") from exc

        inp = session.get_inputs()[0]
        dims = list(inp.shape)
        fixed_batch = _static_dim(dims[0]) if dims else None
        wanted = self.options.get("batch_size")
        if fixed_batch is not None:
            if wanted is not None and int(wanted) != fixed_batch:
                raise ConfigError(
                    f"{path.name} has a fixed batch size of {fixed_batch}, not options['batch_size']={wanted}; "
                    "export a variant per batch size or with a dynamic batch axis"
                )
            batch = fixed_batch
        else:
            batch = int(wanted or 1)
        rest = [_static_dim(d) for d in dims[1:]]
        if any(d is None for d in rest):
            raise ConfigError(
                f"{path.name}: input {inp.name!r} has dynamic non-batch dimensions {dims}; "
                "export with a fixed image size"
            )
        self._session = session
        self._input_name = inp.name
        self._input_dtype = onnx_type(inp.type).numpy
        self._input_shape = (batch, *[int(d) for d in rest])  # type: ignore[misc]
        self._output_names = [o.name for o in session.get_outputs()]
        self._providers = list(session.get_providers())
        self._file_bytes = path.stat().st_size
        self._buffer_bytes = self._estimate_buffers(session, batch)

    def _estimate_buffers(self, session: Any, batch: int) -> int:
        """Input + output bytes at this batch size (symbolic output dims count as the batch)."""
        total = int(np.prod(self._input_shape)) * np.dtype(self._input_dtype).itemsize
        for out in session.get_outputs():
            n = 1
            for i, d in enumerate(out.shape):
                n *= _static_dim(d) or (batch if i == 0 else 1)
            total += n * onnx_type(out.type).numpy.itemsize
        return total

    def _require_loaded(self) -> Any:
        if self._session is None:
            raise Unavailable("the ONNX Runtime engine is not loaded (closed, or load() was never called)")
        return self._session

    @property
    def batch_size(self) -> int:
        return self._input_shape[0] if self._input_shape else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._input_shape

    @property
    def providers(self) -> list[str]:
        """The providers the session really uses, best first."""
        return list(self._providers)

    @property
    def device(self) -> str:
        if "TensorrtExecutionProvider" in self._providers:
            return "cuda:0 (onnxruntime TensorRT EP)"
        if "CUDAExecutionProvider" in self._providers:
            return "cuda:0 (onnxruntime CUDA EP)"
        return "cpu"

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        session = self._require_loaded()
        if tuple(batch.shape) != self._input_shape:
            raise BadRequest(
                f"batch shape {tuple(batch.shape)} does not match the model input {self._input_shape}; "
                "pad partial batches with run_padded"
            )
        feed = np.ascontiguousarray(batch, dtype=self._input_dtype)
        return list(session.run(self._output_names, {self._input_name: feed}))

    def memory_bytes(self) -> int:
        return self._file_bytes + self._buffer_bytes if self._session is not None else 0

    def close(self) -> None:
        self._session = None


def save_onnx(graph, path: str | Path, opset: int = 17) -> Path:
    """Wrap an ONNX ``graph`` in a model that every ONNX Runtime we support loads (opset 17,
    IR version 9: newer onnx packages write an IR that older runtimes refuse), check it, save it."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
