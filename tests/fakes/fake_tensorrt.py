"""A fake ``tensorrt`` 10 module plus fake pycuda / cuda-python, recording and checking every call.

Why a fake: TensorRT needs an NVIDIA GPU, this project's CI has none. The fake is strict
where real TensorRT is strict (no execute before every I/O tensor has a valid device
address and the dynamic input shape is set; copies must fit their allocations) and
asynchronous where CUDA is: copies and kernels queue on a stream and only happen at
``synchronize``, so an engine that forgets to synchronise reads stale outputs.

"Device memory" is real host memory (ctypes buffers) whose addresses stand in for device
pointers, so both pycuda-style and cudart-style (raw pointer) copies are exact.

A fake plan is ``MAGIC`` + JSON describing the I/O tensors. Executing it writes, for every
output, ``np.resize(input.ravel() * 2, output_size)`` (exactly ``input * 2`` reshaped when
sizes agree), so results can be asserted.
"""

from __future__ import annotations

import ctypes
import enum
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"FAKETRT10\n"
FAKE_VERSION = "10.13.0.fake"

_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "UINT8": np.uint8}


class FakeCallError(AssertionError):
    """The code under test made a call real TensorRT/CUDA would reject (or crash on)."""


@dataclass
class FakeGpu:
    """Shared state of the fake GPU: allocations, streams and the ordered call log."""

    name: str = "Fake RTX 4000"
    compute_capability: tuple[int, int] = (8, 9)
    fast_fp16: bool = True
    calls: list[tuple[str, tuple]] = field(default_factory=list)
    allocations: dict[int, ctypes.Array] = field(default_factory=dict)
    freed: list[int] = field(default_factory=list)
    streams: dict[int, FakeStream] = field(default_factory=dict)
    context_depth: int = 0
    build_logs: list[str] = field(default_factory=list)

    def record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    # -- memory
    def malloc(self, nbytes: int) -> int:
        if nbytes <= 0:
            raise FakeCallError(f"cudaMalloc of {nbytes} bytes")
        buf = ctypes.create_string_buffer(int(nbytes))
        ptr = ctypes.addressof(buf)
        self.allocations[ptr] = buf
        return ptr

    def free(self, ptr: int) -> None:
        if ptr not in self.allocations:
            raise FakeCallError(f"free of {ptr:#x}: not allocated, or freed twice")
        del self.allocations[ptr]
        self.freed.append(ptr)

    def check_device_range(self, ptr: int, nbytes: int, what: str) -> None:
        if not isinstance(ptr, int):
            raise FakeCallError(f"{what}: device pointer must be an int, got {type(ptr).__name__}")
        buf = self.allocations.get(ptr)
        if buf is None:
            raise FakeCallError(f"{what}: {ptr:#x} is not a live device allocation")
        if nbytes > ctypes.sizeof(buf):
            raise FakeCallError(f"{what}: {nbytes} bytes do not fit the {ctypes.sizeof(buf)}-byte allocation")

    def device_array(self, ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.check_device_range(ptr, nbytes, "kernel access")
        return np.frombuffer(self.allocations[ptr], dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    # -- streams
    def new_stream(self) -> FakeStream:
        stream = FakeStream(self, handle=0x5000 + len(self.streams) * 16)
        self.streams[stream.handle] = stream
        return stream

    def stream(self, handle: int) -> FakeStream:
        if handle not in self.streams:
            raise FakeCallError(f"unknown CUDA stream handle {handle!r}")
        return self.streams[handle]


@dataclass
class FakeStream:
    gpu: FakeGpu
    handle: int
    pending: list[Callable[[], None]] = field(default_factory=list)

    def enqueue(self, work: Callable[[], None]) -> None:
        self.pending.append(work)

    def synchronize(self) -> None:
        self.gpu.record("synchronize", self.handle)
        work, self.pending = self.pending, []
        for w in work:
            w()


# --------------------------------------------------------------------------- fake pycuda


def make_fake_pycuda(gpu: FakeGpu) -> tuple[types.ModuleType, types.ModuleType]:
    """``pycuda`` and ``pycuda.driver`` over ``gpu``."""

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            self.ptr = gpu.malloc(nbytes)
            self.nbytes = nbytes

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            gpu.record("mem_free", self.ptr)
            gpu.free(self.ptr)

    class Stream:
        def __init__(self) -> None:
            self._s = gpu.new_stream()
            self.handle = self._s.handle
            gpu.record("Stream", self.handle)

        def synchronize(self) -> None:
            self._s.synchronize()

    class Context:
        def push(self) -> None:
            gpu.context_depth += 1
            gpu.record("ctx_push")

        def pop(self) -> None:
            if gpu.context_depth <= 0:
                raise FakeCallError("context pop without push")
            gpu.context_depth -= 1
            gpu.record("ctx_pop")

        def detach(self) -> None:
            gpu.record("ctx_detach")

    class Device:
        def __init__(self, index: int) -> None:
            if index != 0:
                raise RuntimeError(f"cuDeviceGet failed: invalid device ordinal {index}")
            self.index = index

        def name(self) -> str:
            return gpu.name

        def compute_capability(self) -> tuple[int, int]:
            return gpu.compute_capability

        def retain_primary_context(self) -> Context:
            gpu.record("retain_primary_context", self.index)
            return Context()

        @staticmethod
        def count() -> int:
            return 1

    def _need_context(what: str) -> None:
        if gpu.context_depth <= 0:
            raise FakeCallError(f"{what} without a current CUDA context (push the primary context first)")

    def mem_alloc(nbytes: int) -> DeviceAllocation:
        _need_context("mem_alloc")
        gpu.record("mem_alloc", int(nbytes))
        return DeviceAllocation(int(nbytes))

    def pagelocked_empty(shape: Any, dtype: Any) -> np.ndarray:
        gpu.record("pagelocked_empty", tuple(shape), np.dtype(dtype).name)
        return np.empty(shape, dtype)

    def memcpy_htod_async(dest: DeviceAllocation, src: np.ndarray, stream: Stream | None = None) -> None:
        _need_context("memcpy_htod_async")
        if stream is None:
            raise FakeCallError("memcpy_htod_async without a stream")
        gpu.check_device_range(int(dest), src.nbytes, "memcpy_htod_async")
        gpu.record("memcpy_htod_async", int(dest), src.nbytes, stream.handle)
        if not src.flags.c_contiguous:
            raise FakeCallError("memcpy_htod_async from a non-contiguous host array")
        # Like pinned memory on a real stream: the host bytes are read when the copy runs, not now.
        stream._s.enqueue(lambda: ctypes.memmove(int(dest), src.ctypes.data, src.nbytes))

    def memcpy_dtoh_async(dest: np.ndarray, src: DeviceAllocation, stream: Stream | None = None) -> None:
        _need_context("memcpy_dtoh_async")
        if stream is None:
            raise FakeCallError("memcpy_dtoh_async without a stream")
        if not dest.flags.c_contiguous or not dest.flags.writeable:
            raise FakeCallError("memcpy_dtoh_async into a non-contiguous or read-only host array")
        gpu.check_device_range(int(src), dest.nbytes, "memcpy_dtoh_async")
        gpu.record("memcpy_dtoh_async", int(src), dest.nbytes, stream.handle)
        stream._s.enqueue(lambda: ctypes.memmove(dest.ctypes.data, int(src), dest.nbytes))

    driver = types.ModuleType("pycuda.driver")
    driver.init = lambda flags=0: gpu.record("cuInit")
    driver.Device = Device
    driver.Stream = Stream
    driver.mem_alloc = mem_alloc
    driver.pagelocked_empty = pagelocked_empty
    driver.memcpy_htod_async = memcpy_htod_async
    driver.memcpy_dtoh_async = memcpy_dtoh_async
    package = types.ModuleType("pycuda")
    package.__path__ = []  # a package, so "import pycuda.driver" resolves
    package.driver = driver
    return package, driver


# --------------------------------------------------------------------------- fake cuda-python


def make_fake_cudart(gpu: FakeGpu) -> types.ModuleType:
    """``cuda.bindings.runtime``: every call returns ``(cudaError_t, *values)``."""

    class cudaError_t(enum.IntEnum):  # noqa: N801 - the real name
        cudaSuccess = 0  # noqa: N815 - CUDA's name
        cudaErrorInvalidValue = 1  # noqa: N815 - CUDA's name
        cudaErrorInvalidDevice = 101  # noqa: N815 - CUDA's name

    class cudaMemcpyKind(enum.IntEnum):  # noqa: N801
        cudaMemcpyHostToDevice = 1  # noqa: N815 - CUDA's name
        cudaMemcpyDeviceToHost = 2  # noqa: N815 - CUDA's name

    ok = cudaError_t.cudaSuccess

    class cudaStream_t:  # noqa: N801
        def __init__(self, stream: FakeStream) -> None:
            self._s = stream

        def __int__(self) -> int:
            return self._s.handle

    @dataclass
    class cudaDeviceProp:  # noqa: N801
        name: bytes
        major: int
        minor: int

    def cudaSetDevice(index: int) -> tuple:  # noqa: N802
        gpu.record("cudaSetDevice", index)
        return (ok if index == 0 else cudaError_t.cudaErrorInvalidDevice,)

    def cudaMalloc(nbytes: int) -> tuple:  # noqa: N802
        gpu.record("cudaMalloc", int(nbytes))
        return ok, gpu.malloc(int(nbytes))

    def cudaFree(ptr: int) -> tuple:  # noqa: N802
        gpu.record("cudaFree", ptr)
        gpu.free(ptr)
        return (ok,)

    def cudaStreamCreate() -> tuple:  # noqa: N802
        s = gpu.new_stream()
        gpu.record("cudaStreamCreate", s.handle)
        return ok, cudaStream_t(s)

    def cudaStreamDestroy(stream: cudaStream_t) -> tuple:  # noqa: N802
        gpu.record("cudaStreamDestroy", int(stream))
        return (ok,)

    def cudaStreamSynchronize(stream: cudaStream_t) -> tuple:  # noqa: N802
        gpu.stream(int(stream)).synchronize()
        return (ok,)

    def cudaMemcpyAsync(dst: int, src: int, count: int, kind: cudaMemcpyKind, stream: cudaStream_t) -> tuple:  # noqa: N802
        if kind == cudaMemcpyKind.cudaMemcpyHostToDevice:
            gpu.check_device_range(dst, count, "cudaMemcpyAsync H2D")
            gpu.record("memcpy_htod_async", dst, count, int(stream))
            gpu.stream(int(stream)).enqueue(lambda: ctypes.memmove(dst, src, count))
        elif kind == cudaMemcpyKind.cudaMemcpyDeviceToHost:
            gpu.check_device_range(src, count, "cudaMemcpyAsync D2H")
            gpu.record("memcpy_dtoh_async", src, count, int(stream))
            gpu.stream(int(stream)).enqueue(lambda: ctypes.memmove(dst, src, count))
        else:
            return (cudaError_t.cudaErrorInvalidValue,)
        return (ok,)

    def cudaGetDeviceProperties(index: int) -> tuple:  # noqa: N802
        major, minor = gpu.compute_capability
        return ok, cudaDeviceProp(gpu.name.encode(), major, minor)

    rt = types.ModuleType("cuda.bindings.runtime")
    for obj in (cudaError_t, cudaMemcpyKind, cudaStream_t, cudaSetDevice, cudaMalloc, cudaFree, cudaStreamCreate,
                cudaStreamDestroy, cudaStreamSynchronize, cudaMemcpyAsync, cudaGetDeviceProperties):
        setattr(rt, obj.__name__, obj)
    return rt


# --------------------------------------------------------------------------- fake tensorrt


def fake_plan(inputs: list[dict], outputs: list[dict], **meta: Any) -> bytes:
    """Serialise a fake plan: tensors as ``{"name", "shape", "dtype"}``; -1 marks a dynamic dim."""
    body = {"inputs": inputs, "outputs": outputs, **meta}
    return MAGIC + json.dumps(body).encode()


def make_fake_tensorrt(gpu: FakeGpu) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = FAKE_VERSION

    class DataType(enum.Enum):
        FLOAT = "FLOAT"
        HALF = "HALF"
        INT8 = "INT8"
        INT32 = "INT32"
        UINT8 = "UINT8"

    class TensorIOMode(enum.Enum):
        NONE = 0
        INPUT = 1
        OUTPUT = 2

    class MemoryPoolType(enum.Enum):
        WORKSPACE = 0

    class BuilderFlag(enum.Enum):
        FP16 = 0
        INT8 = 1

    class Logger:
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, severity: int = 2) -> None:
            self.severity = severity

    def nptype(dtype: DataType) -> type:
        return _DTYPES[dtype.value]

    # -- runtime side
    class ICudaEngine:
        def __init__(self, body: dict) -> None:
            self._tensors = [(t, TensorIOMode.INPUT) for t in body["inputs"]] + [
                (t, TensorIOMode.OUTPUT) for t in body["outputs"]
            ]
            self._profiles = body.get("profiles", {})
            self.body = body
            self.device_memory_size_v2 = 1 << 20

        @property
        def num_io_tensors(self) -> int:
            return len(self._tensors)

        def _find(self, name: str) -> tuple[dict, TensorIOMode]:
            for t, mode in self._tensors:
                if t["name"] == name:
                    return t, mode
            raise FakeCallError(f"no tensor named {name!r}")

        def get_tensor_name(self, index: int) -> str:
            gpu.record("get_tensor_name", index)
            return self._tensors[index][0]["name"]

        def get_tensor_mode(self, name: str) -> TensorIOMode:
            return self._find(name)[1]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return tuple(self._find(name)[0]["shape"])

        def get_tensor_dtype(self, name: str) -> DataType:
            return DataType(self._find(name)[0].get("dtype", "FLOAT"))

        def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
            if name not in self._profiles or profile_index != 0:
                raise FakeCallError(f"no optimisation profile {profile_index} for {name!r}")
            return [tuple(s) for s in self._profiles[name]]

        def create_execution_context(self) -> IExecutionContext:
            gpu.record("create_execution_context")
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine: ICudaEngine) -> None:
            self.engine = engine
            self.input_shapes: dict[str, tuple[int, ...]] = {}
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: Any) -> bool:
            shape = tuple(int(d) for d in shape)
            gpu.record("set_input_shape", name, shape)
            spec, mode = self.engine._find(name)
            if mode is not TensorIOMode.INPUT:
                raise FakeCallError(f"set_input_shape on output {name!r}")
            declared = spec["shape"]
            if len(shape) != len(declared) or any(d != s and d != -1 for d, s in zip(declared, shape)):
                return False
            profile = self.engine._profiles.get(name)
            if profile and not all(lo <= s <= hi for lo, s, hi in zip(profile[0], shape, profile[2])):
                return False
            self.input_shapes[name] = shape
            return True

        def _batch(self) -> int | None:
            for t in self.engine.body["inputs"]:
                if t["name"] in self.input_shapes:
                    return self.input_shapes[t["name"]][0]
            return None

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            spec, mode = self.engine._find(name)
            if mode is TensorIOMode.INPUT:
                return self.input_shapes.get(name, tuple(spec["shape"]))
            batch = self._batch()
            return tuple(batch if d == -1 and batch is not None else d for d in spec["shape"])

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            gpu.record("set_tensor_address", name, ptr)
            self.engine._find(name)
            if not isinstance(ptr, int):
                raise FakeCallError(f"set_tensor_address({name!r}) needs an int pointer, got {type(ptr).__name__}")
            gpu.check_device_range(ptr, 1, f"set_tensor_address({name!r})")
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            gpu.record("execute_async_v3", stream_handle)
            if not isinstance(stream_handle, int):
                raise FakeCallError(f"execute_async_v3 needs the stream handle as an int, got {type(stream_handle)}")
            stream = gpu.stream(stream_handle)
            tensors = [t for t, _ in self.engine._tensors]
            missing = [t["name"] for t in tensors if t["name"] not in self.addresses]
            if missing:
                raise FakeCallError(f"execute_async_v3 before set_tensor_address for {missing}")
            for t in self.engine.body["inputs"]:
                if -1 in t["shape"] and t["name"] not in self.input_shapes:
                    raise FakeCallError(f"execute_async_v3 before set_input_shape for dynamic input {t['name']!r}")
            shapes = {t["name"]: self.get_tensor_shape(t["name"]) for t in tensors}
            dtypes = {t["name"]: _DTYPES[t.get("dtype", "FLOAT")] for t in tensors}
            for name, shape in shapes.items():  # the kernel must fit every buffer
                gpu.check_device_range(self.addresses[name], int(np.prod(shape)) * np.dtype(dtypes[name]).itemsize, name)
            first = self.engine.body["inputs"][0]["name"]

            def kernel() -> None:
                x = gpu.device_array(self.addresses[first], shapes[first], dtypes[first]).astype(np.float64)
                for t in self.engine.body["outputs"]:
                    out = gpu.device_array(self.addresses[t["name"]], shapes[t["name"]], dtypes[t["name"]])
                    out[...] = np.resize(x.ravel() * 2.0, out.size).reshape(out.shape)

            stream.enqueue(kernel)
            return True

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            gpu.record("Runtime")

        def deserialize_cuda_engine(self, plan: bytes) -> ICudaEngine | None:
            gpu.record("deserialize_cuda_engine", len(plan))
            if not isinstance(plan, (bytes, bytearray, memoryview)):
                raise FakeCallError("deserialize_cuda_engine needs the plan bytes")
            plan = bytes(plan)
            if not plan.startswith(MAGIC):
                return None  # real TensorRT logs an error and returns None
            return ICudaEngine(json.loads(plan[len(MAGIC):]))

    # -- builder side
    @dataclass
    class ITensor:
        name: str
        shape: tuple[int, ...]
        dtype: DataType = DataType.FLOAT

    class INetworkDefinition:
        def __init__(self) -> None:
            self.inputs: list[ITensor] = []
            self.outputs: list[ITensor] = []

        @property
        def num_inputs(self) -> int:
            return len(self.inputs)

        @property
        def num_outputs(self) -> int:
            return len(self.outputs)

        def get_input(self, i: int) -> ITensor:
            return self.inputs[i]

        def get_output(self, i: int) -> ITensor:
            return self.outputs[i]

    @dataclass
    class ParserError:
        message: str

        def desc(self) -> str:
            return self.message

    class OnnxParser:
        """Reads graph inputs/outputs with the real ``onnx`` package; symbolic dims become -1."""

        def __init__(self, network: INetworkDefinition, logger: Logger) -> None:
            self.network = network
            self.errors: list[ParserError] = []

        @property
        def num_errors(self) -> int:
            return len(self.errors)

        def get_error(self, i: int) -> ParserError:
            return self.errors[i]

        def parse_from_file(self, path: str) -> bool:
            gpu.record("parse_from_file", path)
            return self.parse(Path(path).read_bytes())

        def parse(self, model: bytes, path: str | None = None) -> bool:
            import onnx
            from onnx import TensorProto

            try:
                proto = onnx.load_from_string(model)
                onnx.checker.check_model(proto)
            except Exception as exc:
                self.errors.append(ParserError(f"ModelImporter.cpp: failed to parse ONNX model: {exc}"))
                return False
            initializers = {i.name for i in proto.graph.initializer}
            dtype_map = {TensorProto.FLOAT: DataType.FLOAT, TensorProto.FLOAT16: DataType.HALF}

            def tensor(vi: Any) -> ITensor:
                dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                return ITensor(vi.name, dims, dtype_map.get(vi.type.tensor_type.elem_type, DataType.FLOAT))

            self.network.inputs = [tensor(v) for v in proto.graph.input if v.name not in initializers]
            self.network.outputs = [tensor(v) for v in proto.graph.output]
            return True

    class IOptimizationProfile:
        def __init__(self) -> None:
            self.shapes: dict[str, list[tuple[int, ...]]] = {}

        def set_shape(self, name: str, min: Any, opt: Any, max: Any) -> None:  # noqa: A002 - TRT's names
            shapes = [tuple(int(d) for d in s) for s in (min, opt, max)]
            gpu.record("profile.set_shape", name, *shapes)
            self.shapes[name] = shapes

    class IBuilderConfig:
        def __init__(self) -> None:
            self.pool_limits: dict[MemoryPoolType, int] = {}
            self.flags: set[BuilderFlag] = set()
            self.profiles: list[IOptimizationProfile] = []

        def set_memory_pool_limit(self, pool: MemoryPoolType, size: int) -> None:
            gpu.record("set_memory_pool_limit", pool.name, int(size))
            self.pool_limits[pool] = int(size)

        def set_flag(self, flag: BuilderFlag) -> None:
            gpu.record("set_flag", flag.name)
            self.flags.add(flag)

        def add_optimization_profile(self, profile: IOptimizationProfile) -> int:
            gpu.record("add_optimization_profile")
            self.profiles.append(profile)
            return len(self.profiles) - 1

    class Builder:
        def __init__(self, logger: Logger) -> None:
            gpu.record("Builder")

        @property
        def platform_has_fast_fp16(self) -> bool:
            return gpu.fast_fp16

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            gpu.record("create_network", flags)
            if flags != 0:
                raise FakeCallError("TensorRT 10: create_network(0); the EXPLICIT_BATCH flag is deprecated")
            return INetworkDefinition()

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def create_optimization_profile(self) -> IOptimizationProfile:
            return IOptimizationProfile()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> memoryview | None:
            gpu.record("build_serialized_network")
            profile = config.profiles[0].shapes if config.profiles else {}
            for t in network.inputs:
                if -1 in t.shape and t.name not in profile:
                    gpu.build_logs.append(f"Network has dynamic input {t.name} but no optimization profile")
                    return None

            def spec(t: ITensor) -> dict:
                # Like real plans, dynamic dims stay -1; the profile pins them at run time.
                return {"name": t.name, "shape": list(t.shape), "dtype": t.dtype.value}

            plan = fake_plan(
                [spec(t) for t in network.inputs],
                [spec(t) for t in network.outputs],
                profiles={k: [list(s) for s in v] for k, v in profile.items()},
                fp16=BuilderFlag.FP16 in config.flags,
                workspace=config.pool_limits.get(MemoryPoolType.WORKSPACE),
            )
            return memoryview(plan)

    for obj in (DataType, TensorIOMode, MemoryPoolType, BuilderFlag, Logger, nptype, Runtime, Builder, OnnxParser):
        setattr(trt, obj.__name__, obj)
    return trt


def install_fakes(monkeypatch: Any, *, cuda: str | None = "pycuda", gpu: FakeGpu | None = None) -> FakeGpu:
    """Put fake ``tensorrt`` and one fake CUDA binding ("pycuda", "cudart" or None) into ``sys.modules``.

    The bindings not chosen are set to ``None`` so their import fails even where real ones exist.
    """
    gpu = gpu or FakeGpu()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_tensorrt(gpu))
    blocked = ["pycuda", "pycuda.driver", "pycuda.autoinit", "cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"]
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)
    if cuda == "pycuda":
        package, driver = make_fake_pycuda(gpu)
        monkeypatch.setitem(sys.modules, "pycuda", package)
        monkeypatch.setitem(sys.modules, "pycuda.driver", driver)
    elif cuda == "cudart":
        rt = make_fake_cudart(gpu)
        cuda_pkg = types.ModuleType("cuda")
        cuda_pkg.__path__ = []
        bindings = types.ModuleType("cuda.bindings")
        bindings.__path__ = []
        bindings.runtime = rt
        cuda_pkg.bindings = bindings
        monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    elif cuda is not None:
        raise ValueError(f"cuda must be 'pycuda', 'cudart' or None, not {cuda!r}")
    return gpu
