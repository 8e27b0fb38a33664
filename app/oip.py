"""Open Inference Protocol v2 codec (KServe v2 / Triton HTTP/REST) with Triton's
binary tensor data extension.

Pure Python so the FastAPI routes stay thin and an unmodified ``tritonclient.http``
client works against us. The routes own HTTP; this module owns bytes <-> arrays and
the validation that turns a wrong request into a 400 that names the problem.

Binary extension, both directions: the HTTP header ``Inference-Header-Content-Length: N``
says the first N body bytes are the JSON header; the rest is the raw tensors concatenated
in tensor order, each tensor's byte count in its ``parameters.binary_data_size``. Raw data
is little-endian, row-major; BYTES elements are each a 4-byte little-endian length then
the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.errors import BadRequest, ConfigError, EdgebatchError

#: The header both sides use to say how long the JSON part of a binary body is.
INFERENCE_HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"
CONTENT_TYPE_JSON = "application/json"
CONTENT_TYPE_BINARY = "application/octet-stream"
BINARY_TENSOR_DATA_EXTENSION = "binary_tensor_data"

#: v2 datatype -> numpy dtype. BYTES is held as an object array of ``bytes``.
DATATYPE_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}


_FIXED_SIZE_DATATYPES = frozenset(DATATYPE_TO_NUMPY) - {"BYTES"}


def numpy_to_datatype(dtype: np.dtype | type) -> str:
    """The v2 datatype for a numpy dtype; str/bytes/object arrays are BYTES.

    Raises ``EdgebatchError`` (500): an unsupported dtype here is a server bug, not
    the client's fault.
    """
    dt = np.dtype(dtype)
    if dt.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in DATATYPE_TO_NUMPY.items():
        if name != "BYTES" and candidate == dt.newbyteorder("="):
            return name
    raise EdgebatchError(
        f"numpy dtype {dt} has no Open Inference Protocol v2 datatype; "
        f"supported: {', '.join(DATATYPE_TO_NUMPY)}"
    )


def datatype_to_numpy(datatype: str) -> np.dtype:
    """The numpy dtype for a v2 datatype; BadRequest naming the unknown type."""
    try:
        return DATATYPE_TO_NUMPY[datatype]
    except (KeyError, TypeError):
        raise BadRequest(
            f"unknown datatype {datatype!r}; expected one of {', '.join(DATATYPE_TO_NUMPY)}"
        ) from None


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as v2 metadata reports it.

    ``shape`` is the full shape including the batch dimension; -1 marks a dimension
    that may take any size (the batch dimension of a batching model is -1).
    """

    name: str
    datatype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if self.datatype not in DATATYPE_TO_NUMPY:
            raise ConfigError(
                f"tensor {self.name!r}: datatype {self.datatype!r} is not a v2 datatype; "
                f"expected one of {', '.join(DATATYPE_TO_NUMPY)}"
            )
        if any(d < -1 for d in self.shape):
            raise ConfigError(
                f"tensor {self.name!r}: shape {list(self.shape)} has a dimension below -1; "
                "use -1 for a variable dimension"
            )

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ModelSignature:
    """What a served model accepts and returns; the codec validates requests against it.

    ``max_batch_size`` > 0 caps the first dimension of every input (Triton's rule);
    0 means the model does not batch and no cap applies.
    """

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int = 0

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> TensorSpec | None:
        return next((t for t in self.outputs if t.name == name), None)


def model_metadata(sig: ModelSignature) -> dict[str, Any]:
    """Body of ``GET /v2/models/{name}[/versions/{v}]``."""
    return {
        "name": sig.name,
        "versions": [str(v) for v in sig.versions],
        "platform": sig.platform,
        "inputs": [t.to_json() for t in sig.inputs],
        "outputs": [t.to_json() for t in sig.outputs],
    }


def server_metadata(
    name: str, version: str, extensions: Sequence[str] = ()
) -> dict[str, Any]:
    """Body of ``GET /v2``; always advertises binary_tensor_data since this codec speaks it."""
    exts = list(extensions)
    if BINARY_TENSOR_DATA_EXTENSION not in exts:
        exts.insert(0, BINARY_TENSOR_DATA_EXTENSION)
    return {"name": name, "version": version, "extensions": exts}


def error_body(message: str) -> dict[str, str]:
    """The v2 error form; tritonclient raises InferenceServerException(msg=body["error"])."""
    return {"error": message}


@dataclass
class InferRequest:
    """A decoded, validated inference request.

    ``outputs`` is None when the client asked for all outputs; otherwise
    (name, binary) pairs in request order. ``binary_data_output`` is the default
    binary flag (``parameters.binary_data_output``) for outputs without their own.
    """

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[tuple[str, bool]] | None = None
    binary_data_output: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- decode


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive header lookup: plain dicts in tests, Starlette Headers in routes."""
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, val in headers.items():
        if key.lower() == lname:
            return val
    return None


MAX_DECOMPRESSED_BYTES = 256 * 1024 * 1024


def _decompress(body: bytes, headers: Mapping[str, str], limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """Undo tritonclient's ``request_compression_algorithm`` (gzip or deflate), refused with 413 as
    soon as the inflated bytes pass ``limit`` (the deployment's max_body_bytes)."""
    from app.security.bodies import inflate

    encoding = (_header(headers, "Content-Encoding") or "identity").strip().lower()
    if encoding in ("gzip", "deflate"):
        return inflate(body, encoding, limit)
    if encoding in ("identity", ""):
        return body
    raise BadRequest(
        f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none"
    )


def _split_body(body: bytes, headers: Mapping[str, str]) -> tuple[dict[str, Any], memoryview]:
    """Separate the JSON header from the binary tail (empty when no binary extension)."""
    raw_len = _header(headers, INFERENCE_HEADER_CONTENT_LENGTH)
    if raw_len is None:
        json_len = len(body)
    else:
        try:
            json_len = int(str(raw_len).strip())
        except ValueError:
            raise BadRequest(
                f"{INFERENCE_HEADER_CONTENT_LENGTH} must be an integer byte count, got {raw_len!r}"
            ) from None
        if json_len < 0:
            raise BadRequest(
                f"{INFERENCE_HEADER_CONTENT_LENGTH} must not be negative, got {json_len}"
            )
        if json_len > len(body):
            raise BadRequest(
                f"{INFERENCE_HEADER_CONTENT_LENGTH} is {json_len} but the body has only "
                f"{len(body)} bytes"
            )
    from app.security.bodies import loads

    view = memoryview(body)
    where = (
        f"the first {json_len} bytes (the {INFERENCE_HEADER_CONTENT_LENGTH})"
        if raw_len is not None
        else "request body"
    )
    header = loads(bytes(view[:json_len]), what=where)
    if not isinstance(header, dict):
        raise BadRequest(
            f"malformed request: the JSON must be an object, got {type(header).__name__}"
        )
    return header, view[json_len:]


def _shape_of(tensor: Mapping[str, Any], name: str) -> tuple[int, ...]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise BadRequest(
            f"input {name!r}: 'shape' must be a list of non-negative integers, got {shape!r}"
        )
    return tuple(shape)


def _check_against_spec(
    name: str, datatype: str, shape: tuple[int, ...], spec: TensorSpec, sig: ModelSignature
) -> None:
    if datatype != spec.datatype:
        raise BadRequest(
            f"input {name!r}: datatype mismatch, expected {spec.datatype}, got {datatype}"
        )
    if len(shape) != len(spec.shape) or any(
        want != -1 and want != got for want, got in zip(spec.shape, shape)
    ):
        raise BadRequest(
            f"input {name!r}: shape mismatch, expected {list(spec.shape)} "
            f"(-1 = any size), got {list(shape)}"
        )
    if sig.max_batch_size > 0 and shape and shape[0] > sig.max_batch_size:
        raise BadRequest(
            f"input {name!r}: batch size {shape[0]} exceeds max_batch_size "
            f"{sig.max_batch_size} of model {sig.name!r}"
        )


def _decode_bytes_elements(raw: memoryview, count: int, name: str) -> list[bytes]:
    """Parse ``count`` length-prefixed elements that must fill ``raw`` exactly."""
    items: list[bytes] = []
    offset = 0
    total = len(raw)
    while offset < total:
        if offset + 4 > total:
            raise BadRequest(
                f"input {name!r}: BYTES data is truncated: element {len(items)} needs a "
                f"4-byte length prefix at offset {offset} but only {total - offset} bytes remain"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > total:
            raise BadRequest(
                f"input {name!r}: BYTES element {len(items)} declares {length} bytes but "
                f"only {total - offset} remain"
            )
        items.append(bytes(raw[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise BadRequest(
            f"input {name!r}: data length does not match shape, expected {count} BYTES "
            f"elements, got {len(items)}"
        )
    return items


def _from_binary(
    raw: memoryview, datatype: str, shape: tuple[int, ...], name: str
) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = _decode_bytes_elements(raw, count, name)
        return arr.reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    expected = count * dtype.itemsize
    if len(raw) != expected:
        raise BadRequest(
            f"input {name!r}: data length does not match shape, expected {expected} bytes "
            f"({count} x {datatype} for shape {list(shape)}), got binary_data_size {len(raw)}"
        )
    # Copy: the wire is little-endian and possibly unaligned, and the pipeline may
    # normalise in place, so it gets an aligned, writable, native-order array.
    wire = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count)
    return wire.astype(dtype, copy=True).reshape(shape)


def _flatten_strings(data: Any, name: str, out: list[bytes]) -> None:
    if isinstance(data, list):
        for item in data:
            _flatten_strings(item, name, out)
    elif isinstance(data, str):
        out.append(data.encode("utf-8"))
    else:
        raise BadRequest(
            f"input {name!r}: BYTES data in JSON must be strings, got {type(data).__name__} "
            f"{data!r}; send raw bytes with the binary extension"
        )


_KIND_WORDS = {"b": "true/false", "i": "integers", "u": "integers", "f": "numbers"}


def _json_scalar_ok(value: Any, target_kind: str) -> bool:
    """Whether one JSON scalar may fill a tensor of ``target_kind`` (Triton's rules)."""
    if target_kind == "b":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if target_kind in "iu":
        return isinstance(value, int)
    return isinstance(value, (int, float))


def _first_bad_scalar(data: Any, target_kind: str) -> tuple[bool, Any]:
    """(found, element): the first element that may not fill the tensor, for the message."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif not _json_scalar_ok(item, target_kind):
            return True, item
    return False, None


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    count = math.prod(shape)
    if not isinstance(data, list):
        raise BadRequest(
            f"input {name!r}: 'data' must be a (flat or nested) list, got {type(data).__name__}"
        )
    if datatype == "BYTES":
        items: list[bytes] = []
        _flatten_strings(data, name, items)
        if len(items) != count:
            raise BadRequest(
                f"input {name!r}: data length does not match shape, expected {count} "
                f"elements for shape {list(shape)}, got {len(items)}"
            )
        arr = np.empty(count, dtype=object)
        arr[:] = items
        return arr.reshape(shape)

    dtype = DATATYPE_TO_NUMPY[datatype]
    try:
        parsed = np.array(data)
    except OverflowError:
        parsed = np.array(data, dtype=object)
    except ValueError as exc:  # ragged nesting
        raise BadRequest(f"input {name!r}: 'data' is a ragged nested list: {exc}") from None
    if parsed.size != count:
        raise BadRequest(
            f"input {name!r}: data length does not match shape, expected {count} elements "
            f"for shape {list(shape)}, got {parsed.size}"
        )
    if count == 0:
        return np.empty(shape, dtype=dtype)
    flat = parsed.reshape(-1)
    # numpy's own type inference is the fast path (one C pass); object arrays (huge
    # ints, None, mixed types) fall back to checking each element.
    fast_ok = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}[dtype.kind]
    if parsed.dtype.kind == "O":
        ok = all(_json_scalar_ok(v, dtype.kind) for v in flat)
    else:
        ok = parsed.dtype.kind in fast_ok
    if not ok:
        found, bad = _first_bad_scalar(data, dtype.kind)
        if not found:  # valid ints that numpy widened to float or nested raggedly
            parsed = np.array(data, dtype=object)
            flat = parsed.reshape(-1)
            if not all(_json_scalar_ok(v, dtype.kind) for v in flat):
                raise BadRequest(f"input {name!r}: 'data' is a ragged nested list")
            ok = True
    if not ok:
        raise BadRequest(
            f"input {name!r}: {datatype} data must be {_KIND_WORDS[dtype.kind]}, "
            f"got {type(bad).__name__} {bad!r}"
        )
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = int(flat.min()), int(flat.max())
        if lo < info.min or hi > info.max:
            raise BadRequest(
                f"input {name!r}: {datatype} data out of range, expected values in "
                f"[{info.min}, {info.max}], got min {lo} max {hi}"
            )
        if parsed.dtype.kind == "O":
            flat = np.array([int(v) for v in flat], dtype=dtype)
        return flat.astype(dtype).reshape(shape)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            out = flat.astype(dtype)
    except OverflowError:
        out = None
    if dtype.kind == "f" and (out is None or not np.isfinite(out).all()):
        raise BadRequest(
            f"input {name!r}: {datatype} data holds a number out of range (the largest finite "
            f"{datatype} is {float(np.finfo(dtype).max):.4g}); send finite values"
        )
    return out.reshape(shape)


def _decode_outputs(
    header: Mapping[str, Any], sig: ModelSignature, default_binary: bool
) -> list[tuple[str, bool]] | None:
    requested = header.get("outputs")
    if requested is None:
        return None
    if not isinstance(requested, list):
        raise BadRequest(f"'outputs' must be a list, got {type(requested).__name__}")
    result: list[tuple[str, bool]] = []
    seen: set[str] = set()
    names = [t.name for t in sig.outputs]
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest(f"each requested output needs a string 'name', got {entry!r}")
        name = entry["name"]
        if sig.output(name) is None:
            raise BadRequest(
                f"unknown output {name!r} requested from model {sig.name!r}; "
                f"expected one of {names}"
            )
        if name in seen:
            raise BadRequest(f"output {name!r} is requested more than once")
        seen.add(name)
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"output {name!r}: 'parameters' must be an object")
        for unsupported in ("shared_memory_region", "classification"):
            if unsupported in params:
                raise BadRequest(
                    f"output {name!r}: parameter {unsupported!r} is not supported by this server"
                )
        binary = params.get("binary_data", default_binary)
        if not isinstance(binary, bool):
            raise BadRequest(
                f"output {name!r}: parameters.binary_data must be true or false, got {binary!r}"
            )
        result.append((name, binary))
    return result


def decode_infer_request(
    body: bytes, headers: Mapping[str, str], sig: ModelSignature, max_bytes: int = MAX_DECOMPRESSED_BYTES
) -> InferRequest:
    """Decode a v2 infer request (plain JSON or binary extension) and validate it against ``sig``.

    ``max_bytes`` bounds the body after decompression. Floating-point inputs must be finite
    (NaN and infinities are a 400), so replies never carry non-standard JSON tokens.

    Every problem is a BadRequest whose message names the input and the expected vs
    received value, so the client sees a 400 it can act on.
    """
    body = _decompress(body if isinstance(body, bytes) else bytes(body), headers, max_bytes)
    header, tail = _split_body(body, headers)

    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"'id' must be a string, got {type(request_id).__name__}")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"'parameters' must be an object, got {type(parameters).__name__}")
    default_binary = parameters.get("binary_data_output", False)
    if not isinstance(default_binary, bool):
        raise BadRequest(
            f"parameters.binary_data_output must be true or false, got {default_binary!r}"
        )

    raw_inputs = header.get("inputs")
    if not isinstance(raw_inputs, list):
        raise BadRequest(
            f"malformed request: 'inputs' must be a list of tensors, got {raw_inputs!r}"
        )
    expected_names = [t.name for t in sig.inputs]
    given_names: list[str] = []
    for tensor in raw_inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise BadRequest(f"each input needs a string 'name', got {tensor!r}")
        name = tensor["name"]
        if sig.input(name) is None:
            raise BadRequest(
                f"unknown input {name!r} for model {sig.name!r}; expected inputs {expected_names}"
            )
        if name in given_names:
            raise BadRequest(f"input {name!r} is given more than once")
        given_names.append(name)
    if len(given_names) != len(expected_names):
        missing = [n for n in expected_names if n not in given_names]
        raise BadRequest(
            f"model {sig.name!r} expects {len(expected_names)} inputs {expected_names}, "
            f"got {len(given_names)} {given_names}; missing input(s) {missing}"
        )

    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in raw_inputs:
        name = tensor["name"]
        spec = sig.input(name)
        assert spec is not None  # checked above
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str):
            raise BadRequest(f"input {name!r}: 'datatype' must be a string, got {datatype!r}")
        datatype_to_numpy(datatype)
        shape = _shape_of(tensor, name)
        _check_against_spec(name, datatype, shape, spec, sig)

        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise BadRequest(f"input {name!r}: 'parameters' must be an object")
        if "shared_memory_region" in params:
            raise BadRequest(
                f"input {name!r}: shared memory is not supported by this server; "
                "send the data in the body"
            )
        size = params.get("binary_data_size")
        if size is not None:
            if "data" in tensor:
                raise BadRequest(
                    f"input {name!r}: has both 'data' and parameters.binary_data_size; send one"
                )
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise BadRequest(
                    f"input {name!r}: parameters.binary_data_size must be a non-negative "
                    f"integer, got {size!r}"
                )
            if offset + size > len(tail):
                raise BadRequest(
                    f"input {name!r}: binary_data_size {size} at offset {offset} runs past the "
                    f"{len(tail)} bytes of binary data after the JSON header"
                    + (
                        ""
                        if _header(headers, INFERENCE_HEADER_CONTENT_LENGTH)
                        else f"; is the {INFERENCE_HEADER_CONTENT_LENGTH} header missing?"
                    )
                )
            inputs[name] = _from_binary(tail[offset : offset + size], datatype, shape, name)
            if inputs[name].dtype.kind == "f" and not np.isfinite(inputs[name]).all():
                raise BadRequest(f"input {name!r}: binary {datatype} data holds NaN or infinity; send finite values")
            offset += size
        elif "data" in tensor:
            inputs[name] = _from_json(tensor["data"], datatype, shape, name)
        else:
            raise BadRequest(
                f"input {name!r}: no data; give 'data' or parameters.binary_data_size"
            )
    if offset != len(tail):
        raise BadRequest(
            f"binary data after the JSON header is {len(tail)} bytes but the inputs' "
            f"binary_data_size add up to {offset}"
        )

    return InferRequest(
        id=request_id,
        inputs=inputs,
        outputs=_decode_outputs(header, sig, default_binary),
        binary_data_output=default_binary,
        parameters=dict(parameters),
    )


# ----------------------------------------------------------------------------- encode


def _as_bytes_elements(arr: np.ndarray) -> list[bytes]:
    """BYTES elements as bytes: bytes pass through, anything else as its UTF-8 text."""
    return [
        bytes(item) if isinstance(item, (bytes, bytearray, memoryview)) else str(item).encode("utf-8")
        for item in arr.reshape(-1)
    ]


def _to_binary(arr: np.ndarray, datatype: str, name: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(
            struct.pack("<I", len(b)) + b for b in _as_bytes_elements(arr)
        )
    dtype = DATATYPE_TO_NUMPY[datatype]
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("<")).tobytes()


def _to_json_data(arr: np.ndarray, datatype: str, name: str) -> list[Any]:
    if datatype == "BYTES":
        try:
            return [b.decode("utf-8") for b in _as_bytes_elements(arr)]
        except UnicodeDecodeError:
            raise BadRequest(
                f"output {name!r} holds bytes that are not UTF-8 and cannot go in JSON; "
                "request it with binary_data=true"
            ) from None
    return arr.reshape(-1).tolist()


def _cast(arr: np.ndarray, datatype: str, name: str) -> np.ndarray:
    if datatype not in DATATYPE_TO_NUMPY:
        raise EdgebatchError(
            f"output {name!r}: datatype {datatype!r} is not a v2 datatype; "
            f"expected one of {', '.join(DATATYPE_TO_NUMPY)}"
        )
    if datatype == "BYTES":
        return arr
    return arr.astype(DATATYPE_TO_NUMPY[datatype], copy=False)


def encode_infer_response(
    model_name: str,
    model_version: str,
    outputs: dict[str, np.ndarray],
    request: InferRequest,
    datatypes: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Encode outputs as the v2 response body plus the HTTP headers the route must send.

    Only the requested outputs go out (all of ``outputs``, in dict order, when the
    request named none). Plain JSON when no output is binary; otherwise the binary
    extension, whose ``Inference-Header-Content-Length`` header tritonclient needs to
    find the JSON part. ``datatypes`` (e.g. from the signature) overrides the type
    derived from each array's dtype; numeric arrays are cast to it.
    """
    if request.outputs is None:
        selected = [(name, request.binary_data_output) for name in outputs]
    else:
        selected = list(request.outputs)

    header_outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in selected:
        if name not in outputs:
            raise EdgebatchError(
                f"output {name!r} was requested but the model produced only {list(outputs)}"
            )
        arr = np.asarray(outputs[name])
        datatype = (datatypes or {}).get(name) or numpy_to_datatype(arr.dtype)
        arr = _cast(arr, datatype, name)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            raw = _to_binary(arr, datatype, name)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _to_json_data(arr, datatype, name)
        header_outputs.append(entry)

    response: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request.id:
        response["id"] = request.id
    response["outputs"] = header_outputs
    try:  # strict JSON: a non-finite output is a server fault, never a bare NaN token
        header_bytes = json.dumps(response, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except ValueError:
        raise EdgebatchError("the model produced NaN or infinity in a JSON output; request the output "
                             "as binary data (binary_data: true) to receive IEEE 754 values") from None

    if not any(binary for _, binary in selected):
        return header_bytes, {"Content-Type": CONTENT_TYPE_JSON}
    return b"".join([header_bytes, *chunks]), {
        "Content-Type": CONTENT_TYPE_BINARY,
        INFERENCE_HEADER_CONTENT_LENGTH: str(len(header_bytes)),
    }
