"""Tiny real model files for engine tests, built in-process (no torch, no TensorFlow).

The ONNX model is a 1x1 Conv + Sigmoid (plus a spatial mean as a second output), so
numpy can compute the expected answer exactly. The .tflite files are written with the
``tflite`` package's flatbuffer builder functions: one CONV_2D on a float32 NHWC input,
and one int8/uint8-quantised ADD, both loadable by LiteRT on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import flatbuffers
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class TinyConv:
    """Weights of the tiny 1x1 convolution shared by the ONNX and TFLite models."""

    weight: np.ndarray  # (C_out, C_in)
    bias: np.ndarray  # (C_out,)

    @classmethod
    def seeded(cls, c_in: int = 3, c_out: int = 4, seed: int = 0) -> TinyConv:
        rng = np.random.default_rng(seed)
        return cls(
            weight=rng.normal(0, 0.5, (c_out, c_in)).astype(np.float32),
            bias=rng.normal(0, 0.1, (c_out,)).astype(np.float32),
        )

    def conv_nchw(self, x: np.ndarray) -> np.ndarray:
        """Reference 1x1 conv on NCHW input."""
        return np.einsum("oc,nchw->nohw", self.weight, x) + self.bias[None, :, None, None]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


# --------------------------------------------------------------------------- ONNX


def make_onnx_conv(
    path: Path,
    *,
    batch: int | None = 2,
    channels: int = 3,
    height: int | str = 8,
    width: int | str = 8,
    conv: TinyConv | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Conv(1x1)+Sigmoid with outputs ``scores`` (N,Cout,H,W) and ``mean`` (N,Cout).

    ``batch=None`` writes a symbolic batch dimension ("N"); a string height or width a symbolic
    one (an Ultralytics ``dynamic=True`` export); ``metadata`` goes to ``metadata_props``.
    """
    conv = conv or TinyConv.seeded(c_in=channels)
    c_out = conv.weight.shape[0]
    n: int | str = "N" if batch is None else batch
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [n, channels, height, width])
    scores = helper.make_tensor_value_info("scores", TensorProto.FLOAT, [n, c_out, height, width])
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [n, c_out])
    w = numpy_helper.from_array(conv.weight.reshape(c_out, channels, 1, 1), "W")
    b = numpy_helper.from_array(conv.bias, "B")
    axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["images", "W", "B"], ["conv"], kernel_shape=[1, 1]),
        helper.make_node("Sigmoid", ["conv"], ["scores"]),
        helper.make_node("ReduceMean", ["scores", "axes"], ["mean"], keepdims=0),
    ]
    graph = helper.make_graph(nodes, "tiny_conv", [x], [scores, mean], initializer=[w, b, axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, str(path))
    return path


def onnx_reference(x: np.ndarray, conv: TinyConv | None = None) -> tuple[np.ndarray, np.ndarray]:
    conv = conv or TinyConv.seeded(c_in=x.shape[1])
    scores = sigmoid(conv.conv_nchw(x.astype(np.float64)))
    return scores, scores.mean(axis=(2, 3))


# --------------------------------------------------------------------------- TFLite

# Enum values from the TFLite schema (tflite.BuiltinOperator / TensorType / BuiltinOptions).
import tflite  # noqa: E402
from tflite.BuiltinOperator import BuiltinOperator  # noqa: E402
from tflite.BuiltinOptions import BuiltinOptions  # noqa: E402
from tflite.Padding import Padding  # noqa: E402
from tflite.TensorType import TensorType  # noqa: E402


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: int  # tflite TensorType
    data: bytes | None = None  # constant contents, else None
    scale: float | None = None
    zero_point: int | None = None
    shape_signature: tuple[int, ...] | None = None


def _int_vector(builder: flatbuffers.Builder, start_fn, values) -> int:
    start_fn(builder, len(values))
    for v in reversed(values):
        builder.PrependInt32(int(v))
    return builder.EndVector()


def _write_tflite(
    path: Path,
    tensors: list[_TensorSpec],
    op_code: int,
    op_version: int,
    op_inputs: list[int],
    op_outputs: list[int],
    graph_inputs: list[int],
    graph_outputs: list[int],
    options_type: int,
    write_options,
) -> Path:
    """Serialise one-subgraph, one-operator model with the schema's builder functions."""
    b = flatbuffers.Builder(1024)

    # Buffers: index 0 is the schema's empty sentinel; each tensor gets its own buffer.
    buffer_offsets = []
    for spec in [None, *tensors]:
        data_off = None
        if spec is not None and spec.data is not None:
            b.StartVector(1, len(spec.data), 16)
            for byte in reversed(spec.data):
                b.PrependUint8(byte)
            data_off = b.EndVector()
        tflite.BufferStart(b)
        if data_off is not None:
            tflite.BufferAddData(b, data_off)
        buffer_offsets.append(tflite.BufferEnd(b))

    tensor_offsets = []
    for i, spec in enumerate(tensors):
        name = b.CreateString(spec.name)
        shape = _int_vector(b, tflite.TensorStartShapeVector, spec.shape)
        signature = None
        if spec.shape_signature is not None:
            signature = _int_vector(b, tflite.TensorStartShapeSignatureVector, spec.shape_signature)
        quant = None
        if spec.scale is not None:
            tflite.QuantizationParametersStartScaleVector(b, 1)
            b.PrependFloat32(spec.scale)
            scale_vec = b.EndVector()
            tflite.QuantizationParametersStartZeroPointVector(b, 1)
            b.PrependInt64(int(spec.zero_point or 0))
            zp_vec = b.EndVector()
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale_vec)
            tflite.QuantizationParametersAddZeroPoint(b, zp_vec)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        if signature is not None:
            tflite.TensorAddShapeSignature(b, signature)
        tflite.TensorAddType(b, spec.dtype)
        tflite.TensorAddBuffer(b, i + 1)
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        tensor_offsets.append(tflite.TensorEnd(b))

    options = write_options(b)
    op_in = _int_vector(b, tflite.OperatorStartInputsVector, op_inputs)
    op_out = _int_vector(b, tflite.OperatorStartOutputsVector, op_outputs)
    tflite.OperatorStart(b)
    tflite.OperatorAddOpcodeIndex(b, 0)
    tflite.OperatorAddInputs(b, op_in)
    tflite.OperatorAddOutputs(b, op_out)
    tflite.OperatorAddBuiltinOptionsType(b, options_type)
    tflite.OperatorAddBuiltinOptions(b, options)
    operator = tflite.OperatorEnd(b)

    tflite.SubGraphStartTensorsVector(b, len(tensor_offsets))
    for off in reversed(tensor_offsets):
        b.PrependUOffsetTRelative(off)
    tensors_vec = b.EndVector()
    sg_in = _int_vector(b, tflite.SubGraphStartInputsVector, graph_inputs)
    sg_out = _int_vector(b, tflite.SubGraphStartOutputsVector, graph_outputs)
    tflite.SubGraphStartOperatorsVector(b, 1)
    b.PrependUOffsetTRelative(operator)
    ops_vec = b.EndVector()
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, sg_in)
    tflite.SubGraphAddOutputs(b, sg_out)
    tflite.SubGraphAddOperators(b, ops_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)

    tflite.OperatorCodeStart(b)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(op_code, 127))
    tflite.OperatorCodeAddBuiltinCode(b, op_code)
    tflite.OperatorCodeAddVersion(b, op_version)
    opcode = tflite.OperatorCodeEnd(b)

    tflite.ModelStartOperatorCodesVector(b, 1)
    b.PrependUOffsetTRelative(opcode)
    opcodes_vec = b.EndVector()
    tflite.ModelStartSubgraphsVector(b, 1)
    b.PrependUOffsetTRelative(subgraph)
    subgraphs_vec = b.EndVector()
    tflite.ModelStartBuffersVector(b, len(buffer_offsets))
    for off in reversed(buffer_offsets):
        b.PrependUOffsetTRelative(off)
    buffers_vec = b.EndVector()
    description = b.CreateString("edgebatch tiny test model")

    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, 3)
    tflite.ModelAddOperatorCodes(b, opcodes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, description)
    tflite.ModelAddBuffers(b, buffers_vec)
    model = tflite.ModelEnd(b)
    b.Finish(model, file_identifier=b"TFL3")

    path = Path(path)
    path.write_bytes(bytes(b.Output()))
    return path


def make_tflite_conv(
    path: Path,
    *,
    batch: int = 2,
    height: int = 8,
    width: int = 8,
    conv: TinyConv | None = None,
    dynamic_batch: bool = False,
) -> Path:
    """A float32 CONV_2D (1x1, VALID, no activation) on an NHWC (B,H,W,3) input.

    Output (B,H,W,Cout) equals ``TinyConv.conv_nchw`` transposed to NHWC.
    """
    conv = conv or TinyConv.seeded()
    c_out, c_in = conv.weight.shape
    sig = (-1, height, width, c_in) if dynamic_batch else None
    out_sig = (-1, height, width, c_out) if dynamic_batch else None
    tensors = [
        _TensorSpec("images", (batch, height, width, c_in), TensorType.FLOAT32, shape_signature=sig),
        _TensorSpec("filter", (c_out, 1, 1, c_in), TensorType.FLOAT32, data=conv.weight.astype("<f4").tobytes()),
        _TensorSpec("bias", (c_out,), TensorType.FLOAT32, data=conv.bias.astype("<f4").tobytes()),
        _TensorSpec("scores", (batch, height, width, c_out), TensorType.FLOAT32, shape_signature=out_sig),
    ]

    def options(b: flatbuffers.Builder) -> int:
        tflite.Conv2DOptionsStart(b)
        tflite.Conv2DOptionsAddPadding(b, Padding.VALID)
        tflite.Conv2DOptionsAddStrideW(b, 1)
        tflite.Conv2DOptionsAddStrideH(b, 1)
        tflite.Conv2DOptionsAddDilationWFactor(b, 1)
        tflite.Conv2DOptionsAddDilationHFactor(b, 1)
        return tflite.Conv2DOptionsEnd(b)

    return _write_tflite(
        path, tensors, BuiltinOperator.CONV_2D, 1, [0, 1, 2], [3], [0], [3], BuiltinOptions.Conv2DOptions, options
    )


@dataclass(frozen=True)
class QuantParams:
    """Per-tensor affine quantisation of the quantised ADD model: real = scale * (q - zero_point)."""

    dtype: str  # "int8" | "uint8"
    in_scale: float
    in_zero_point: int
    out_scale: float
    out_zero_point: int


def make_tflite_quantized_add(
    path: Path, *, batch: int = 1, height: int = 4, width: int = 4, channels: int = 3, dtype: str = "int8"
) -> tuple[Path, QuantParams]:
    """A quantised ADD(x, x) on an NHWC input: real output = 2 * real input, as the EdgeTPU compiler expects.

    Input covers 0..1 (scale 1/255); output covers 0..2 (scale 2/255).
    """
    if dtype == "int8":
        tt, in_zp, out_zp = TensorType.INT8, -128, -128
    elif dtype == "uint8":
        tt, in_zp, out_zp = TensorType.UINT8, 0, 0
    else:
        raise ValueError(f"dtype must be int8 or uint8, not {dtype!r}")
    q = QuantParams(dtype, 1.0 / 255.0, in_zp, 2.0 / 255.0, out_zp)
    shape = (batch, height, width, channels)
    tensors = [
        _TensorSpec("images", shape, tt, scale=q.in_scale, zero_point=q.in_zero_point),
        _TensorSpec("doubled", shape, tt, scale=q.out_scale, zero_point=q.out_zero_point),
    ]

    def options(b: flatbuffers.Builder) -> int:
        tflite.AddOptionsStart(b)
        return tflite.AddOptionsEnd(b)

    version = 2 if dtype == "int8" else 1
    out = _write_tflite(path, tensors, BuiltinOperator.ADD, version, [0, 0], [1], [0], [1], BuiltinOptions.AddOptions, options)
    return out, q
