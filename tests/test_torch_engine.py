"""The torch backend on the CPU: built by `models build --backend torch`, registered, found, loaded, run.

Real torch (the pinned CPU build of the `torch` extra), real MLflow, real ONNX Runtime: the demo
network's torch variants must give the ONNX variants' outputs, since they carry the same weights.
Without torch the backend is one line with the fix, and every other backend still serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.cli import main as cli
from app.constants import TORCH_REQUIREMENT
from app.engines import available_backends, create_engine, run_padded
from app.engines.torchrt import TorchEngine, estimate_activation_peak
from app.errors import BadRequest, ConfigError, Unavailable
from app.state import StateDir
from model_registry.builders import build_onnx_variants
from model_registry.repository import ModelRepository
from model_registry.torch_build import DEMO_ASSETS, build_torch_variants

ROOT = Path(__file__).resolve().parents[1]
DEMO_ONNX = DEMO_ASSETS / "detector.onnx"
RNG = np.random.default_rng(16)


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> StateDir:
    return StateDir(tmp_path_factory.mktemp("torch-state")).ensure()


@pytest.fixture(scope="module")
def built(state) -> dict[int, Path]:
    """`edgebatch models build --backend torch` (no SOURCE: the demo network), found back by batch size."""
    old = os.environ.get("EDGEBATCH_HOME")
    os.environ["EDGEBATCH_HOME"] = str(state.root)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        assert cli(["models", "build", "--backend", "torch", "--name", "demo-torch", "--batch-sizes", "1,2",
                    "--alias", "production", "--no-progress"]) == 0
    finally:
        if old is None:
            os.environ.pop("EDGEBATCH_HOME")
        else:
            os.environ["EDGEBATCH_HOME"] = old
    repo = ModelRepository(state=state)
    return {n: repo.find("demo-torch", alias="production", batch_size=n, backend="torch").path for n in (1, 2)}


@pytest.fixture(scope="module")
def onnx_variants(tmp_path_factory) -> dict[int, Path]:
    """The ONNX variants of the same weights, as `models build` (onnx) makes them."""
    built = build_onnx_variants(DEMO_ONNX, [1, 2], tmp_path_factory.mktemp("onnx-variants"))
    return {v.batch_size: v.path for v in built}


def onnx_outputs(batch: np.ndarray, variants: dict[int, Path]) -> np.ndarray:
    return create_engine("onnx", variants[batch.shape[0]]).run(batch)[0]


def test_registry_round_trip_gives_the_onnx_variants_outputs(built, state, onnx_variants):
    repo = ModelRepository(state=state)
    for n, path in built.items():
        variant = repo.find("demo-torch", alias="production", batch_size=n, backend="torch")
        assert variant.backend == "torch" and variant.input_shape == (n, 3, 320, 320)
        assert variant.tags["format"] == "torch.export" and variant.tags["torch_version"] == torch.__version__
        assert "square" in variant.tags["labels"]  # the demo's labels travel with the variant
        engine = create_engine("torch", path)
        assert (engine.backend, engine.batch_size, engine.device) == ("torch", n, "cpu")
        batch = RNG.random((n, 3, 320, 320), dtype=np.float32)
        ours, ref = engine.run(batch)[0], onnx_outputs(batch, onnx_variants)
        assert ours.shape == ref.shape == (n, 7, 2000)
        np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_partial_batch_is_padded_and_the_shape_is_checked(built, onnx_variants):
    engine = create_engine("torch", built[2])
    one = RNG.random((1, 3, 320, 320), dtype=np.float32)
    np.testing.assert_allclose(run_padded(engine, one)[0], onnx_outputs(one, onnx_variants), atol=2e-4, rtol=1e-4)
    with pytest.raises(BadRequest, match="does not match the model input"):
        engine.run(one)
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(Unavailable, match="not loaded"):
        engine.run(np.zeros((2, 3, 320, 320), np.float32))


def test_memory_on_the_cpu_is_an_estimate_from_the_program(built):
    small, big = create_engine("torch", built[1]), create_engine("torch", built[2])
    report = small.memory_report()
    assert report is not None and report.source == "estimate" and report.device == "cpu"
    assert report.allocated_bytes is None and report.max_reserved_bytes is None  # no device counters on a CPU
    onnx_weights = DEMO_ONNX.stat().st_size
    assert 0.9 * onnx_weights < report.weights_bytes < 1.1 * onnx_weights  # the same weights
    io = (3 * 320 * 320 + 7 * 2000) * 4
    assert small.memory_bytes() > report.weights_bytes + io
    # activations grow with the batch, weights do not
    assert big.memory_bytes() - big.memory_report().weights_bytes > 1.8 * (small.memory_bytes() - report.weights_bytes)
    small.close()
    assert small.memory_bytes() == 0 and small.memory_report() is None


def test_activation_estimate_frees_each_tensor_after_its_last_use():
    chain = torch.nn.Sequential(*[torch.nn.ReLU() for _ in range(6)])
    program = torch.export.export(chain, (torch.zeros(1, 1000),))
    # at most the input of a step and its output are live at once, never the whole chain
    assert estimate_activation_peak(program.graph) <= 2 * 4000


def test_cuda_graphs_knob_is_validated_and_refused_on_the_cpu(built):
    with pytest.raises(Unavailable, match="CUDA graphs are not available there"):
        create_engine("torch", built[1], options={"cuda_graphs": True})
    with pytest.raises(ConfigError, match="must be true or false"):
        create_engine("torch", built[1], options={"cuda_graphs": "yes"})
    if not torch.cuda.is_available():
        with pytest.raises(Unavailable, match="sees no CUDA GPU"):
            create_engine("torch", built[1], device="cuda:0")
    with pytest.raises(ConfigError, match="unknown torch device"):
        TorchEngine({"device": "tpu"}).load(built[1])
    with pytest.raises(ConfigError, match="not a torch.export program"):
        bad = built[1].parent / "not-a-program.pt2"
        bad.write_bytes(b"not a zip")
        create_engine("torch", bad)


class Scale(torch.nn.Module):
    def __init__(self, bake_batch: int | None = None) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bake_batch = bake_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).sigmoid()
        # a baked batch: the flattening names the exported batch as a constant
        return y.reshape(self.bake_batch, -1) if self.bake_batch else y.flatten(1)


def test_a_users_exported_program_is_rebuilt_per_batch_size(tmp_path):
    torch.manual_seed(1)
    model = Scale().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (torch.zeros(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "user.pt2"))
    variants = build_torch_variants(tmp_path / "user.pt2", [1, 3], tmp_path / "out")
    assert [(v.batch_size, v.input_shape) for v in variants] == [(1, (1, 3, 16, 16)), (3, (3, 3, 16, 16))]
    for v in variants:
        x = RNG.random(v.input_shape, dtype=np.float32)
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(create_engine("torch", v.path).run(x)[0], expected, atol=1e-6)


def test_a_program_that_bakes_its_batch_is_refused_with_the_fix(tmp_path):
    program = torch.export.export(Scale(bake_batch=1).eval(), (torch.zeros(1, 3, 8, 8),))
    torch.export.save(program, str(tmp_path / "baked.pt2"))
    with pytest.raises(BadRequest, match="dynamic batch axis|torch.export failed at batch 2"):
        build_torch_variants(tmp_path / "baked.pt2", [2], tmp_path / "out")
    (tmp_path / "junk.pt2").write_text("junk")
    with pytest.raises(BadRequest, match="is not a torch.export program"):
        build_torch_variants(tmp_path / "junk.pt2", [1], tmp_path / "out")


WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; "


def _without_torch(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EDGEBATCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH + code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=240)


def test_without_torch_the_backend_is_one_line_with_the_fix_and_onnx_still_serves(tmp_path):
    build = _without_torch("from app.cli import main; sys.exit(main(['models', 'build', '--backend', 'torch', "
                           "'--name', 'x']))", tmp_path)
    assert build.returncode == 2, build.stderr
    lines = [line for line in build.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in build.stderr, build.stderr
    assert TORCH_REQUIREMENT in lines[0] and "not installed" in lines[0]
    serve = _without_torch(
        "import numpy as np; from app.engines import available_backends, create_engine; "
        f"e = create_engine('onnx', {str(DEMO_ONNX)!r}, options={{'batch_size': 1}}); "
        "print(e.run(np.zeros((1, 3, 320, 320), np.float32))[0].shape); print(available_backends()['torch']); "
        "from app.errors import Unavailable\n"
        "try:\n    create_engine('torch', 'x.pt2')\nexcept Unavailable as exc:\n    print(exc.message)", tmp_path)
    assert serve.returncode == 0, serve.stderr
    shape, status, refusal = serve.stdout.splitlines()
    assert shape == "(1, 7, 2000)"
    assert status.startswith("PyTorch is not installed") and TORCH_REQUIREMENT in status
    assert "needs PyTorch" in refusal and TORCH_REQUIREMENT in refusal
    assert available_backends()["torch"] == "available"  # here it is installed (the dev extra)


def test_the_detector_serves_the_torch_variants_like_the_onnx_ones(built, state):
    """`backend: torch` in a DetectorConfig: the same detections as the ONNX demo model on the same frames."""
    from app.bench.images import sample_jpegs
    from app.config import DetectorConfig
    from app.detector import DetectRequest
    from model_registry.demo import DEMO_MODEL, ensure_demo_model
    from model_registry.source import local_detector

    ensure_demo_model(ModelRepository(state=state))
    jpegs = sample_jpegs(n=2)
    found = {}
    for model, backend in (("demo-torch", "torch"), (DEMO_MODEL, "onnx")):
        config = DetectorConfig(model=model, backend=backend, batch_sizes=[1, 2], max_batch_size=2)
        detector, _, _ = local_detector(config, state)
        variant = detector.setup(2)
        assert variant.variant.backend == backend
        results = [r.unwrap() for r in detector.handle_batch([DetectRequest.encoded(j) for j in jpegs])]
        found[backend] = [[(d.label, round(d.score, 2)) for d in r.detections] for r in results]
        detector.close()
    assert found["torch"] == found["onnx"] and any(found["onnx"])


def test_the_cuda_graphs_knob_of_a_detector_is_checked_and_reaches_the_engine(built, state):
    from pydantic import ValidationError

    from app.config import DetectorConfig
    from model_registry.source import local_detector

    with pytest.raises(ValidationError, match="cuda_graphs is a knob of the torch backend"):
        DetectorConfig(backend="onnx", cuda_graphs=True)
    config = DetectorConfig(model="demo-torch", backend="torch", batch_sizes=[1, 2], max_batch_size=1, cuda_graphs=True)
    detector, _, _ = local_detector(config, state)
    with pytest.raises(Unavailable, match="CUDA graphs are not available there"):  # this CPU says so, never ignores it
        detector.setup(1)
    detector.close()


class _FakeCuda:
    def __init__(self, count: int) -> None:
        self.count = count

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count


class _FakeTorch:
    __version__ = "fake"

    def __init__(self, gpus: int) -> None:
        self.cuda = _FakeCuda(gpus)


@pytest.mark.parametrize("gpus, options, expected", [
    (0, {}, "cpu"),
    (2, {}, "cuda:0"),
    (2, {"device": "cpu"}, "cpu"),
    (2, {"device": "cuda"}, "cuda:0"),
    (2, {"device_index": 1}, "cuda:1"),  # what create_engine(..., device="cuda:1") passes
])
def test_device_choice_is_cuda_when_there_is_one(gpus, options, expected):
    from app.engines.torchrt import resolve_device

    assert resolve_device(_FakeTorch(gpus), options) == expected


def test_a_gpu_index_the_node_lacks_is_refused():
    from app.engines.torchrt import resolve_device

    with pytest.raises(ConfigError, match="has 2 CUDA device"):
        resolve_device(_FakeTorch(2), {"device": "cuda:2"})
