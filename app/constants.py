"""Names and tables every layer shares, defined once.

Deployment and application names are what the Serve config YAML, the CLI, the
controller and the streams app use to find each other; the backend names and the
model-name rule are what configs validate against; the ONNX type table is what
engines, the v2 codec and the multi-model host translate tensor types with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from app.errors import EdgebatchError

# -- Serve applications and deployments ------------------------------------------
DETECTOR_APP = "edgebatch"
DETECTOR_DEPLOYMENT = "Detector"  # handle-only everywhere: reached through the gateway, readers, the router
GATEWAY_DEPLOYMENT = "Gateway"  # the `edgebatch` app's HTTP ingress in front of its Detector
DETECTOR_APP_IMPORT_PATH = "deployments.app:build_app"
CONTROLLER_APP = "edgebatch-controller"
CONTROLLER_DEPLOYMENT = "BatchController"
STREAMS_APP = "edgebatch-streams"
STREAMS_DEPLOYMENT = "StreamsIngress"
TENANCY_ROUTER_DEPLOYMENT = "ModelRouter"

# -- where control deployments run ---------------------------------------------------
# Ray gives the head node this resource (ray._common.constants.HEAD_NODE_RESOURCE_NAME); a replica
# that asks a sliver of it runs on the head, as Serve's own controller does: the router and the
# control apps must not land on an edge node that may leave.
HEAD_NODE_RESOURCE = "node:__internal_head__"
HEAD_PIN = {HEAD_NODE_RESOURCE: 0.001}

# -- streams through the detector ---------------------------------------------------
#: Frames a Ray stream reader takes from its stream's queue and has not delivered yet (pre-processing,
#: at the detector, post-processing): enough for the replica to batch across streams and to overlap
#: a reader's stages, few enough that a stream falling behind waits (and drops, with drop_oldest) in
#: its own queue instead of ageing in hand-offs.
READER_FRAMES_IN_FLIGHT = 3

# -- the console's live stream preview (one frame per stream, encoded only when asked) ------
PREVIEW_MAX_WIDTH = 640  # pixels: the preview is scaled down to this width
PREVIEW_JPEG_QUALITY = 70

# -- backends ---------------------------------------------------------------------
Backend = Literal["onnx", "tensorrt", "tflite", "edgetpu", "torch"]
BACKENDS: tuple[str, ...] = ("onnx", "tensorrt", "tflite", "edgetpu", "torch")
# the one torch the optional backend is tested with; never unpinned (DEVELOPERS.md)
TORCH_REQUIREMENT = "torch==2.13.0"

# -- the model-name rule (names reach MLflow and the per-node cache's paths) ---------
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MODEL_NAME_RULE = "must be letters, digits, '_', '-', '.'; no path separators or '..'"


def valid_model_name(name: str) -> bool:
    return bool(MODEL_NAME_RE.match(name)) and ".." not in name


def check_model_name(name: str) -> str:
    """``name`` unchanged, or ValueError with the rule (pydantic validators re-raise it per field)."""
    if not valid_model_name(name):
        raise ValueError(MODEL_NAME_RULE)
    return name


# -- ONNX tensor types ----------------------------------------------------------------
@dataclass(frozen=True)
class OnnxType:
    """One ONNX tensor type under its three names: ONNX Runtime's, the graph's enum, v2's."""

    ort: str  # NodeArg.type, e.g. "tensor(float)"
    elem_type: int  # onnx.TensorProto enum
    numpy: np.dtype
    datatype: str  # Open Inference Protocol v2 / Triton datatype


ONNX_TYPES: tuple[OnnxType, ...] = (
    OnnxType("tensor(float)", 1, np.dtype(np.float32), "FP32"),
    OnnxType("tensor(uint8)", 2, np.dtype(np.uint8), "UINT8"),
    OnnxType("tensor(int8)", 3, np.dtype(np.int8), "INT8"),
    OnnxType("tensor(uint16)", 4, np.dtype(np.uint16), "UINT16"),
    OnnxType("tensor(int16)", 5, np.dtype(np.int16), "INT16"),
    OnnxType("tensor(int32)", 6, np.dtype(np.int32), "INT32"),
    OnnxType("tensor(int64)", 7, np.dtype(np.int64), "INT64"),
    OnnxType("tensor(string)", 8, np.dtype(np.object_), "BYTES"),
    OnnxType("tensor(bool)", 9, np.dtype(np.bool_), "BOOL"),
    OnnxType("tensor(float16)", 10, np.dtype(np.float16), "FP16"),
    OnnxType("tensor(double)", 11, np.dtype(np.float64), "FP64"),
    OnnxType("tensor(uint32)", 12, np.dtype(np.uint32), "UINT32"),
    OnnxType("tensor(uint64)", 13, np.dtype(np.uint64), "UINT64"),
)
_BY_ORT = {t.ort: t for t in ONNX_TYPES}
_BY_ELEM = {t.elem_type: t for t in ONNX_TYPES}


class UnsupportedTensorType(EdgebatchError):
    """A model declares a tensor type this server cannot carry: the model file, not the client, is at fault."""

    status = 500


def onnx_type(ort: str) -> OnnxType:
    """The type for ONNX Runtime's ``NodeArg.type``; an unknown type is an error, never a silent FP32."""
    try:
        return _BY_ORT[ort]
    except KeyError:
        raise UnsupportedTensorType(
            f"ONNX tensor type {ort!r} is not supported; supported: {', '.join(sorted(_BY_ORT))}"
        ) from None


def onnx_type_of_elem(elem_type: int) -> OnnxType:
    """The type for an ONNX graph's ``TensorProto`` element enum; unknown is an error."""
    try:
        return _BY_ELEM[elem_type]
    except KeyError:
        raise UnsupportedTensorType(
            f"ONNX element type {elem_type} is not supported; supported: {sorted(_BY_ELEM)}"
        ) from None
