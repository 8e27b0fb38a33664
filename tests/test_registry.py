"""The model repository on its default store (SQLite + local artifact folder).

Real MLflow, real ONNX Runtime, real files: the tests build small ONNX networks,
register them, tamper with artifacts and race two processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.errors import BadRequest, EdgebatchError, NotFound, Unavailable
from app.state import StateDir
from model_registry import demo as demo_module
from model_registry.builders import (
    VariantFile,
    build_onnx_variants,
    build_tensorrt_variants,
    parse_batch_sizes,
    parse_variant_args,
    scan_variant_folder,
    variants_from_files,
)
from model_registry.cache import IntegrityError
from model_registry.demo import DEMO_MODEL, ensure_demo_model, write_synthetic_detector
from model_registry.repository import ModelRepository, parse_model_ref, validate_name

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

BATCHES = [1, 2, 4, 8, 16]


@pytest.fixture(autouse=True)
def _no_ambient_registry(monkeypatch):
    """A developer's MLFLOW_TRACKING_URI must not send test models to a real server."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sources")
    return {
        "dynamic": write_synthetic_detector(folder / "dynamic.onnx"),
        "fixed": write_synthetic_detector(folder / "fixed1.onnx", batch=1),
        "baked": write_synthetic_detector(folder / "baked1.onnx", batch=1, bake_batch_reshape=True),
    }


@pytest.fixture(scope="module")
def variants(sources, tmp_path_factory) -> list[VariantFile]:
    return build_onnx_variants(sources["dynamic"], BATCHES, tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def state(tmp_path_factory) -> StateDir:
    return StateDir(tmp_path_factory.mktemp("state")).ensure()


@pytest.fixture(scope="module")
def repo(state) -> ModelRepository:
    repository = ModelRepository(state=state)
    repository.check_available()
    return repository


@pytest.fixture(scope="module")
def registered(repo, variants) -> str:
    version = repo.register_version("yolo-test", variants, description="test build")
    repo.set_alias("yolo-test", "production", version)
    return version


# ---------------------------------------------------------------- builders
def test_dynamic_export_gives_one_runnable_fixed_batch_file_per_size(variants):
    assert [v.batch_size for v in variants] == BATCHES
    for v in variants:
        session = ort.InferenceSession(str(v.path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape == [v.batch_size, 3, 320, 320]
        (out,) = session.run(None, {"images": np.ones(v.input_shape, np.float32)})
        assert out.shape == (v.batch_size, 6, 1600)
        assert v.input_shape == (v.batch_size, 3, 320, 320) and v.precision == "fp32"
        assert v.size_bytes == v.path.stat().st_size and len(v.sha256) == 64


def test_fixed_batch_export_without_baked_constants_is_rebatched(sources, tmp_path):
    built = build_onnx_variants(sources["fixed"], [1, 4], tmp_path)
    assert [v.input_shape[0] for v in built] == [1, 4]
    assert built[1].tags["source_batch"] == "1"


def test_fixed_batch_export_with_baked_reshape_is_refused_with_the_fix(sources, tmp_path):
    with pytest.raises(BadRequest) as err:
        build_onnx_variants(sources["baked"], [1, 8], tmp_path)
    assert "flatten_baked" in err.value.message and "dynamic batch axis" in err.value.message
    # its own batch still builds: nothing is re-batched
    assert build_onnx_variants(sources["baked"], [1], tmp_path)[0].batch_size == 1


def test_batch_size_and_variant_arguments_are_parsed_or_refused():
    assert parse_batch_sizes("8,1,2,2") == [1, 2, 8]
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(BadRequest):
            parse_batch_sizes(bad)
    assert parse_variant_args(["1=a.tflite", "8=b.tflite"]) == {1: Path("a.tflite"), 8: Path("b.tflite")}
    with pytest.raises(BadRequest, match="BATCH=FILE"):
        parse_variant_args(["a.tflite"])


def _fake_tflite(path: Path, edgetpu: bool) -> Path:
    body = b"\x1c\x00\x00\x00TFL3" + b"\x00" * 64 + (b"edgetpu-custom-op" if edgetpu else b"") + b"\x00" * 8
    path.write_bytes(body)
    return path


def test_edgetpu_and_tflite_files_are_registered_as_given(repo, tmp_path):
    for b in (1, 8):
        _fake_tflite(tmp_path / f"det_b{b}_edgetpu.tflite", edgetpu=True)
    _fake_tflite(tmp_path / "plain_b1.tflite", edgetpu=False)
    files = scan_variant_folder(tmp_path, "edgetpu")
    assert sorted(files) == [1, 8]
    edgetpu = variants_from_files("edgetpu", files)
    assert {v.precision for v in edgetpu} == {"int8"}
    with pytest.raises(BadRequest, match="edgetpu_compiler"):
        variants_from_files("edgetpu", {1: tmp_path / "plain_b1.tflite"})
    (tmp_path / "junk.tflite").write_bytes(b"not a flatbuffer")
    with pytest.raises(BadRequest, match="TFL3"):
        variants_from_files("tflite", {1: tmp_path / "junk.tflite"})

    version = repo.register_version("coral-det", edgetpu + variants_from_files("tflite", {1: tmp_path / "plain_b1.tflite"}))
    found = repo.find("coral-det", version=version, batch_size=8, backend="edgetpu")
    assert found.path.read_bytes() == (tmp_path / "det_b8_edgetpu.tflite").read_bytes()
    assert repo.find("coral-det", version=version, batch_size=1, backend="tflite").backend == "tflite"


@dataclass
class _FakePlan:
    path: Path
    batch_size: int
    input_shape: tuple[int, ...]
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str


def test_tensorrt_plans_are_built_per_batch_and_tagged_with_gpu_and_version(sources, tmp_path):
    calls = []

    def fake_builder(onnx_path, batch_sizes, out_dir, *, fp16=False):
        calls.append((Path(onnx_path), list(batch_sizes), fp16))
        plans = []
        for b in batch_sizes:
            plan = Path(out_dir) / f"plan_b{b}.engine"
            plan.write_bytes(b"plan" * b)
            plans.append(_FakePlan(plan, b, (b, 3, 320, 320), "fp16" if fp16 else "fp32", "10.9.0", "NVIDIA H100", "9.0"))
        return plans

    built = build_tensorrt_variants(sources["dynamic"], [1, 8], tmp_path / "a", fp16=True, build_plans=fake_builder)
    assert calls == [(sources["dynamic"], [1, 8], True)]  # a dynamic export: one builder call, all sizes
    assert [(v.batch_size, v.precision, v.tags["gpu_name"], v.tags["tensorrt_version"]) for v in built] == [
        (1, "fp16", "NVIDIA H100", "10.9.0"), (8, "fp16", "NVIDIA H100", "10.9.0")]

    calls.clear()
    build_tensorrt_variants(sources["fixed"], [1, 4], tmp_path / "b", build_plans=fake_builder)
    # a fixed-batch export is re-batched to ONNX first, then one plan per batch size
    assert [(p.name, sizes) for p, sizes, _ in calls] == [("fixed1_b1.onnx", [1]), ("fixed1_b4.onnx", [4])]


# ---------------------------------------------------------------- names and refs
@pytest.mark.parametrize("bad", ["../etc", "a/b", "a\\b", "..", "x..y", "", "has space", "-lead", "é", "a" * 129])
def test_unsafe_model_names_are_refused(bad, repo, variants):
    with pytest.raises(BadRequest, match="not allowed"):
        validate_name(bad)
    with pytest.raises(BadRequest):
        repo.register_version(bad, variants[:1])


def test_model_refs_parse_name_version_and_alias():
    assert parse_model_ref("yolo") == ("yolo", None, None)
    assert parse_model_ref("yolo/03") == ("yolo", "3", None)
    assert parse_model_ref("yolo@production") == ("yolo", None, "production")
    for bad in ("yolo/x", "yolo@", "../x@prod", "yolo@latest"):
        with pytest.raises(BadRequest):
            parse_model_ref(bad)


# ---------------------------------------------------------------- repository
def test_versions_list_their_variants_without_download(repo, registered, variants):
    cached_before = sorted(repo.cache.root.rglob("blobs/*/*/*"))
    listed = repo.list_variants("yolo-test", alias="production")
    assert sorted(repo.cache.root.rglob("blobs/*/*/*")) == cached_before  # metadata only, no download
    assert [(v.backend, v.batch_size) for v in listed] == [("onnx", b) for b in BATCHES]
    assert [v.sha256 for v in listed] == [v.sha256 for v in variants]
    assert listed[2].input_shape == (4, 3, 320, 320) and listed[2].size_bytes == variants[2].size_bytes
    assert repo.resolve("yolo-test", alias="production") == registered
    assert repo.resolve("yolo-test") == registered


def test_find_downloads_once_verifies_and_reuses_the_cache(repo, registered, variants):
    first = repo.find("yolo-test", alias="production", batch_size=8)
    assert first.version == registered and first.batch_size == 8 and first.backend == "onnx"
    assert first.path.is_file() and first.path.is_relative_to(repo.cache.root)
    assert first.path.read_bytes() == variants[3].path.read_bytes()
    mtime = first.path.stat().st_mtime_ns
    again = repo.find("yolo-test", version=registered, batch_size=8)
    assert again.path == first.path and again.path.stat().st_mtime_ns == mtime  # reused, not re-downloaded
    session = ort.InferenceSession(str(again.path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.zeros(again.input_shape, np.float32)})[0].shape[0] == 8


def test_missing_variant_error_lists_the_variants_that_exist(repo, registered):
    with pytest.raises(NotFound) as err:
        repo.find("yolo-test", alias="production", batch_size=32)
    assert "batch 32" in err.value.message and "onnx batch 1,2,4,8,16" in err.value.message
    with pytest.raises(NotFound, match="tensorrt"):
        repo.find("yolo-test", alias="production", batch_size=8, backend="tensorrt")
    with pytest.raises(NotFound, match="no alias 'canary'"):
        repo.find("yolo-test", alias="canary", batch_size=8)
    with pytest.raises(NotFound, match="not in the registry"):
        repo.describe("never-registered")


def test_aliases_and_in_use_tags_show_up_in_describe(repo, registered, variants):
    second = repo.register_version("yolo-test", variants[:2], description="smaller")
    assert int(second) == int(registered) + 1
    repo.set_alias("yolo-test", "canary", second)
    repo.mark_in_use("yolo-test", registered, "detector-a")
    described = repo.describe("yolo-test")
    assert described.aliases == {"production": registered, "canary": second}
    by_version = {v.version: v for v in described.versions}
    assert "detector-a" in by_version[registered].in_use and by_version[second].in_use == {}
    assert [v.batch_size for v in by_version[second].variants] == [1, 2]
    assert [v.version for v in repo.describe("yolo-test", "@canary").versions] == [second]
    repo.release("yolo-test", registered, "detector-a")
    assert repo.describe(f"yolo-test/{registered}").versions[0].in_use == {}
    with pytest.raises(NotFound, match="no version 99"):
        repo.set_alias("yolo-test", "production", "99")
    assert "yolo-test" in {m.name for m in repo.list_models()}


def test_tampered_registry_artifact_is_refused_and_never_cached(repo, state, variants, tmp_path):
    version = repo.register_version("tamper-store", variants[:2])
    artifact = repo.list_variants("tamper-store", version=version)[1].tags["artifact"]
    stored = Path(artifact.removeprefix("file://"))
    assert stored.is_relative_to(state.artifacts)  # SQLite mode keeps artifacts in the state folder
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])  # truncated in the store
    with pytest.raises(IntegrityError) as err:
        repo.find("tamper-store", version=version, batch_size=2)
    assert "tampered" in err.value.message and err.value.status == 503
    assert not list(repo.cache.root.glob(f"blobs/*/{variants[1].sha256}/*"))


def test_tampered_cache_entry_is_refused_removed_and_healed(repo, registered):
    found = repo.find("yolo-test", version=registered, batch_size=4)
    found.path.write_bytes(b"\x00" * found.size_bytes)  # same size, wrong bytes
    with pytest.raises(IntegrityError, match="removed"):
        repo.find("yolo-test", version=registered, batch_size=4)
    assert not found.path.exists()
    healed = repo.find("yolo-test", version=registered, batch_size=4)
    assert healed.path == found.path and healed.path.stat().st_size == found.size_bytes


def test_unusable_store_gives_unavailable_naming_the_uri(tmp_path):
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    uri = f"sqlite:///{blocker}/sub/mlflow.db"
    with pytest.raises(Unavailable) as err:
        ModelRepository(uri, state=StateDir(tmp_path / "s")).check_available()
    assert uri in err.value.message and "mlflow server" in err.value.message


# ---------------------------------------------------------------- concurrency
def _child(state_root: str, source: str, out_dir: str, assets: str, barrier, results) -> None:
    """One of two processes on one node: register a build, then ensure the demo model, both at once."""
    repo = ModelRepository(state=StateDir(Path(state_root)))
    built = build_onnx_variants(Path(source), [1, 2], Path(out_dir))
    repo.check_available()  # both children open (and migrate) a fresh SQLite store at once
    barrier.wait(timeout=60)
    results.put(("race", repo.register_version("race", built)))
    barrier.wait(timeout=60)
    results.put(("demo", ensure_demo_model(repo, Path(assets))))


@pytest.fixture()
def demo_assets(sources, tmp_path) -> Path:
    assets = tmp_path / "assets"
    assets.mkdir()
    (assets / "detector.onnx").write_bytes(sources["dynamic"].read_bytes())
    (assets / "detector.json").write_text(json.dumps({"labels": ["person", "car"], "input_size": 320}))
    return assets


def test_two_processes_at_once_get_distinct_versions_and_one_demo_model(sources, demo_assets, tmp_path):
    root = tmp_path / "state"
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    children = [ctx.Process(target=_child, args=(str(root), str(sources["dynamic"]), str(tmp_path / f"out{i}"),
                                                 str(demo_assets), barrier, results)) for i in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [c.exitcode for c in children] == [0, 0]
    got: dict[str, list[str]] = {}
    for _ in range(4):
        kind, version = results.get(timeout=5)
        got.setdefault(kind, []).append(version)

    assert sorted(got["race"]) == ["1", "2"]  # both builds landed, each with its own version
    repo = ModelRepository(state=StateDir(root))
    for version in got["race"]:
        assert [v.batch_size for v in repo.list_variants("race", version=version)] == [1, 2]

    assert got["demo"] == ["1", "1"]  # one demo version, both callers agree on it
    described = repo.describe(DEMO_MODEL)
    assert [v.version for v in described.versions] == ["1"] and described.aliases == {"production": "1"}
    assert [v.batch_size for v in described.versions[0].variants] == BATCHES
    assert json.loads(described.versions[0].tags["edgebatch.metadata"])["labels"] == ["person", "car"]
    assert json.loads(described.versions[0].variants[0].tags["labels"]) == ["person", "car"]
    assert ensure_demo_model(repo, demo_assets) == "1"  # idempotent


def test_ensure_demo_model_race_across_nodes_keeps_the_lowest_version(repo, demo_assets, monkeypatch):
    first = ensure_demo_model(repo, demo_assets)
    # a second node that checked before the first registered: it builds too, then yields
    real = demo_module._production_or_latest
    seen = []

    def stale_first_look(r: ModelRepository) -> str | None:
        seen.append(r)
        return None if len(seen) == 1 else real(r)

    monkeypatch.setattr(demo_module, "_production_or_latest", stale_first_look)
    other_node = ModelRepository(repo.tracking_uri, state=repo.state, cache_dir=repo.cache.root.parent / "node-b")
    assert ensure_demo_model(other_node, demo_assets) == first
    assert [v.version for v in repo.describe(DEMO_MODEL).versions] == [first]


def test_concurrent_threads_register_distinct_versions(repo, variants):
    results: list[str] = []
    barrier = threading.Barrier(2)

    def build() -> None:
        barrier.wait(timeout=30)
        results.append(ModelRepository(repo.tracking_uri, state=repo.state).register_version("threads", variants[:1]))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == ["1", "2"]


# ---------------------------------------------------------------- CLI and bench
def _parser() -> argparse.ArgumentParser:
    from app.commands import models

    parser = argparse.ArgumentParser(prog="edgebatch")
    sub = parser.add_subparsers(dest="command", required=True)
    models.register(sub)
    bench = sub.add_parser("bench").add_subparsers(dest="bench_command", required=True)
    models.add_bench_registry(bench)
    return parser


def _cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


def test_cli_build_list_show_promote(sources, state, repo, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGEBATCH_HOME", str(state.root))
    labels = tmp_path / "labels.txt"
    labels.write_text("person\ncar\n")
    assert _cli(["models", "build", str(sources["dynamic"]), "--name", "cli-det", "--batch-sizes", "1,2",
                 "--labels", str(labels), "--no-progress"]) == 0
    out = capsys.readouterr()
    version = out.out.strip().splitlines()[-1]
    assert version == "1" and "registered cli-det version 1" in out.err
    assert _cli(["models", "promote", "cli-det", version, "--alias", "production"]) == 0
    assert "cli-det@production -> version 1" in capsys.readouterr().out
    assert _cli(["models", "list"]) == 0
    assert "production->1" in capsys.readouterr().out
    repo.mark_in_use("cli-det", version, "detector")
    assert _cli(["models", "show", "cli-det@production"]) == 0
    shown = capsys.readouterr().out
    assert "in use by: detector" in shown and repo.list_variants("cli-det", version="1")[1].sha256 in shown
    assert _cli(["models", "show", "cli-det", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [v["batch_size"] for v in data["versions"][0]["variants"]] == [1, 2]
    assert json.loads(data["versions"][0]["variants"][0]["tags"]["labels"]) == ["person", "car"]
    with pytest.raises(BadRequest, match="needs --variant"):
        _cli(["models", "build", "--name", "x", "--backend", "edgetpu"])
    with pytest.raises(EdgebatchError, match="no version 7"):
        _cli(["models", "promote", "cli-det", "7"])


def test_cli_build_without_source_registers_the_demo_export_as_a_second_model(state, repo, monkeypatch, capsys):
    """`edgebatch models build --name NAME` builds the demo detector's own export (with its labels):
    how the tenancy example's second model is registered, and what a GPU node builds plans of."""
    monkeypatch.setenv("EDGEBATCH_HOME", str(state.root))
    assert _cli(["models", "build", "--name", "second-detector", "--batch-sizes", "1,2", "--alias", "production",
                 "--no-progress"]) == 0
    out = capsys.readouterr()
    assert "building the demo detector's export" in out.err and "labels: 3 the demo detector's" in out.err
    version = out.out.strip().splitlines()[-1]
    assert repo.resolve("second-detector", alias="production") == version
    variants = repo.list_variants("second-detector", version=version)
    assert [(v.backend, v.batch_size) for v in variants] == [("onnx", 1), ("onnx", 2)]
    assert json.loads(variants[0].tags["labels"]) == ["square", "circle", "triangle"]


ULTRALYTICS_NAMES = "{0: 'person', 1: 'bicycle', 2: 'car', 3: 'dog'}"


def _ultralytics_export(path: Path, **metadata: str) -> Path:
    """A tiny export shaped like Ultralytics' ``dynamic=True`` ONNX: batch, height and width dynamic,
    and its own description in metadata_props (imgsz, stride, names as a Python-literal dict)."""
    from tests.tiny_models import make_onnx_conv

    return make_onnx_conv(path, batch=None, height="height", width="width", metadata=metadata)


def test_dynamic_image_size_is_built_at_the_exports_own_imgsz_or_at_imgsz(tmp_path):
    src = _ultralytics_export(tmp_path / "yolo.onnx", imgsz="[32, 48]", stride="16", names=ULTRALYTICS_NAMES)
    built = build_onnx_variants(src, [1, 2], tmp_path / "a")
    assert [v.input_shape for v in built] == [(1, 3, 32, 48), (2, 3, 32, 48)] and built[0].tags["imgsz"] == "32,48"
    session = ort.InferenceSession(str(built[1].path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"images": np.zeros((2, 3, 32, 48), np.float32)})[0].shape == (2, 4, 32, 48)
    assert build_onnx_variants(src, [4], tmp_path / "b", imgsz=(64, 64))[0].input_shape == (4, 3, 64, 64)
    with pytest.raises(BadRequest, match="not a multiple of yolo.onnx's stride 16"):
        build_onnx_variants(src, [1], tmp_path / "c", imgsz=(40, 40))
    bare = _ultralytics_export(tmp_path / "bare.onnx")
    with pytest.raises(BadRequest, match="pass --imgsz H,W"):
        build_onnx_variants(bare, [1], tmp_path / "d")
    assert build_onnx_variants(bare, [1], tmp_path / "e", imgsz=(16, 24))[0].input_shape == (1, 3, 16, 24)


def test_export_metadata_is_parsed_as_literals_never_evaluated(tmp_path):
    from model_registry.builders import export_metadata, parse_imgsz

    meta = export_metadata(_ultralytics_export(tmp_path / "ok.onnx", imgsz="[640, 640]", stride="32",
                                               names=ULTRALYTICS_NAMES))
    assert meta.imgsz == (640, 640) and meta.stride == 32 and meta.names == ["person", "bicycle", "car", "dog"]
    marker = tmp_path / "ran"
    evil = _ultralytics_export(tmp_path / "evil.onnx", names=f"__import__('pathlib').Path({str(marker)!r}).touch()")
    with pytest.raises(BadRequest, match="'names' of evil.onnx is not a Python literal"):
        export_metadata(evil)
    assert not marker.exists()
    with pytest.raises(BadRequest, match="not a table of class ids"):
        export_metadata(_ultralytics_export(tmp_path / "gap.onnx", names="{0: 'a', 5: 'b'}"))
    with pytest.raises(BadRequest, match="too long"):
        export_metadata(_ultralytics_export(tmp_path / "big.onnx", names="[" + "'x'," * 300_000 + "]"))
    assert parse_imgsz("480,640", "--imgsz") == (480, 640) and parse_imgsz("640", "--imgsz") == (640, 640)
    for bad in ("0", "a,b", "1,2,3", "99999"):
        with pytest.raises(BadRequest, match="--imgsz"):
            parse_imgsz(bad, "--imgsz")


def test_cli_build_takes_the_exports_names_and_keeps_labels_across_versions(state, repo, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("EDGEBATCH_HOME", str(state.root))
    src = _ultralytics_export(tmp_path / "yolo.onnx", imgsz="[32, 32]", stride="16", names=ULTRALYTICS_NAMES)
    assert _cli(["models", "build", str(src), "--name", "ultra", "--batch-sizes", "1,2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "labels: 4 from yolo.onnx's metadata (names)" in err
    first = repo.list_variants("ultra", version="1")
    assert [v.input_shape for v in first] == [(1, 3, 32, 32), (2, 3, 32, 32)]
    assert json.loads(first[0].tags["labels"]) == ["person", "bicycle", "car", "dog"]
    retrained = _ultralytics_export(tmp_path / "plain.onnx")  # no metadata at all: size from --imgsz
    assert _cli(["models", "build", str(retrained), "--name", "ultra", "--batch-sizes", "1", "--imgsz", "16",
                 "--no-progress"]) == 0
    assert "labels: 4 kept from the previous version of ultra" in capsys.readouterr().err
    second = repo.list_variants("ultra", version="2")
    assert second[0].input_shape == (1, 3, 16, 16)
    assert json.loads(second[0].tags["labels"]) == ["person", "bicycle", "car", "dog"]


def test_bench_registry_prints_a_table_and_json_last(sources, repo, capsys):
    assert _cli(["bench", "registry", "--source", str(sources["dynamic"]), "--batch-sizes", "1,2",
                 "--tracking-uri", repo.tracking_uri,
                 "--repeats", "2", "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert "COLD FIND ms" in "\n".join(lines[:-1])
    assert [r["batch_size"] for r in result["per_variant"]] == [1, 2]
    assert result["register_ms"] > 0 and all(r["cold_find_ms"] > 0 for r in result["per_variant"])
    assert not any(m.name.startswith("bench-") for m in repo.list_models())  # a shared registry is left clean
