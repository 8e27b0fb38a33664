"""LiteRT (TFLite) engine: Coral EdgeTPU through its delegate when present, else the CPU.

The pipeline hands every engine float32 NCHW in 0..1; TFLite models are usually NHWC
and, for the EdgeTPU, uint8/int8-quantised. This engine adapts both ways: transposes
and quantises the input with the model's own (scale, zero_point), dequantises outputs.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.engines.base import Engine
from app.errors import BadRequest, ConfigError, Unavailable

log = logging.getLogger(__name__)

EDGETPU_LIBRARY = "libedgetpu.so.1"
LITERT_MISSING = "No TFLite interpreter is installed: pip install 'edgebatch[edgetpu]' (ai-edge-litert)"


@dataclass(frozen=True)
class InterpreterApi:
    """Where the interpreter came from: its class, its delegate loader, and a name for logs."""

    name: str
    interpreter: type
    load_delegate: Callable[..., Any] | None


def import_coral_edgetpu() -> Any | None:
    """Google's ``pycoral.utils.edgetpu`` if it really imports, else None.

    The PyPI package called ``pycoral`` is an unrelated project, so only a module that has
    ``make_interpreter`` counts.
    """
    try:
        from pycoral.utils import edgetpu  # type: ignore[import-not-found]
    except Exception:  # ImportError, or whatever an unrelated package raises on import
        return None
    return edgetpu if callable(getattr(edgetpu, "make_interpreter", None)) else None


def import_interpreter_api() -> InterpreterApi:
    """``ai_edge_litert`` (preferred), else ``tflite_runtime``; Unavailable naming the fix."""
    try:
        from ai_edge_litert import interpreter as litert

        return InterpreterApi("ai-edge-litert", litert.Interpreter, litert.load_delegate)
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter as tfl  # type: ignore[import-not-found]

        return InterpreterApi("tflite-runtime", tfl.Interpreter, getattr(tfl, "load_delegate", None))
    except ImportError as exc:
        raise Unavailable(LITERT_MISSING) from exc


def _is_nhwc(shape: tuple[int, ...]) -> bool:
    """A 4-D image input whose channels come last (1 = grey, 3 = RGB)."""
    return len(shape) == 4 and shape[-1] in (1, 3) and shape[1] not in (1, 3)


def _quant(details: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """(scales, zero_points, axis) of a tensor; empty scales mean 'not quantised'."""
    params = details.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), dtype=np.float32)
    zero_points = np.asarray(params.get("zero_points", []), dtype=np.int64)
    if scales.size == 0:
        scale, zp = details.get("quantization", (0.0, 0))
        if scale:
            scales, zero_points = np.array([scale], np.float32), np.array([zp], np.int64)
    return scales, zero_points, int(params.get("quantized_dimension", 0))


class LiteRTEngine(Engine):
    """One TFLite interpreter for one fixed-batch .tflite file."""

    backend = "tflite"

    def __init__(self, options: dict | None = None, *, use_edgetpu: bool = False, require_edgetpu: bool = False) -> None:
        self.options: dict = dict(options or {})
        self.use_edgetpu = use_edgetpu or require_edgetpu
        self.require_edgetpu = require_edgetpu
        self._interpreter: Any = None
        self._device = "cpu"
        self._runtime = ""
        self._input: dict = {}
        self._outputs: list[dict] = []
        self._model_shape: tuple[int, ...] = ()
        self._nhwc = False
        self._file_bytes = 0

    # ------------------------------------------------------------------ loading

    def load(self, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"TFLite model file not found: {path}")
        wants_tpu = self.use_edgetpu or path.name.endswith("_edgetpu.tflite")
        interpreter, on_tpu = self._make_interpreter(path, wants_tpu)
        self._prepare(interpreter, path, on_tpu)
        self._interpreter = interpreter
        self._file_bytes = path.stat().st_size

    def _make_interpreter(self, path: Path, wants_tpu: bool) -> tuple[Any, bool]:
        """(interpreter, on_tpu): pycoral, else LiteRT + delegate, else the CPU with the reason recorded."""
        threads = self.options.get("num_threads")
        device_spec = self.options.get("edgetpu_device")  # e.g. "usb:0", "pci:0"
        self._device = "cpu"
        if wants_tpu:
            interp, reason = self._edgetpu_interpreter(path, device_spec, threads)
            if interp is not None:
                self._device = f"edgetpu:{device_spec or 0}"
                return interp, True
            if self.require_edgetpu:
                raise Unavailable(
                    f"EdgeTPU required but not usable ({reason}): install libedgetpu1-std "
                    "(https://coral.ai/software/#debian-packages) and plug in the Coral device"
                )
            log.warning("%s: %s; running on the CPU", path.name, reason)
            self._device = f"cpu ({reason})"
        api = import_interpreter_api()
        self._runtime = api.name
        try:
            return api.interpreter(model_path=str(path), num_threads=threads), False
        except ValueError as exc:
            raise ConfigError(f"{api.name} could not read {path.name}: {exc}") from exc

    def _edgetpu_interpreter(self, path: Path, device_spec: str | None, threads: int | None) -> tuple[Any, str]:
        """(interpreter, "") on the EdgeTPU, or (None, why not)."""
        reasons: list[str] = []
        coral = import_coral_edgetpu()
        if coral is not None:
            try:
                interp = coral.make_interpreter(str(path), device=device_spec)
                self._runtime = "pycoral"
                return interp, ""
            except (ValueError, OSError, RuntimeError) as exc:
                reasons.append(f"pycoral found no EdgeTPU: {exc}")
        api = import_interpreter_api()
        if api.load_delegate is None:
            return None, "; ".join([*reasons, f"{api.name} cannot load delegates"])
        try:
            # Preflight: LiteRT's Delegate.__del__ logs a spurious AttributeError when the library is absent.
            ctypes.CDLL(EDGETPU_LIBRARY)
        except OSError:
            return None, "; ".join([*reasons, f"EdgeTPU delegate {EDGETPU_LIBRARY} not found"])
        try:
            delegate = api.load_delegate(EDGETPU_LIBRARY, {"device": device_spec} if device_spec else {})
            interp = api.interpreter(model_path=str(path), experimental_delegates=[delegate], num_threads=threads)
        except (OSError, ValueError, RuntimeError) as exc:
            return None, "; ".join([*reasons, f"EdgeTPU delegate {EDGETPU_LIBRARY} found no device: {exc}"])
        self._runtime = api.name
        return interp, ""

    def _prepare(self, interp: Any, path: Path, on_tpu: bool) -> None:
        """Resize to options['batch_size'] if asked, allocate, and read the I/O details."""
        inputs = interp.get_input_details()
        if len(inputs) != 1:
            raise ConfigError(f"{path.name} has {len(inputs)} inputs; edgebatch engines take exactly one image input")
        detail = inputs[0]
        wanted = self.options.get("batch_size")
        if wanted is not None and int(wanted) != int(detail["shape"][0]):
            new_shape = [int(wanted), *[int(d) for d in detail["shape"][1:]]]
            signature = detail.get("shape_signature")
            dynamic = signature is not None and len(signature) and int(signature[0]) == -1
            if on_tpu and not dynamic:
                raise ConfigError(
                    f"{path.name} is compiled for the EdgeTPU at batch {detail['shape'][0]}; "
                    f"compile a variant for batch {wanted}"
                )
            try:
                interp.resize_tensor_input(detail["index"], new_shape, strict=bool(dynamic))
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"{path.name} cannot run at batch {wanted}: {exc}") from exc
        try:
            interp.allocate_tensors()
        except RuntimeError as exc:
            if "edgetpu-custom-op" in str(exc):
                raise Unavailable(
                    f"{path.name} is compiled for the EdgeTPU and cannot run without {EDGETPU_LIBRARY}: "
                    "install libedgetpu1-std, or serve the uncompiled .tflite variant on the CPU"
                ) from exc
            raise ConfigError(f"{path.name}: allocating tensors failed: {exc}") from exc
        self._input = interp.get_input_details()[0]
        self._outputs = list(interp.get_output_details())
        self._model_shape = tuple(int(d) for d in self._input["shape"])
        self._nhwc = _is_nhwc(self._model_shape)

    # ------------------------------------------------------------------ the interface

    @property
    def batch_size(self) -> int:
        return self._model_shape[0] if self._model_shape else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The NCHW shape ``run`` takes (what the pipeline hands every engine)."""
        if self._nhwc:
            n, h, w, c = self._model_shape
            return (n, c, h, w)
        return self._model_shape

    @property
    def model_input_shape(self) -> tuple[int, ...]:
        """The model's own input shape (NHWC for most TFLite models)."""
        return self._model_shape

    @property
    def device(self) -> str:
        return self._device

    @property
    def runtime(self) -> str:
        """Which Python package runs the model (pycoral, ai-edge-litert, tflite-runtime)."""
        return self._runtime

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        interp = self._interpreter
        if interp is None:
            raise Unavailable("the LiteRT engine is not loaded (closed, or load() was never called)")
        if tuple(batch.shape) != self.input_shape:
            raise BadRequest(
                f"batch shape {tuple(batch.shape)} does not match the model input {self.input_shape} (NCHW); "
                "pad partial batches with run_padded"
            )
        x = np.transpose(batch, (0, 2, 3, 1)) if self._nhwc else batch
        interp.set_tensor(self._input["index"], self._to_model_dtype(x))
        interp.invoke()
        return [self._dequantize(interp.get_tensor(d["index"]), d) for d in self._outputs]

    def _to_model_dtype(self, x: np.ndarray) -> np.ndarray:
        dtype = np.dtype(self._input["dtype"])
        scales, zero_points, _axis = _quant(self._input)
        if dtype.kind in "iu" and scales.size:
            info = np.iinfo(dtype)
            q = np.round(x / scales[0]) + zero_points[0]
            return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dtype))
        if dtype.kind in "iu":  # integer input without parameters: raw 8-bit pixels
            info = np.iinfo(dtype)
            q = np.round(x * 255.0) + (info.min if dtype.kind == "i" else 0)
            return np.ascontiguousarray(np.clip(q, info.min, info.max).astype(dtype))
        return np.ascontiguousarray(x, dtype=dtype)

    @staticmethod
    def _dequantize(y: np.ndarray, details: dict) -> np.ndarray:
        scales, zero_points, axis = _quant(details)
        if np.dtype(y.dtype).kind not in "iu" or scales.size == 0:
            return np.array(y, dtype=np.float32, copy=True)  # get_tensor may alias the arena
        if scales.size > 1:  # per-channel: broadcast along the quantised axis
            shape = [1] * y.ndim
            shape[axis] = scales.size
            scales, zero_points = scales.reshape(shape), zero_points.reshape(shape)
        return ((y.astype(np.int64) - zero_points) * scales).astype(np.float32)

    def memory_bytes(self) -> int:
        if self._interpreter is None:
            return 0
        arena = 0
        for t in self._interpreter.get_tensor_details():
            shape = t.get("shape")
            if shape is not None and len(shape):
                arena += int(np.prod(shape)) * np.dtype(t["dtype"]).itemsize
        return self._file_bytes + arena

    def close(self) -> None:
        self._interpreter = None
