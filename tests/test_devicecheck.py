"""`python -m app.devicecheck` from a bare copy of the project's files, on this CPU (no GPU here).

The accelerator machine it is meant for has torch, nvidia-ml-py, OpenCV and numpy but no Ray,
MLflow or FastAPI and no install of this project: the test runs the command from a copy of
app/ and policies/ only, with a tiny budget, and checks what it imports.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_ON_THE_DEVICE = ("ray", "mlflow", "fastapi", "starlette", "pydantic", "psutil", "httpx", "model_registry",
                     "deployments", "sqlalchemy")


@pytest.fixture(scope="module")
def bare_copy(tmp_path_factory) -> Path:
    """The project's files as they would travel to the device machine: no .venv, no install."""
    root = tmp_path_factory.mktemp("bare")
    files = subprocess.run(["git", "ls-files", "app", "policies"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, root / name)
    return root


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_import_chain_needs_no_ray_mlflow_or_fastapi(bare_copy):
    probe = _run(["-c", "import sys, app.devicecheck, app; print(app.__file__); "
                        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(NOT_ON_THE_DEVICE)!r})))"],
                 bare_copy)
    assert probe.returncode == 0, probe.stderr
    where, loaded = probe.stdout.splitlines()
    assert Path(where).resolve().is_relative_to(bare_copy.resolve())  # the copy, not the editable install
    assert loaded == "[]"


def test_the_device_check_runs_on_the_cpu_and_says_no_gpu_was_found(bare_copy, tmp_path):
    out = tmp_path / "check"
    proc = _run(["-m", "app.devicecheck", "--out", str(out), "--batch-sizes", "1,2", "--iterations", "2",
                 "--warmup", "1", "--windows", "12"], bare_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "**No GPU was found**" in proc.stdout
    assert (out / "devicecheck.md").read_text() in proc.stdout + "\n"
    result = json.loads((out / "devicecheck.json").read_text())
    assert result["gpu_found"] is False and result["machine"]["device"] == "cpu"
    assert list(result["curves"]) == ["torch"]  # no CUDA graph curve without CUDA
    points = result["curves"]["torch"]
    assert [p["batch_size"] for p in points] == [1, 2] and all(p["images_per_s"] > 0 and not p["error"] for p in points)
    assert all(p["memory_source"] == "estimate" for p in points)
    assert any("no NVIDIA GPU" in note for note in result["nvml"]["notes"])  # the NVML collector's own words
    assert result["correctness"]["torch"]["max_abs_diff_vs_onnxruntime_cpu"] < 2e-4  # the trained weights
    assert result["profile"]["kind"] == "measured" and result["profile"]["name"] == "devicecheck-cpu"
    replay = result["policies"][0]
    assert replay["streams"] == 1 and {r["policy"] for r in replay["policies"]} == {"algorithm1", "aimd",
                                                                                     "throughput_aware"}
    # the JSON is a device profile for the simulated bench as it is
    from app.simulation import load_profile

    assert load_profile(str(out / "devicecheck.json")).sizes == (1, 2)


def test_bad_flags_are_one_line(bare_copy, tmp_path):
    proc = _run(["-m", "app.devicecheck", "--out", str(tmp_path), "--batch-sizes", "0,x"], bare_copy)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--batch-sizes" in proc.stderr


def test_without_the_onnx_package_it_says_the_weights_are_random(bare_copy, tmp_path):
    """The GPU machine may lack `onnx`: the curve still runs, on seeded random weights, and says so."""
    code = ("import sys; sys.modules['onnx'] = None; from app.devicecheck import main; "
            f"sys.exit(main(['--out', {str(tmp_path)!r}, '--batch-sizes', '1', '--iterations', '1', '--warmup', '0', "
            "'--windows', '6']))")
    proc = _run(["-c", code], bare_copy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "devicecheck.json").read_text())
    assert result["weights"].startswith("random (seeded)") and "onnx package is not installed" in result["weights"]
    assert result["correctness"]["torch"]["onnxruntime"] == "not compared: random weights"
    assert "weights: random (seeded)" in proc.stdout
