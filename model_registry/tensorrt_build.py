"""Build one TensorRT 10 plan per batch size from an ONNX file, on the node that will run it.

Plans are tied to the TensorRT version and GPU model that built them, so each
``BuiltPlan`` records both; the registry tags variants with them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engines.tensorrt import import_tensorrt, load_cuda_api
from app.errors import ConfigError, Unavailable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltPlan:
    """One serialized plan and what it is only valid for."""

    path: Path
    batch_size: int
    input_shape: tuple[int, ...]
    precision: str  # "fp32" | "fp16"
    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def gpu_identity(device_index: int = 0) -> tuple[str, str]:
    """(name, compute capability) of the build GPU, or ("unknown", "unknown") without CUDA bindings."""
    try:
        cuda = load_cuda_api(device_index)
    except Unavailable as exc:
        log.warning("cannot name the GPU the plans are built on: %s", exc.message)
        return "unknown", "unknown"
    try:
        return cuda.device_info()
    except Exception as exc:  # a driver error must not stop the build
        log.warning("cannot name the GPU the plans are built on: %s", exc)
        return "unknown", "unknown"
    finally:
        cuda.release()


def _parse_onnx(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise ConfigError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors or ["no details"]))
    # The parser owns weights the network points at: the caller keeps both alive through the build.
    return network, parser


def _plan_input_shape(network: Any, batch: int, onnx_path: Path) -> tuple[str, tuple[int, ...], bool]:
    if network.num_inputs != 1:
        raise ConfigError(f"{onnx_path.name} has {network.num_inputs} inputs; edgebatch plans take exactly one image input")
    tensor = network.get_input(0)
    dims = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in dims[1:]):
        raise ConfigError(
            f"{onnx_path.name}: input {tensor.name!r} has dynamic image dimensions {dims}; export with a fixed size"
        )
    if dims[0] >= 0 and dims[0] != batch:
        raise ConfigError(
            f"{onnx_path.name} has a fixed batch size of {dims[0]}, so no plan for batch {batch} can be built from it; "
            "export the ONNX file with a dynamic batch axis"
        )
    return tensor.name, (batch, *dims[1:]), dims[0] < 0


def build_tensorrt_plans(
    onnx_path: Path | str,
    batch_sizes: list[int] | tuple[int, ...],
    out_dir: Path | str,
    *,
    fp16: bool = False,
    workspace_bytes: int = 1 << 30,
    device_index: int = 0,
) -> list[BuiltPlan]:
    """Serialize one plan per batch size (profile min = opt = max) into ``out_dir``."""
    trt = import_tensorrt()
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise ConfigError(f"ONNX file not found: {onnx_path}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise ConfigError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gpu_name, capability = gpu_identity(device_index)
    version = str(trt.__version__)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    use_fp16 = bool(fp16 and getattr(builder, "platform_has_fast_fp16", True))
    if fp16 and not use_fp16:
        log.warning("%s has no fast FP16; building fp32 plans instead", gpu_name)
    precision = "fp16" if use_fp16 else "fp32"

    plans: list[BuiltPlan] = []
    for batch in sizes:
        network, _parser = _parse_onnx(trt, builder, logger, onnx_path)
        name, shape, dynamic = _plan_input_shape(network, batch, onnx_path)
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
        if use_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        if dynamic:
            profile = builder.create_optimization_profile()
            profile.set_shape(name, shape, shape, shape)
            config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ConfigError(
                f"TensorRT failed to build {onnx_path.name} at batch {batch} (see the TensorRT log above); "
                "try a larger workspace_bytes or fp16=False"
            )
        path = out_dir / f"{onnx_path.stem}_b{batch}_{precision}.plan"
        path.write_bytes(bytes(serialized))
        log.info("built %s (%s, TensorRT %s, %s)", path.name, precision, version, gpu_name)
        plans.append(BuiltPlan(path, batch, shape, precision, version, gpu_name, capability))
    return plans
