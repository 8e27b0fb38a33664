"""The v2 codec against tritonclient's own encoder and decoder, so compatibility is real."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.http._utils import _get_inference_request

from app.errors import BadRequest, ConfigError
from app.oip import (
    CONTENT_TYPE_BINARY,
    CONTENT_TYPE_JSON,
    DATATYPE_TO_NUMPY,
    INFERENCE_HEADER_CONTENT_LENGTH,
    InferRequest,
    ModelSignature,
    TensorSpec,
    decode_infer_request,
    encode_infer_response,
    error_body,
    model_metadata,
    numpy_to_datatype,
    server_metadata,
)

DETECTOR = ModelSignature(
    name="detector",
    versions=["1", "2"],
    platform="onnxruntime_onnx",
    inputs=[
        TensorSpec("images", "FP32", (-1, 3, 4, 4)),
        TensorSpec("raw", "UINT8", (-1, 2)),
        TensorSpec("ids", "INT64", (-1,)),
        TensorSpec("tags", "BYTES", (-1, 2)),
    ],
    outputs=[
        TensorSpec("boxes", "FP32", (-1, 5, 4)),
        TensorSpec("labels", "BYTES", (-1, 5)),
        TensorSpec("count", "INT64", (-1,)),
    ],
    max_batch_size=8,
)


def detector_arrays(batch: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "images": rng.standard_normal((batch, 3, 4, 4)).astype(np.float32),
        "raw": rng.integers(0, 256, (batch, 2), dtype=np.uint8),
        "ids": np.array([-(2**62), 2**62 + 3][:batch] + [0] * max(0, batch - 2), dtype=np.int64),
        "tags": np.array([["car", "héllo"], ["", "a\x00b"]][:batch], dtype=object),
    }


def triton_body(
    arrays: dict[str, np.ndarray],
    binary: bool | dict[str, bool] = True,
    outputs: list[httpclient.InferRequestedOutput] | None = None,
    request_id: str = "",
    datatypes: dict[str, str] | None = None,
) -> tuple[bytes, dict[str, str]]:
    """Build a request exactly as tritonclient.http.InferenceServerClient.infer does."""
    inputs = []
    for name, arr in arrays.items():
        datatype = (datatypes or {}).get(name) or numpy_to_datatype(arr.dtype)
        inp = httpclient.InferInput(name, list(arr.shape), datatype)
        use_binary = binary[name] if isinstance(binary, dict) else binary
        inp.set_data_from_numpy(arr, binary_data=use_binary)
        inputs.append(inp)
    body, json_size = _get_inference_request(
        inputs=inputs,
        request_id=request_id,
        outputs=outputs,
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=None,
        custom_parameters=None,
    )
    if isinstance(body, str):
        body = body.encode()
    headers = {} if json_size is None else {INFERENCE_HEADER_CONTENT_LENGTH: str(json_size)}
    return body, headers


def parse_response(body: bytes, headers: dict[str, str]) -> httpclient.InferResult:
    """Parse a response the way tritonclient does, reading the header length from headers."""
    length = headers.get(INFERENCE_HEADER_CONTENT_LENGTH)
    return httpclient.InferResult.from_response_body(
        body, header_length=None if length is None else int(length)
    )


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert got.dtype == object
        assert [bytes(x) for x in got.reshape(-1)] == [
            x if isinstance(x, bytes) else str(x).encode() for x in want.reshape(-1)
        ]
    else:
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


# --------------------------------------------------------------------------- metadata


def test_model_metadata_is_the_v2_form() -> None:
    meta = model_metadata(DETECTOR)
    assert meta["name"] == "detector"
    assert meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"][0] == {"name": "images", "datatype": "FP32", "shape": [-1, 3, 4, 4]}
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "labels", "count"]
    json.dumps(meta)  # serialisable as is


def test_server_metadata_always_advertises_binary_tensor_data() -> None:
    assert server_metadata("edgebatch", "0.1.0", ["model_repository"]) == {
        "name": "edgebatch",
        "version": "0.1.0",
        "extensions": ["binary_tensor_data", "model_repository"],
    }
    assert server_metadata("e", "1", ["binary_tensor_data"])["extensions"] == ["binary_tensor_data"]


def test_error_body_is_what_tritonclient_reads() -> None:
    assert error_body("input 'x' is missing") == {"error": "input 'x' is missing"}


def test_signature_rejects_unknown_datatype() -> None:
    with pytest.raises(ConfigError, match="'FLOAT'.*FP32"):
        TensorSpec("x", "FLOAT", (1,))


def test_datatype_maps_agree_with_tritonclient() -> None:
    from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        assert np.dtype(triton_to_np_dtype(datatype)) == dtype
        assert np_to_triton_dtype(dtype) == datatype
        assert numpy_to_datatype(dtype) == datatype
    assert numpy_to_datatype(np.dtype("<U3")) == "BYTES"
    assert numpy_to_datatype(np.dtype("S3")) == "BYTES"


# --------------------------------------------------------------------------- decode


@pytest.mark.parametrize("binary", [True, False])
def test_decode_all_types_binary_and_json(binary: bool) -> None:
    arrays = detector_arrays()
    body, headers = triton_body(arrays, binary=binary, request_id="req-7")
    assert (INFERENCE_HEADER_CONTENT_LENGTH in headers) is binary
    req = decode_infer_request(body, headers, DETECTOR)
    assert req.id == "req-7"
    assert list(req.inputs) == list(arrays)  # request order kept
    for name, arr in arrays.items():
        assert_same(req.inputs[name], arr)
    # tritonclient asks for all outputs in binary when none are named
    assert req.outputs is None
    assert req.binary_data_output is True


def test_decode_mixed_binary_and_json_inputs() -> None:
    arrays = detector_arrays()
    mix = {"images": True, "raw": False, "ids": True, "tags": False}
    body, headers = triton_body(arrays, binary=mix)
    req = decode_infer_request(body, headers, DETECTOR)
    for name, arr in arrays.items():
        assert_same(req.inputs[name], arr)


def test_decoded_arrays_are_writable_native_copies() -> None:
    body, headers = triton_body(detector_arrays())
    images = decode_infer_request(body, headers, DETECTOR).inputs["images"]
    assert images.flags.writeable and images.flags.aligned and images.flags.c_contiguous
    images /= 2  # the pipeline normalises in place


def test_decode_requested_outputs_keep_their_binary_flags() -> None:
    outputs = [
        httpclient.InferRequestedOutput("count", binary_data=False),
        httpclient.InferRequestedOutput("boxes", binary_data=True),
    ]
    body, headers = triton_body(detector_arrays(), outputs=outputs)
    req = decode_infer_request(body, headers, DETECTOR)
    assert req.outputs == [("count", False), ("boxes", True)]
    assert req.binary_data_output is False


def test_decode_nested_json_data_and_header_case() -> None:
    sig = ModelSignature("m", ["1"], "onnxruntime_onnx", [TensorSpec("x", "INT64", (2, 2))], [])
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "INT64", "shape": [2, 2], "data": [[1, 2], [3, 4]]}]}
    ).encode()
    req = decode_infer_request(body, {"content-type": "application/json"}, sig)
    assert req.inputs["x"].tolist() == [[1, 2], [3, 4]]
    assert req.inputs["x"].dtype == np.int64
    # lower-case header name (as some proxies send it) is honoured
    arrays = {"x": np.arange(4, dtype=np.int64).reshape(2, 2)}
    body, headers = triton_body(arrays)
    lowered = {k.lower(): v for k, v in headers.items()}
    assert decode_infer_request(body, lowered, sig).inputs["x"].tolist() == [[0, 1], [2, 3]]


def test_decode_gzip_request_body() -> None:
    body, headers = triton_body(detector_arrays())
    req = decode_infer_request(
        gzip.compress(body), {**headers, "Content-Encoding": "gzip"}, DETECTOR
    )
    assert_same(req.inputs["images"], detector_arrays()["images"])


def test_decode_uint64_beyond_int64_in_json() -> None:
    sig = ModelSignature("m", ["1"], "p", [TensorSpec("x", "UINT64", (2,))], [])
    arr = np.array([2**64 - 1, 0], dtype=np.uint64)
    body, headers = triton_body({"x": arr}, binary=False)
    assert_same(decode_infer_request(body, headers, sig).inputs["x"], arr)


# --------------------------------------------------------------------------- bad input


def _json_request(*tensors: dict, **extra) -> bytes:
    return json.dumps({"inputs": list(tensors), **extra}).encode()


SMALL = ModelSignature(
    "small",
    ["1"],
    "onnxruntime_onnx",
    [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "UINT8", (3,))],
    [TensorSpec("y", "FP32", (-1,))],
    max_batch_size=4,
)
GOOD_A = {"name": "a", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 2.0]}
GOOD_B = {"name": "b", "datatype": "UINT8", "shape": [3], "data": [1, 2, 3]}


@pytest.mark.parametrize(
    ("body", "headers", "pattern"),
    [
        (b"{not json", {}, r"malformed JSON"),
        (b"[1, 2]", {}, r"must be an object, got list"),
        (b"\xff\xfe", {}, r"malformed JSON"),
        (_json_request(GOOD_A, GOOD_B)[:-1], {}, r"malformed JSON"),
        (json.dumps({"id": 3, "inputs": []}).encode(), {}, r"'id' must be a string"),
        (json.dumps({"outputs": []}).encode(), {}, r"'inputs' must be a list"),
        (
            _json_request(GOOD_A, GOOD_B, {**GOOD_B, "name": "zeta"}),
            {},
            r"unknown input 'zeta' for model 'small'; expected inputs \['a', 'b'\]",
        ),
        (_json_request(GOOD_A), {}, r"expects 2 inputs \['a', 'b'\], got 1 \['a'\]; missing input\(s\) \['b'\]"),
        (_json_request(), {}, r"expects 2 inputs.*got 0.*missing input\(s\) \['a', 'b'\]"),
        (_json_request(GOOD_A, GOOD_A, GOOD_B), {}, r"input 'a' is given more than once"),
        (
            _json_request({**GOOD_A, "datatype": "FP64"}, GOOD_B),
            {},
            r"input 'a': datatype mismatch, expected FP32, got FP64",
        ),
        (
            _json_request({**GOOD_A, "datatype": "FLOAT"}, GOOD_B),
            {},
            r"unknown datatype 'FLOAT'",
        ),
        (
            _json_request({**GOOD_A, "shape": [1, 3], "data": [1.0, 2.0, 3.0]}, GOOD_B),
            {},
            r"input 'a': shape mismatch, expected \[-1, 2\] \(-1 = any size\), got \[1, 3\]",
        ),
        (
            _json_request({**GOOD_A, "shape": [2]}, GOOD_B),
            {},
            r"input 'a': shape mismatch, expected \[-1, 2\].*got \[2\]",
        ),
        (
            _json_request({**GOOD_A, "shape": [1, -2]}, GOOD_B),
            {},
            r"input 'a': 'shape' must be a list of non-negative integers",
        ),
        (
            _json_request({**GOOD_A, "shape": [5, 2], "data": [0.0] * 10}, GOOD_B),
            {},
            r"input 'a': batch size 5 exceeds max_batch_size 4",
        ),
        (
            _json_request({**GOOD_A, "shape": [2, 2]}, GOOD_B),
            {},
            r"input 'a': data length does not match shape, expected 4 elements for shape \[2, 2\], got 2",
        ),
        (
            _json_request(GOOD_A, {**GOOD_B, "data": [1, 2, 300]}),
            {},
            r"input 'b': UINT8 data out of range, expected values in \[0, 255\], got min 1 max 300",
        ),
        (
            _json_request(GOOD_A, {**GOOD_B, "data": [1, 2.5, 3]}),
            {},
            r"input 'b': UINT8 data must be integers, got float 2.5",
        ),
        (
            _json_request({**GOOD_A, "data": [1.0, "x"]}, GOOD_B),
            {},
            r"input 'a': FP32 data must be numbers, got str 'x'",
        ),
        (
            _json_request({**GOOD_A, "data": [1.0, None]}, GOOD_B),
            {},
            r"input 'a': FP32 data must be numbers, got NoneType None",
        ),
        (
            _json_request({**GOOD_A, "data": [[1.0], [2.0, 3.0]]}, GOOD_B),
            {},
            r"input 'a': 'data' is a ragged nested list",
        ),
        (
            _json_request({**GOOD_A, "data": 1.0}, GOOD_B),
            {},
            r"input 'a': 'data' must be a \(flat or nested\) list, got float",
        ),
        (
            _json_request({k: v for k, v in GOOD_A.items() if k != "data"}, GOOD_B),
            {},
            r"input 'a': no data",
        ),
        (
            _json_request({**GOOD_A, "parameters": {"shared_memory_region": "r"}}, GOOD_B),
            {},
            r"input 'a': shared memory is not supported",
        ),
        (
            _json_request(GOOD_A, GOOD_B, outputs=[{"name": "nope"}]),
            {},
            r"unknown output 'nope' requested from model 'small'; expected one of \['y'\]",
        ),
        (
            _json_request(GOOD_A, GOOD_B, outputs=[{"name": "y"}, {"name": "y"}]),
            {},
            r"output 'y' is requested more than once",
        ),
        (
            _json_request(GOOD_A, GOOD_B, outputs=[{"name": "y", "parameters": {"classification": 3}}]),
            {},
            r"output 'y': parameter 'classification' is not supported",
        ),
        (
            _json_request(GOOD_A, GOOD_B),
            {INFERENCE_HEADER_CONTENT_LENGTH: "10000"},
            r"Inference-Header-Content-Length is 10000 but the body has only \d+ bytes",
        ),
        (
            _json_request(GOOD_A, GOOD_B),
            {INFERENCE_HEADER_CONTENT_LENGTH: "ten"},
            r"Inference-Header-Content-Length must be an integer byte count, got 'ten'",
        ),
        (
            _json_request(GOOD_A, GOOD_B),
            {INFERENCE_HEADER_CONTENT_LENGTH: "-1"},
            r"must not be negative",
        ),
        (
            _json_request(GOOD_A, GOOD_B),
            {INFERENCE_HEADER_CONTENT_LENGTH: "5"},
            r"malformed JSON: the first 5 bytes",
        ),
        (b"not gzip", {"Content-Encoding": "gzip"}, r"not valid gzip data"),
        (b"{}", {"Content-Encoding": "br"}, r"Content-Encoding 'br' is not supported"),
    ],
)
def test_bad_requests_name_the_problem(body: bytes, headers: dict, pattern: str) -> None:
    with pytest.raises(BadRequest, match=pattern) as info:
        decode_infer_request(body, headers, SMALL)
    assert info.value.status == 400


def _binary_request(tensors: list[dict], tail: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps({"inputs": tensors}).encode()
    return header + tail, {INFERENCE_HEADER_CONTENT_LENGTH: str(len(header))}


def _bin(name: str, datatype: str, shape: list[int], size: int) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}


@pytest.mark.parametrize(
    ("tensors", "tail", "pattern"),
    [
        (
            [_bin("a", "FP32", [1, 2], 4), GOOD_B],
            b"\0" * 4,
            r"input 'a': data length does not match shape, expected 8 bytes \(2 x FP32 for shape \[1, 2\]\), got binary_data_size 4",
        ),
        (
            [_bin("a", "FP32", [1, 2], 8), _bin("b", "UINT8", [3], 3)],
            b"\0" * 10,
            r"input 'b': binary_data_size 3 at offset 8 runs past the 10 bytes",
        ),
        (
            [_bin("a", "FP32", [1, 2], 8), GOOD_B],
            b"\0" * 9,
            r"binary data after the JSON header is 9 bytes but the inputs' binary_data_size add up to 8",
        ),
        (
            [{**_bin("a", "FP32", [1, 2], 8), "data": [1.0, 2.0]}, GOOD_B],
            b"\0" * 8,
            r"input 'a': has both 'data' and parameters.binary_data_size",
        ),
        (
            [_bin("a", "FP32", [1, 2], -8), GOOD_B],
            b"",
            r"binary_data_size must be a non-negative integer, got -8",
        ),
    ],
)
def test_bad_binary_requests_name_the_problem(tensors: list[dict], tail: bytes, pattern: str) -> None:
    body, headers = _binary_request(tensors, tail)
    with pytest.raises(BadRequest, match=pattern):
        decode_infer_request(body, headers, SMALL)


def test_binary_body_without_length_header_says_so() -> None:
    body, _ = triton_body({"a": np.zeros((1, 2), np.float32), "b": np.zeros(3, np.uint8)})
    with pytest.raises(BadRequest, match="malformed JSON"):
        decode_infer_request(body, {}, SMALL)


BYTES_SIG = ModelSignature("s", ["1"], "p", [TensorSpec("t", "BYTES", (-1,))], [])


def _bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


@pytest.mark.parametrize(
    ("shape", "tail", "pattern"),
    [
        ([3], _bytes_elements(b"ab", b"c"), r"input 't': data length does not match shape, expected 3 BYTES elements, got 2"),
        ([1], _bytes_elements(b"abc")[:-1], r"input 't': BYTES element 0 declares 3 bytes but only 2 remain"),
        ([2], _bytes_elements(b"ab") + b"\1\0", r"BYTES data is truncated: element 1 needs a 4-byte length prefix"),
    ],
)
def test_bad_binary_bytes_tensors(shape: list[int], tail: bytes, pattern: str) -> None:
    body, headers = _binary_request([_bin("t", "BYTES", shape, len(tail))], tail)
    with pytest.raises(BadRequest, match=pattern):
        decode_infer_request(body, headers, BYTES_SIG)


def test_json_bytes_must_be_strings() -> None:
    body = _json_request({"name": "t", "datatype": "BYTES", "shape": [2], "data": ["a", 1]})
    with pytest.raises(BadRequest, match=r"input 't': BYTES data in JSON must be strings, got int 1"):
        decode_infer_request(body, {}, BYTES_SIG)


def test_bool_json_needs_true_false() -> None:
    sig = ModelSignature("m", ["1"], "p", [TensorSpec("f", "BOOL", (2,))], [])
    ok = _json_request({"name": "f", "datatype": "BOOL", "shape": [2], "data": [True, False]})
    assert decode_infer_request(ok, {}, sig).inputs["f"].tolist() == [True, False]
    bad = _json_request({"name": "f", "datatype": "BOOL", "shape": [2], "data": [1, 0]})
    with pytest.raises(BadRequest, match=r"input 'f': BOOL data must be true/false, got int 1"):
        decode_infer_request(bad, {}, sig)


# --------------------------------------------------------------------------- encode


def _model_outputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {
        "boxes": rng.standard_normal((2, 5, 4)).astype(np.float32),
        "labels": np.array([[b"car", b"bus", b"", b"p\xc3\xa9", b"x"]] * 2, dtype=object),
        "count": np.array([5, 3], dtype=np.int64),
    }


@pytest.mark.parametrize("binary", [True, False])
def test_encode_all_outputs_parses_in_tritonclient(binary: bool) -> None:
    outs = _model_outputs()
    req = InferRequest(id="r1", inputs={}, outputs=None, binary_data_output=binary)
    body, headers = encode_infer_response("detector", "2", outs, req)
    if binary:
        assert headers["Content-Type"] == CONTENT_TYPE_BINARY
        assert int(headers[INFERENCE_HEADER_CONTENT_LENGTH]) < len(body)
    else:
        assert headers == {"Content-Type": CONTENT_TYPE_JSON}
    result = parse_response(body, headers)
    meta = result.get_response()
    assert (meta["model_name"], meta["model_version"], meta["id"]) == ("detector", "2", "r1")
    assert [o["name"] for o in meta["outputs"]] == ["boxes", "labels", "count"]
    assert_same(result.as_numpy("boxes"), outs["boxes"])
    assert_same(result.as_numpy("count"), outs["count"])
    labels = result.as_numpy("labels")
    # tritonclient gives bytes for binary BYTES and str for JSON BYTES
    assert [x if isinstance(x, bytes) else x.encode() for x in labels.reshape(-1)] == list(
        outs["labels"].reshape(-1)
    )


def test_encode_only_requested_outputs_with_mixed_flags() -> None:
    outs = _model_outputs()
    req = InferRequest(id=None, inputs={}, outputs=[("count", False), ("boxes", True)])
    body, headers = encode_infer_response("detector", "1", outs, req)
    result = parse_response(body, headers)
    meta = result.get_response()
    assert "id" not in meta
    assert [o["name"] for o in meta["outputs"]] == ["count", "boxes"]
    assert meta["outputs"][0]["data"] == [5, 3]
    assert meta["outputs"][1]["parameters"] == {"binary_data_size": 2 * 5 * 4 * 4}
    assert result.as_numpy("labels") is None
    assert_same(result.as_numpy("boxes"), outs["boxes"])


def test_encode_casts_to_declared_datatypes() -> None:
    req = InferRequest(id=None, inputs={}, outputs=None, binary_data_output=True)
    body, headers = encode_infer_response(
        "m", "1", {"count": np.array([1, 2], dtype=np.int32)}, req, datatypes={"count": "INT64"}
    )
    got = parse_response(body, headers).as_numpy("count")
    assert got.dtype == np.int64 and got.tolist() == [1, 2]


def test_encode_non_utf8_bytes_in_json_names_the_output() -> None:
    req = InferRequest(id=None, inputs={}, outputs=[("labels", False)])
    with pytest.raises(BadRequest, match="output 'labels' holds bytes that are not UTF-8"):
        encode_infer_response("m", "1", {"labels": np.array([b"\xff"], dtype=object)}, req)


def test_end_to_end_decode_then_encode() -> None:
    """What a route does: decode a tritonclient request, run, encode, parse in tritonclient."""
    outputs = [httpclient.InferRequestedOutput("boxes"), httpclient.InferRequestedOutput("labels")]
    body, headers = triton_body(detector_arrays(), outputs=outputs, request_id="abc")
    req = decode_infer_request(body, headers, DETECTOR)
    resp, resp_headers = encode_infer_response("detector", "1", _model_outputs(), req)
    result = parse_response(resp, resp_headers)
    assert result.get_response()["id"] == "abc"
    assert_same(result.as_numpy("boxes"), _model_outputs()["boxes"])
    assert result.as_numpy("count") is None


# --------------------------------------------------------------------------- round trips

_NUMERIC = [d for d in DATATYPE_TO_NUMPY if d != "BYTES"]


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, np.ndarray]:
    datatype = draw(st.sampled_from([*_NUMERIC, "BYTES"]))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=4))
    if datatype == "BYTES":
        items = draw(
            st.lists(
                st.text(max_size=6).map(str.encode) | st.binary(max_size=6),
                min_size=int(np.prod(shape)),
                max_size=int(np.prod(shape)),
            )
        )
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
        return datatype, arr.reshape(shape)
    dtype = DATATYPE_TO_NUMPY[datatype]
    elements = (
        hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False) if dtype.kind == "f" else None
    )
    return datatype, draw(hnp.arrays(dtype, shape, elements=elements))


def _json_safe(arr: np.ndarray) -> bool:
    """JSON carries BYTES only as UTF-8 text."""
    if arr.dtype != object:
        return True
    try:
        for item in arr.reshape(-1):
            item.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(tensors(), min_size=1, max_size=3),
    st.booleans(),
    st.booleans(),
)
def test_round_trip_random_tensors(
    drawn: list[tuple[str, np.ndarray]], binary_in: bool, binary_out: bool
) -> None:
    arrays = {f"in{i}": arr for i, (_, arr) in enumerate(drawn)}
    types = {f"in{i}": dt for i, (dt, _) in enumerate(drawn)}
    if not binary_in and not all(_json_safe(a) for a in arrays.values()):
        binary_in = True
    sig = ModelSignature(
        "rt",
        ["1"],
        "onnxruntime_onnx",
        [TensorSpec(n, types[n], (-1,) + a.shape[1:]) for n, a in arrays.items()],
        [TensorSpec(n, types[n], (-1,) + a.shape[1:]) for n, a in arrays.items()],
    )
    outputs = [httpclient.InferRequestedOutput(n, binary_data=binary_out) for n in arrays]
    if not binary_out and not all(_json_safe(a) for a in arrays.values()):
        outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in arrays]
    body, headers = triton_body(arrays, binary=binary_in, outputs=outputs, datatypes=types)
    req = decode_infer_request(body, headers, sig)
    for name, arr in arrays.items():
        assert_same(req.inputs[name], arr)

    # echo the inputs back as outputs and let tritonclient parse them
    resp, resp_headers = encode_infer_response("rt", "1", req.inputs, req, datatypes=types)
    result = parse_response(resp, resp_headers)
    for name, arr in arrays.items():
        got = result.as_numpy(name)
        if arr.dtype == object:
            assert got.shape == arr.shape
            assert [x if isinstance(x, bytes) else x.encode() for x in got.reshape(-1)] == list(
                arr.reshape(-1)
            )
        else:
            assert_same(got, arr)


def test_the_bench_sends_a_jpeg_to_the_full_job_peer_as_tritons_own_client_would():
    """`bench http --peer-url` wraps each JPEG as a v2 BYTES input [1, 1]: byte for byte what
    tritonclient builds for the same tensor, so Triton's full-job model gets the same image."""
    from tritonclient.utils import deserialize_bytes_tensor

    from app.bench.http_client import v2_bytes_body

    jpeg = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3
    body, headers = v2_bytes_body(jpeg)
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(body[:n])
    assert header["inputs"][0] == {"name": "image", "shape": [1, 1], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": len(body) - n}}
    assert list(deserialize_bytes_tensor(body[n:])) == [jpeg]
    tensor = httpclient.InferInput("image", [1, 1], "BYTES")
    tensor.set_data_from_numpy(np.array([[jpeg]], dtype=np.object_), binary_data=True)
    theirs, json_size = _get_inference_request(
        inputs=[tensor], request_id="", outputs=[httpclient.InferRequestedOutput("detections", binary_data=True)],
        sequence_id=0, sequence_start=False, sequence_end=False, priority=0, timeout=None, custom_parameters=None)
    assert theirs[json_size:] == body[n:]
