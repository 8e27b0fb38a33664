"""Native TensorRT 10 engine: one serialized plan per batch size, name-based tensor I/O.

TensorRT 10 removed the bindings API, so a plan runs with ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3``. Device buffers are allocated once
per tensor at load time and reused for every batch; CUDA comes from pycuda (preferred)
or cuda-python's runtime bindings, whichever imports.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from app.engines.base import Engine
from app.errors import BadRequest, ConfigError, Unavailable

log = logging.getLogger(__name__)

TENSORRT_MISSING = (
    "TensorRT is not installed: pip install 'edgebatch[tensorrt]' (x86, tensorrt<11) "
    "or use JetPack's TensorRT on Jetson"
)
CUDA_BINDINGS_MISSING = (
    "No CUDA Python bindings for TensorRT buffers: pip install 'edgebatch[tensorrt]' (pycuda) "
    "or pip install cuda-python"
)


def import_tensorrt() -> Any:
    """Import ``tensorrt`` and insist on major version 10 (the API this engine speaks)."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise Unavailable(TENSORRT_MISSING) from exc
    version = str(getattr(trt, "__version__", "0"))
    if not version.startswith("10."):
        raise Unavailable(
            f"TensorRT {version} is installed but edgebatch speaks the TensorRT 10 API: "
            "pip install 'tensorrt>=10,<11' (x86) or use JetPack 6's TensorRT 10 on Jetson"
        )
    return trt


# --------------------------------------------------------------------------- CUDA access


class DeviceBuffer(Protocol):
    ptr: int
    nbytes: int

    def free(self) -> None: ...


class CudaApi(Protocol):
    """The few CUDA calls TensorRT needs from Python, over pycuda or cuda-python."""

    name: str

    def activated(self) -> contextlib.AbstractContextManager[None]: ...
    def alloc(self, nbytes: int) -> DeviceBuffer: ...
    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray: ...
    def new_stream(self) -> Any: ...
    def stream_handle(self, stream: Any) -> int: ...
    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None: ...
    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None: ...
    def synchronize(self, stream: Any) -> None: ...
    def destroy_stream(self, stream: Any) -> None: ...
    def device_info(self) -> tuple[str, str]: ...
    def release(self) -> None: ...


@dataclass
class _PyCudaBuffer:
    allocation: Any
    nbytes: int

    @property
    def ptr(self) -> int:
        return int(self.allocation)

    def free(self) -> None:
        self.allocation.free()


class PyCudaApi:
    """pycuda with the device's *primary* context, pushed around each call.

    TensorRT uses the runtime API, which binds to the primary context; pushing it per call
    (rather than ``pycuda.autoinit``) keeps it usable from whichever thread Serve runs us on.
    """

    name = "pycuda"

    def __init__(self, driver: Any, device_index: int = 0) -> None:
        self._cuda = driver
        driver.init()
        self._device = driver.Device(device_index)
        self._context = self._device.retain_primary_context()
        self._index = device_index

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        self._context.push()
        try:
            yield
        finally:
            self._context.pop()

    def alloc(self, nbytes: int) -> DeviceBuffer:
        return _PyCudaBuffer(self._cuda.mem_alloc(max(int(nbytes), 1)), int(nbytes))

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return self._cuda.pagelocked_empty(shape, dtype)  # pinned, so async copies are truly async

    def new_stream(self) -> Any:
        return self._cuda.Stream()

    def stream_handle(self, stream: Any) -> int:
        return int(stream.handle)

    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        self._cuda.memcpy_htod_async(dst.allocation, src, stream)  # type: ignore[attr-defined]

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        self._cuda.memcpy_dtoh_async(dst, src.allocation, stream)  # type: ignore[attr-defined]

    def synchronize(self, stream: Any) -> None:
        stream.synchronize()

    def destroy_stream(self, stream: Any) -> None:
        """pycuda frees a stream when it is garbage-collected."""

    def device_info(self) -> tuple[str, str]:
        major, minor = self._device.compute_capability()
        return str(self._device.name()), f"{major}.{minor}"

    def release(self) -> None:
        with contextlib.suppress(Exception):
            self._context.detach()


@dataclass
class _CudaRtBuffer:
    ptr: int
    nbytes: int
    _api: Any

    def free(self) -> None:
        self._api._check(self._api._rt.cudaFree(self.ptr), "cudaFree")


class CudaRtApi:
    """cuda-python's runtime bindings (``cudart``): every call returns ``(err, *values)``."""

    name = "cuda-python"

    def __init__(self, cudart: Any, device_index: int = 0) -> None:
        self._rt = cudart
        self._index = device_index
        self._check(cudart.cudaSetDevice(device_index), "cudaSetDevice")

    def _check(self, result: Any, what: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if err != self._rt.cudaError_t.cudaSuccess:
            raise RuntimeError(f"{what} failed: {err}")
        return values[0] if len(values) == 1 else tuple(values)

    @contextlib.contextmanager
    def activated(self) -> Iterator[None]:
        self._check(self._rt.cudaSetDevice(self._index), "cudaSetDevice")  # per thread
        yield

    def alloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self._check(self._rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc")
        return _CudaRtBuffer(int(ptr), int(nbytes), self)

    def host_empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.empty(shape, dtype)  # pageable: cudaMemcpyAsync still works, just not overlapped

    def new_stream(self) -> Any:
        return self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def stream_handle(self, stream: Any) -> int:
        return int(stream)

    def htod(self, dst: DeviceBuffer, src: np.ndarray, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(dst.ptr, src.ctypes.data, src.nbytes, kind, stream), "cudaMemcpyAsync")

    def dtoh(self, dst: np.ndarray, src: DeviceBuffer, stream: Any) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(dst.ctypes.data, src.ptr, dst.nbytes, kind, stream), "cudaMemcpyAsync")

    def synchronize(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def destroy_stream(self, stream: Any) -> None:
        self._check(self._rt.cudaStreamDestroy(stream), "cudaStreamDestroy")

    def device_info(self) -> tuple[str, str]:
        props = self._check(self._rt.cudaGetDeviceProperties(self._index), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.rstrip("\x00"), f"{props.major}.{props.minor}"

    def release(self) -> None:
        """The runtime's primary context outlives us; nothing to release."""


def load_cuda_api(device_index: int = 0) -> CudaApi:
    """pycuda if it imports, else cuda-python; Unavailable naming both when neither works."""
    try:
        import pycuda.driver as driver
    except ImportError:
        driver = None
    if driver is not None:
        try:
            return PyCudaApi(driver, device_index)
        except Exception as exc:  # pycuda raises its own LogicError/RuntimeError without a GPU
            raise Unavailable(f"CUDA device {device_index} is not usable through pycuda: {exc}") from exc
    cudart = None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        with contextlib.suppress(ImportError):
            from cuda import cudart  # type: ignore[no-redef]  # older cuda-python
    if cudart is None:
        raise Unavailable(CUDA_BINDINGS_MISSING)
    try:
        return CudaRtApi(cudart, device_index)
    except Exception as exc:
        raise Unavailable(f"CUDA device {device_index} is not usable through cuda-python: {exc}") from exc


# --------------------------------------------------------------------------- the engine


@dataclass
class _IoTensor:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    host: np.ndarray
    device: DeviceBuffer


class TensorRTEngine(Engine):
    """A deserialized TensorRT 10 plan with preallocated host/device buffers for its one batch size."""

    backend = "tensorrt"

    def __init__(self, options: dict | None = None, *, device_index: int = 0) -> None:
        self.options: dict = dict(options or {})
        self._device_index = int(self.options.get("device_index", device_index))
        self._cuda: CudaApi | None = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._stream_handle = 0
        self._inputs: list[_IoTensor] = []
        self._outputs: list[_IoTensor] = []
        self._plan_bytes = 0
        self._gpu_name = "unknown"
        self._lock = threading.Lock()  # one batch at a time: the buffers are shared

    def load(self, path: Path) -> None:
        trt = import_tensorrt()
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"TensorRT plan file not found: {path}")
        cuda = load_cuda_api(self._device_index)
        self._cuda = cuda
        with contextlib.suppress(Exception):
            self._gpu_name = cuda.device_info()[0]
        try:
            with cuda.activated():
                self._load_plan(trt, cuda, path)
        except Exception:
            self.close()
            raise

    def _load_plan(self, trt: Any, cuda: CudaApi, path: Path) -> None:
        plan = path.read_bytes()
        self._plan_bytes = len(plan)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise ConfigError(
                f"TensorRT could not deserialize {path.name}: plans only load on the TensorRT version and GPU "
                "model that built them; rebuild it on this node (model_registry.tensorrt_build)"
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise Unavailable(f"TensorRT could not create an execution context for {path.name} (out of GPU memory?)")

        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(input_names) != 1:
            raise ConfigError(f"{path.name} has inputs {input_names}; edgebatch engines take exactly one image input")
        for name in input_names:
            shape = self._resolve_input_shape(name)
            if not self._context.set_input_shape(name, shape):
                raise ConfigError(f"{path.name}: TensorRT refused input shape {shape} for {name!r}")

        self._stream = cuda.new_stream()
        self._stream_handle = cuda.stream_handle(self._stream)
        for name in names:
            is_input = name in input_names
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ConfigError(f"{path.name}: tensor {name!r} still has a dynamic shape {shape} after set_input_shape")
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            host = cuda.host_empty(shape, dtype)
            dev = cuda.alloc(host.nbytes)
            tensor = _IoTensor(name, is_input, shape, host, dev)
            (self._inputs if is_input else self._outputs).append(tensor)
            if not self._context.set_tensor_address(name, dev.ptr):
                raise Unavailable(f"TensorRT refused the device address for tensor {name!r}")

    def _resolve_input_shape(self, name: str) -> tuple[int, ...]:
        """The plan's static shape, or (for a dynamic batch axis) the profile's max or options['batch_size']."""
        shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
        if all(d >= 0 for d in shape):
            return shape
        _min, _opt, max_shape = (tuple(int(d) for d in s) for s in self._engine.get_tensor_profile_shape(name, 0))
        wanted = self.options.get("batch_size")
        if wanted is None:
            return max_shape
        if not _min[0] <= int(wanted) <= max_shape[0]:
            raise ConfigError(
                f"options['batch_size']={wanted} is outside the plan's profile {_min[0]}..{max_shape[0]}; "
                "build a plan for that batch size"
            )
        return (int(wanted), *max_shape[1:])

    @property
    def batch_size(self) -> int:
        return self._inputs[0].shape[0] if self._inputs else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self._inputs[0].shape if self._inputs else ()

    @property
    def device(self) -> str:
        return f"cuda:{self._device_index} ({self._gpu_name}, TensorRT)"

    def run(self, batch: np.ndarray) -> list[np.ndarray]:
        if self._context is None or self._cuda is None:
            raise Unavailable("the TensorRT engine is not loaded (closed, or load() was never called)")
        inp = self._inputs[0]
        if tuple(batch.shape) != inp.shape:
            raise BadRequest(
                f"batch shape {tuple(batch.shape)} does not match the plan input {inp.shape}; "
                "pad partial batches with run_padded"
            )
        cuda = self._cuda
        with self._lock, cuda.activated():
            np.copyto(inp.host, batch, casting="unsafe")  # float32 -> the plan's input dtype
            cuda.htod(inp.device, inp.host, self._stream)
            if not self._context.execute_async_v3(self._stream_handle):
                raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
            for out in self._outputs:
                cuda.dtoh(out.host, out.device, self._stream)
            cuda.synchronize(self._stream)
            # Copies: the pinned buffers are overwritten by the next batch.
            return [np.array(out.host, copy=True) for out in self._outputs]

    def memory_bytes(self) -> int:
        if self._engine is None:
            return 0
        activation = getattr(self._engine, "device_memory_size_v2", None)
        if activation is None:
            activation = getattr(self._engine, "device_memory_size", 0)
        buffers = sum(t.host.nbytes for t in (*self._inputs, *self._outputs))
        return int(self._plan_bytes + int(activation) + 2 * buffers)  # device + host copy of each buffer

    def close(self) -> None:
        cuda, self._cuda = self._cuda, None
        tensors, self._inputs, self._outputs = [*self._inputs, *self._outputs], [], []
        stream, self._stream = self._stream, None
        # Context before engine before runtime: TensorRT requires that destruction order.
        self._context = None
        self._engine = None
        self._runtime = None
        if cuda is None:
            return
        try:
            with cuda.activated():
                for t in tensors:
                    t.device.free()
                if stream is not None:
                    cuda.destroy_stream(stream)
        finally:
            cuda.release()
