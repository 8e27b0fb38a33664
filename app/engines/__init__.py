"""Engine factory: one name per backend, imported lazily so a node only needs its own runtime.

``torch`` runs ``torch.export`` programs (CUDA when there is one), only where torch is installed.
``edgetpu`` is ``tflite`` with the EdgeTPU delegate preferred: without libedgetpu it
runs on the CPU and says so in ``engine.device`` (``options={"require_edgetpu": True}``
turns that into an Unavailable error instead).
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

from app.constants import BACKENDS
from app.engines.base import Engine, ModelVariant, run_padded
from app.errors import ConfigError, Unavailable

__all__ = ["BACKENDS", "Engine", "ModelVariant", "available_backends", "create_engine", "new_engine", "run_padded"]


def new_engine(backend: str, *, options: dict | None = None) -> Engine:
    """An unloaded engine for ``backend`` (ConfigError naming the allowed ones if unknown)."""
    options = dict(options or {})
    if backend == "onnx":
        from app.engines.onnxrt import OnnxRuntimeEngine

        return OnnxRuntimeEngine(options)
    if backend == "tensorrt":
        from app.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(options)
    if backend == "torch":
        from app.engines.torchrt import TorchEngine

        return TorchEngine(options)
    if backend in ("tflite", "edgetpu"):
        from app.engines.litert import LiteRTEngine

        engine = LiteRTEngine(
            options,
            use_edgetpu=backend == "edgetpu",
            require_edgetpu=bool(options.get("require_edgetpu", False)),
        )
        engine.backend = backend
        return engine
    raise ConfigError(f"unknown engine backend {backend!r}: use one of {', '.join(BACKENDS)}")


def create_engine(
    backend: str, path: Path | str, *, device: str | None = None, options: dict | None = None
) -> Engine:
    """Make and load an engine; ``device`` picks the GPU ("cuda:1") or EdgeTPU ("usb:0", "pci:0")."""
    options = dict(options or {})
    if device:
        if device.startswith("cuda:"):
            options.setdefault("device_index", int(device.split(":", 1)[1]))
        elif device.split(":", 1)[0] in ("usb", "pci"):
            options.setdefault("edgetpu_device", device)
        elif device != "cpu":
            raise ConfigError(f"unknown device {device!r}: use cpu, cuda:N, usb[:N] or pci[:N]")
    engine = new_engine(backend, options=options)
    engine.load(Path(path))
    return engine


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def available_backends() -> dict[str, str]:
    """Backend -> "available" or the reason it is not, without loading any model."""
    status: dict[str, str] = {}
    status["onnx"] = "available" if _has_module("onnxruntime") else "onnxruntime is not installed: pip install onnxruntime"

    try:
        from app.engines.tensorrt import import_tensorrt

        import_tensorrt()
        cuda_ok = _has_module("pycuda") or _has_module("cuda.bindings") or _has_module("cuda.cudart")
        status["tensorrt"] = "available" if cuda_ok else (
            "TensorRT is installed but no CUDA Python bindings: pip install 'edgebatch[tensorrt]' (pycuda)"
        )
    except Unavailable as exc:
        status["tensorrt"] = exc.message

    if _has_module("torch"):
        status["torch"] = "available"
    else:
        from app.engines.torchrt import INSTALL_HINT

        status["torch"] = f"PyTorch is not installed: {INSTALL_HINT}"

    from app.engines.litert import EDGETPU_LIBRARY, import_coral_edgetpu, import_interpreter_api

    try:
        api = import_interpreter_api()
    except Unavailable as exc:
        status["tflite"] = status["edgetpu"] = exc.message
        return status
    status["tflite"] = "available"
    if import_coral_edgetpu() is not None:
        status["edgetpu"] = "available"
    elif api.load_delegate is None:
        status["edgetpu"] = f"{api.name} cannot load delegates; runs on the CPU"
    else:
        try:
            ctypes.CDLL(EDGETPU_LIBRARY)  # the library only: opening the device is the engine's job
            status["edgetpu"] = "available"
        except OSError:
            status["edgetpu"] = (
                f"EdgeTPU delegate {EDGETPU_LIBRARY} not found (install libedgetpu1-std); runs on the CPU"
            )
    return status
