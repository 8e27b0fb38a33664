"""Engine backends: ONNX Runtime and LiteRT on real tiny models; TensorRT 10 against a call-checking fake."""

from __future__ import annotations

import logging
import shutil
import sys
import types

import numpy as np
import pytest

from app.engines import BACKENDS, available_backends, create_engine, new_engine
from app.engines.base import run_padded
from app.errors import BadRequest, ConfigError, Unavailable
from tests.fakes.fake_tensorrt import FakeCallError, FakeGpu, fake_plan, install_fakes
from tests.tiny_models import (
    TinyConv,
    make_onnx_conv,
    make_tflite_conv,
    make_tflite_quantized_add,
    onnx_reference,
)

RNG = np.random.default_rng(7)


def images(*shape: int) -> np.ndarray:
    return RNG.random(shape, dtype=np.float32)


# --------------------------------------------------------------------------- factory


def test_unknown_backend_names_the_allowed_ones(tmp_path):
    with pytest.raises(ConfigError) as err:
        create_engine("openvino", tmp_path / "m.xml")
    for name in BACKENDS:
        assert name in err.value.message
    assert err.value.status == 400


def test_unknown_device_is_a_config_error(tmp_path):
    path = make_onnx_conv(tmp_path / "m.onnx")
    with pytest.raises(ConfigError, match="unknown device 'tpu7'"):
        create_engine("onnx", path, device="tpu7")


def test_available_backends_reports_each_backend_here():
    status = available_backends()
    assert set(status) == set(BACKENDS)
    assert status["onnx"] == "available"
    assert status["tflite"] == "available"
    if "tensorrt" not in sys.modules and status["tensorrt"] != "available":
        assert "pip install 'edgebatch[tensorrt]'" in status["tensorrt"]
    if status["edgetpu"] != "available":
        assert "libedgetpu.so.1" in status["edgetpu"]


# --------------------------------------------------------------------------- ONNX Runtime


def test_onnx_fixed_batch_matches_numpy(tmp_path):
    path = make_onnx_conv(tmp_path / "conv_b2.onnx", batch=2)
    engine = create_engine("onnx", path, options={"intra_op_num_threads": 1})
    assert engine.batch_size == 2
    assert engine.input_shape == (2, 3, 8, 8)
    assert engine.device == "cpu"
    assert engine.memory_bytes() > path.stat().st_size
    x = images(2, 3, 8, 8)
    scores, mean = engine.run(x)
    ref_scores, ref_mean = onnx_reference(x)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    engine.close()
    engine.close()  # idempotent
    assert engine.memory_bytes() == 0
    with pytest.raises(Unavailable, match="not loaded"):
        engine.run(x)


def test_onnx_dynamic_batch_runs_at_the_requested_size(tmp_path):
    path = make_onnx_conv(tmp_path / "conv_dyn.onnx", batch=None)
    assert create_engine("onnx", path).batch_size == 1
    engine = create_engine("onnx", path, options={"batch_size": 3})
    assert engine.input_shape == (3, 3, 8, 8)
    x = images(3, 3, 8, 8)
    np.testing.assert_allclose(engine.run(x)[0], onnx_reference(x)[0], rtol=1e-5, atol=1e-6)


def test_onnx_fixed_batch_refuses_another_batch_size(tmp_path):
    path = make_onnx_conv(tmp_path / "conv_b2.onnx", batch=2)
    with pytest.raises(ConfigError, match="fixed batch size of 2"):
        create_engine("onnx", path, options={"batch_size": 4})


def test_onnx_wrong_batch_shape_is_a_bad_request(tmp_path):
    engine = create_engine("onnx", make_onnx_conv(tmp_path / "m.onnx", batch=2))
    with pytest.raises(BadRequest, match=r"\(3, 3, 8, 8\) does not match the model input \(2, 3, 8, 8\)"):
        engine.run(images(3, 3, 8, 8))


def test_onnx_missing_file_and_missing_provider(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        create_engine("onnx", tmp_path / "nope.onnx")
    path = make_onnx_conv(tmp_path / "m.onnx")
    with pytest.raises(Unavailable, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        create_engine("onnx", path, options={"providers": ["CUDAExecutionProvider"]})


def test_provider_preference_order():
    from app.engines.onnxrt import choose_providers

    available = ["AzureExecutionProvider", "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]
    assert choose_providers(available) == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers(["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers(available, ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_run_padded_pads_and_never_returns_padding(tmp_path, rows):
    engine = create_engine("onnx", make_onnx_conv(tmp_path / "conv_b4.onnx", batch=4))
    x = images(rows, 3, 8, 8)
    scores, mean = run_padded(engine, x)
    assert scores.shape == (rows, 4, 8, 8) and mean.shape == (rows, 4)
    ref_scores, ref_mean = onnx_reference(x)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds"):
        run_padded(engine, images(5, 3, 8, 8))


# --------------------------------------------------------------------------- TensorRT (fake)

STATIC_PLAN = fake_plan(
    [{"name": "images", "shape": [2, 3, 4, 4], "dtype": "FLOAT"}],
    [{"name": "boxes", "shape": [2, 48], "dtype": "FLOAT"}, {"name": "first", "shape": [2, 3], "dtype": "FLOAT"}],
)


def _plan_file(tmp_path, plan: bytes = STATIC_PLAN):
    path = tmp_path / "model_b2.plan"
    path.write_bytes(plan)
    return path


def test_tensorrt_missing_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(Unavailable) as err:
        create_engine("tensorrt", _plan_file(tmp_path))
    assert err.value.status == 503
    assert "pip install 'edgebatch[tensorrt]'" in err.value.message and "JetPack" in err.value.message
    assert "pip install 'edgebatch[tensorrt]'" in available_backends()["tensorrt"]


def test_tensorrt_without_cuda_bindings_is_unavailable(monkeypatch, tmp_path):
    install_fakes(monkeypatch, cuda=None)
    with pytest.raises(Unavailable, match="pycuda.*cuda-python"):
        create_engine("tensorrt", _plan_file(tmp_path))


@pytest.mark.parametrize("binding", ["pycuda", "cudart"])
def test_tensorrt_engine_calls_and_results(monkeypatch, tmp_path, binding):
    gpu = install_fakes(monkeypatch, cuda=binding)
    engine = create_engine("tensorrt", _plan_file(tmp_path))
    assert engine.batch_size == 2 and engine.input_shape == (2, 3, 4, 4)
    assert engine.device == "cuda:0 (Fake RTX 4000, TensorRT)"
    assert engine.memory_bytes() > len(STATIC_PLAN)

    load_calls = gpu.names()
    assert load_calls.index("deserialize_cuda_engine") < load_calls.index("create_execution_context")
    assert load_calls.index("set_input_shape") < load_calls.index("set_tensor_address")
    addressed = {args[0] for name, args in gpu.calls if name == "set_tensor_address"}
    assert addressed == {"images", "boxes", "first"}
    assert ("set_input_shape", ("images", (2, 3, 4, 4))) in gpu.calls
    live_before_run = len(gpu.allocations)

    gpu.calls.clear()
    x = images(2, 3, 4, 4)
    boxes, first = engine.run(x)
    sequence = gpu.names()
    core = [n for n in sequence if n in ("memcpy_htod_async", "execute_async_v3", "memcpy_dtoh_async", "synchronize")]
    assert core == ["memcpy_htod_async", "execute_async_v3", "memcpy_dtoh_async", "memcpy_dtoh_async", "synchronize"]
    handles = {args[-1] for name, args in gpu.calls if name in ("memcpy_htod_async", "execute_async_v3", "memcpy_dtoh_async")}
    assert len(handles) == 1 and handles <= set(gpu.streams)  # one stream, passed as its int handle
    assert len(gpu.allocations) == live_before_run  # buffers allocated once, at load

    np.testing.assert_allclose(boxes, (x * 2).reshape(2, 48), rtol=1e-6)
    np.testing.assert_allclose(first, (x.ravel() * 2)[:6].reshape(2, 3), rtol=1e-6)

    y = images(2, 3, 4, 4)
    boxes2, _ = engine.run(y)
    np.testing.assert_allclose(boxes2, (y * 2).reshape(2, 48), rtol=1e-6)
    np.testing.assert_allclose(boxes, (x * 2).reshape(2, 48), rtol=1e-6)  # earlier result not overwritten

    with pytest.raises(BadRequest, match="does not match the plan input"):
        engine.run(images(1, 3, 4, 4))
    engine.close()
    assert gpu.allocations == {}  # every device buffer freed
    engine.close()  # idempotent: a second close frees nothing twice
    with pytest.raises(Unavailable, match="not loaded"):
        engine.run(x)


def test_tensorrt_dynamic_batch_plan_sets_the_input_shape(monkeypatch, tmp_path):
    gpu = install_fakes(monkeypatch)
    plan = fake_plan(
        [{"name": "images", "shape": [-1, 3, 4, 4], "dtype": "FLOAT"}],
        [{"name": "out", "shape": [-1, 3, 4, 4], "dtype": "FLOAT"}],
        profiles={"images": [[1, 3, 4, 4], [4, 3, 4, 4], [8, 3, 4, 4]]},
    )
    engine = create_engine("tensorrt", _plan_file(tmp_path, plan), options={"batch_size": 4})
    assert engine.input_shape == (4, 3, 4, 4)
    assert ("set_input_shape", ("images", (4, 3, 4, 4))) in gpu.calls
    x = images(4, 3, 4, 4)
    np.testing.assert_allclose(engine.run(x)[0], x * 2, rtol=1e-6)
    assert create_engine("tensorrt", _plan_file(tmp_path, plan)).batch_size == 8  # profile max by default
    with pytest.raises(ConfigError, match="outside the plan's profile 1..8"):
        create_engine("tensorrt", _plan_file(tmp_path, plan), options={"batch_size": 16})


def test_tensorrt_bad_plan_is_a_config_error_and_frees_everything(monkeypatch, tmp_path):
    gpu = install_fakes(monkeypatch)
    with pytest.raises(ConfigError, match="rebuild it on this node"):
        create_engine("tensorrt", _plan_file(tmp_path, b"not a plan"))
    assert gpu.allocations == {}
    assert gpu.context_depth == 0


def test_fake_rejects_execute_before_addresses(monkeypatch):
    """The fake is strict: this is what catches an engine that skips set_tensor_address."""
    gpu = install_fakes(monkeypatch)
    import tensorrt as trt

    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine(STATIC_PLAN)
    context = engine.create_execution_context()
    stream = gpu.new_stream()
    with pytest.raises(FakeCallError, match="before set_tensor_address"):
        context.execute_async_v3(stream.handle)


# --------------------------------------------------------------------------- TensorRT builder (fake)


def test_build_plans_per_batch_size_then_run_one(monkeypatch, tmp_path):
    from model_registry.tensorrt_build import BuiltPlan, build_tensorrt_plans

    gpu = install_fakes(monkeypatch)
    onnx_path = make_onnx_conv(tmp_path / "det.onnx", batch=None, height=4, width=4)
    plans = build_tensorrt_plans(onnx_path, [4, 1], tmp_path / "plans", fp16=True, workspace_bytes=1 << 28)

    assert [p.batch_size for p in plans] == [1, 4]
    assert plans[1] == BuiltPlan(
        path=tmp_path / "plans" / "det_b4_fp16.plan",
        batch_size=4,
        input_shape=(4, 3, 4, 4),
        precision="fp16",
        tensorrt_version="10.13.0.fake",
        gpu_name="Fake RTX 4000",
        compute_capability="8.9",
    )
    assert all(p.path.is_file() for p in plans)
    assert gpu.names().count("create_network") == 2
    assert ("create_network", (0,)) in gpu.calls
    assert ("set_memory_pool_limit", ("WORKSPACE", 1 << 28)) in gpu.calls
    assert gpu.names().count("set_flag") == 2 and ("set_flag", ("FP16",)) in gpu.calls
    shapes = [args for name, args in gpu.calls if name == "profile.set_shape"]
    assert shapes == [("images", (1, 3, 4, 4), (1, 3, 4, 4), (1, 3, 4, 4)),
                      ("images", (4, 3, 4, 4), (4, 3, 4, 4), (4, 3, 4, 4))]

    engine = create_engine("tensorrt", plans[1].path)
    assert engine.input_shape == (4, 3, 4, 4)
    x = images(4, 3, 4, 4)
    scores, mean = engine.run(x)  # the fake computes input * 2, cycled to each output's size
    assert scores.shape == (4, 4, 4, 4) and mean.shape == (4, 4)
    np.testing.assert_allclose(scores.ravel(), np.resize(x.ravel() * 2, scores.size), rtol=1e-6)
    engine.close()


def test_build_without_fast_fp16_or_cuda_bindings_falls_back_plainly(monkeypatch, tmp_path):
    from model_registry.tensorrt_build import build_tensorrt_plans

    gpu = install_fakes(monkeypatch, cuda=None, gpu=FakeGpu(fast_fp16=False))
    onnx_path = make_onnx_conv(tmp_path / "det.onnx", batch=None)
    (plan,) = build_tensorrt_plans(onnx_path, [2], tmp_path, fp16=True)
    assert plan.precision == "fp32" and plan.path.name == "det_b2_fp32.plan"
    assert (plan.gpu_name, plan.compute_capability) == ("unknown", "unknown")
    assert "set_flag" not in gpu.names()


def test_build_errors_name_the_problem(monkeypatch, tmp_path):
    from model_registry.tensorrt_build import build_tensorrt_plans

    install_fakes(monkeypatch)
    fixed = make_onnx_conv(tmp_path / "fixed.onnx", batch=2)
    (plan,) = build_tensorrt_plans(fixed, [2], tmp_path)  # a fixed batch builds at its own size
    assert plan.input_shape == (2, 3, 8, 8)
    with pytest.raises(ConfigError, match="fixed batch size of 2.*dynamic batch axis"):
        build_tensorrt_plans(fixed, [4], tmp_path)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="ONNX parser rejected broken.onnx"):
        build_tensorrt_plans(broken, [1], tmp_path)
    with pytest.raises(ConfigError, match="positive"):
        build_tensorrt_plans(fixed, [0], tmp_path)

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(Unavailable, match=r"pip install 'edgebatch\[tensorrt\]'"):
        build_tensorrt_plans(fixed, [2], tmp_path)


# --------------------------------------------------------------------------- LiteRT on the CPU (real .tflite)


def test_tflite_float_conv_matches_numpy(tmp_path):
    path = make_tflite_conv(tmp_path / "conv.tflite", batch=2)
    engine = create_engine("tflite", path, options={"num_threads": 1})
    assert engine.device == "cpu"
    assert engine.batch_size == 2
    assert engine.input_shape == (2, 3, 8, 8)  # NCHW, what the pipeline hands in
    assert engine.model_input_shape == (2, 8, 8, 3)
    assert engine.memory_bytes() > path.stat().st_size
    x = images(2, 3, 8, 8)
    (out,) = engine.run(x)
    expected = TinyConv.seeded().conv_nchw(x).transpose(0, 2, 3, 1)  # the model's NHWC output
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    scores = run_padded(engine, x[:1])[0]
    assert scores.shape == (1, 8, 8, 4)
    np.testing.assert_allclose(scores, expected[:1], rtol=1e-5, atol=1e-5)
    engine.close()
    engine.close()


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_tflite_quantized_model_quantizes_and_dequantizes(tmp_path, dtype):
    path, q = make_tflite_quantized_add(tmp_path / f"add_{dtype}.tflite", batch=2, dtype=dtype)
    engine = create_engine("tflite", path)
    assert engine.input_shape == (2, 3, 4, 4)
    x = images(2, 3, 4, 4)
    (out,) = engine.run(x)
    assert out.dtype == np.float32 and out.shape == (2, 4, 4, 3)
    expected = 2 * x.transpose(0, 2, 3, 1)
    # One input step (1/255) doubled, plus output rounding: within one output step.
    np.testing.assert_allclose(out, expected, atol=q.out_scale * 1.01)
    assert not np.allclose(out, 0)


def test_tflite_batch_resize(tmp_path):
    dynamic = make_tflite_conv(tmp_path / "dyn.tflite", batch=1, dynamic_batch=True)
    engine = create_engine("tflite", dynamic, options={"batch_size": 3})
    assert engine.batch_size == 3
    x = images(3, 3, 8, 8)
    expected = TinyConv.seeded().conv_nchw(x).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(engine.run(x)[0], expected, rtol=1e-5, atol=1e-5)
    fixed = make_tflite_conv(tmp_path / "fixed.tflite", batch=1)
    assert create_engine("tflite", fixed, options={"batch_size": 2}).input_shape == (2, 3, 8, 8)


def test_tflite_bad_file_and_wrong_shape(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"not a flatbuffer")
    with pytest.raises(ConfigError, match="could not read bad.tflite"):
        create_engine("tflite", bad)
    engine = create_engine("tflite", make_tflite_conv(tmp_path / "c.tflite", batch=2))
    with pytest.raises(BadRequest, match="NCHW"):
        engine.run(images(2, 8, 8, 3))


def test_edgetpu_without_libedgetpu_runs_on_cpu_and_says_so(tmp_path, caplog):
    path = make_tflite_conv(tmp_path / "conv.tflite", batch=2)
    with caplog.at_level(logging.WARNING, logger="app.engines.litert"):
        engine = create_engine("edgetpu", path)
    assert engine.backend == "edgetpu"
    assert engine.device == "cpu (EdgeTPU delegate libedgetpu.so.1 not found)"
    assert any("running on the CPU" in r.getMessage() for r in caplog.records)
    x = images(2, 3, 8, 8)
    np.testing.assert_allclose(
        engine.run(x)[0], TinyConv.seeded().conv_nchw(x).transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5
    )
    with pytest.raises(Unavailable, match="install libedgetpu1-std"):
        create_engine("edgetpu", path, options={"require_edgetpu": True})


def test_edgetpu_file_name_asks_for_the_delegate_even_as_tflite(tmp_path):
    path = make_tflite_conv(tmp_path / "conv.tflite", batch=2)
    compiled_name = shutil.copy(path, tmp_path / "conv_edgetpu.tflite")
    assert create_engine("tflite", compiled_name).device.startswith("cpu (EdgeTPU delegate libedgetpu.so.1")
    assert create_engine("tflite", path).device == "cpu"


def test_unrelated_pycoral_package_is_ignored(monkeypatch, tmp_path):
    """PyPI's ``pycoral`` (a coral-reef CLI) has no ``pycoral.utils.edgetpu``: it must not be used."""
    from app.engines.litert import import_coral_edgetpu

    reef = types.ModuleType("pycoral")
    reef.__path__ = []
    reef.main = lambda: "coral reef atlas"
    monkeypatch.setitem(sys.modules, "pycoral", reef)
    assert import_coral_edgetpu() is None
    engine = create_engine("edgetpu", make_tflite_conv(tmp_path / "conv.tflite", batch=2))
    assert engine.runtime == "ai-edge-litert"
    assert engine.device.startswith("cpu (EdgeTPU delegate libedgetpu.so.1 not found")


def test_google_pycoral_is_preferred_when_it_really_imports(monkeypatch, tmp_path):
    """A stand-in with Google's layout: ``make_interpreter`` is used and the device is the TPU."""
    from ai_edge_litert.interpreter import Interpreter

    opened: list[tuple[str, object]] = []

    def make_interpreter(model_path: str, device: str | None = None) -> Interpreter:
        opened.append((model_path, device))
        return Interpreter(model_path=model_path)  # the CPU stands in for the TPU here

    edgetpu = types.ModuleType("pycoral.utils.edgetpu")
    edgetpu.make_interpreter = make_interpreter
    utils = types.ModuleType("pycoral.utils")
    utils.__path__ = []
    utils.edgetpu = edgetpu
    pkg = types.ModuleType("pycoral")
    pkg.__path__ = []
    pkg.utils = utils
    for name, mod in (("pycoral", pkg), ("pycoral.utils", utils), ("pycoral.utils.edgetpu", edgetpu)):
        monkeypatch.setitem(sys.modules, name, mod)

    path = make_tflite_conv(tmp_path / "conv_edgetpu.tflite", batch=2)
    engine = create_engine("edgetpu", path, device="usb:0")
    assert opened == [(str(path), "usb:0")]
    assert engine.runtime == "pycoral" and engine.device == "edgetpu:usb:0"
    assert available_backends()["edgetpu"] == "available"
    assert engine.run(images(2, 3, 8, 8))[0].shape == (2, 8, 8, 4)


def test_no_tflite_interpreter_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime", None)
    with pytest.raises(Unavailable, match=r"pip install 'edgebatch\[edgetpu\]'"):
        create_engine("tflite", make_tflite_conv(tmp_path / "c.tflite"))
    assert "ai-edge-litert" in available_backends()["tflite"]


def test_new_engine_is_unloaded():
    engine = new_engine("onnx")
    assert engine.batch_size == 0 and engine.memory_bytes() == 0


def test_edgetpu_library_present_but_no_device_says_so(monkeypatch, tmp_path):
    """libedgetpu installed, Coral unplugged: the delegate itself fails, and the reason says that."""
    import app.engines.litert as litert

    monkeypatch.setattr(litert, "ctypes", types.SimpleNamespace(CDLL=lambda name: object()))

    def load_delegate(library: str, options: dict | None = None):
        raise ValueError(f"Failed to load delegate from {library}")

    real = litert.import_interpreter_api()
    monkeypatch.setattr(litert, "import_interpreter_api", lambda: litert.InterpreterApi(real.name, real.interpreter, load_delegate))
    engine = create_engine("edgetpu", make_tflite_conv(tmp_path / "conv.tflite", batch=2))
    assert engine.device == "cpu (EdgeTPU delegate libedgetpu.so.1 found no device: Failed to load delegate from libedgetpu.so.1)"
