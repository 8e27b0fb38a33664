"""Layer loading (issue 7): split models, the executor under a memory budget, the multi-model host
and its Serve deployment.

Memory figures are measured (the kernel's resident high-water mark), so assertions compare them to
the budget, never to exact values; nothing here asserts on time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.layered.executor import (
    LayeredExecutor,
    MemoryBudgetError,
    MemoryLedger,
    isolated,
    profile_stages,
    profile_stages_isolated,
    run_once,
)
from app.layered.multimodel import ModelSource, MultiModelHost
from app.layered.synthetic import write_conv_chain
from model_registry.split import cut_points, split_onnx
from policies.loading import LOADING_POLICIES, BudgetExceeded, plan_loading

DEMO = Path(__file__).resolve().parents[1] / "app" / "demo" / "assets" / "detector.onnx"


def _whole(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@pytest.fixture(scope="module")
def demo_input() -> dict[str, np.ndarray]:
    return {"images": np.random.default_rng(1).random((1, 3, 320, 320), dtype=np.float32)}


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A 4-layer conv chain (about 2.4 MB of weights, 0.6 MB a layer), split into 4 stages and profiled."""
    root = tmp_path_factory.mktemp("chain")
    whole = write_conv_chain(root / "chain.onnx", layers=4, channels=128, size=16)
    files = split_onnx(whole, 4, root / "stages")
    x = {"x": np.random.default_rng(2).random((1, 128, 16, 16), dtype=np.float32)}
    staged = profile_stages_isolated("chain", [f.path for f in files], x)  # clean process: honest costs
    return {"whole": whole, "files": files, "staged": staged, "input": x, "root": root}


# ----------------------------------------------------------------------------- splitting


@pytest.mark.parametrize("stages", [2, 3, 5])
def test_split_execution_equals_whole_model(tmp_path, demo_input, stages):
    expected = _whole(DEMO, demo_input)
    files = split_onnx(DEMO, stages, tmp_path / f"k{stages}")
    assert [f.index for f in files] == list(range(stages))
    assert all(f.path.is_file() and f.size_bytes == f.path.stat().st_size and len(f.sha256) == 64 for f in files)
    staged = profile_stages("demo", [f.path for f in files], demo_input)
    executor = LayeredExecutor(MemoryLedger(10**10))
    for policy in LOADING_POLICIES:
        result = executor.run(staged, policy, demo_input)
        (got,) = result.outputs.values()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"{policy}, {stages} stages")
    assert executor.memory.held() == {}  # every stage was freed after the request


def test_split_refuses_more_stages_than_cut_points(tmp_path):
    import onnx

    from app.errors import BadRequest

    path = write_conv_chain(tmp_path / "small.onnx", layers=2, channels=8, size=4)
    possible = len(cut_points(onnx.load(str(path)))) + 1
    with pytest.raises(BadRequest, match=f"at most {possible} stages"):
        split_onnx(path, possible + 1, tmp_path / "out")


# ----------------------------------------------------------------------------- budget


def test_budget_never_exceeded_measured_peak(chain):
    staged = chain["staged"]
    bulk_peak = plan_loading(staged.spec, "bulk").peak_bytes
    budget = int(bulk_peak * 0.7)  # bulk and linear cannot fit; partial and interleaved must
    expected = _whole(chain["whole"], chain["input"])
    for policy in ("partial", "interleaved"):
        # measured in a fresh process: here, pages freed by earlier tests would be reused unseen
        result = isolated(run_once, staged, policy, chain["input"], budget)
        np.testing.assert_allclose(next(iter(result.outputs.values())), expected, rtol=1e-4, atol=1e-5)
        assert result.planned_peak_bytes <= budget
        assert result.accounted_peak_bytes <= budget, (policy, result.accounted_peak_bytes, budget)
        assert 0 < result.measured_peak_bytes <= budget, (policy, result.measured_peak_bytes, budget)
        assert result.measure_method == "VmHWM"


def test_budget_exceeded_is_refused_before_anything_loads(chain):
    staged = chain["staged"]
    bulk_peak = plan_loading(staged.spec, "bulk").peak_bytes
    budget = int(bulk_peak * 0.7)
    with pytest.raises(BudgetExceeded) as planned:
        plan_loading(staged.spec, "bulk", budget)
    assert planned.value.needed_bytes == bulk_peak and planned.value.budget_bytes == budget
    executor = LayeredExecutor(MemoryLedger(budget))
    with pytest.raises(MemoryBudgetError) as refused:
        executor.run(staged, "bulk", chain["input"])
    assert f"{bulk_peak / 1e6:.1f} MB" in refused.value.message and f"{budget / 1e6:.1f} MB" in refused.value.message
    assert "nothing was loaded" in refused.value.message
    assert executor.memory.peak_bytes == 0 and executor.memory.held() == {}


def test_ledger_refuses_a_load_beyond_the_budget():
    ledger = MemoryLedger(100)
    ledger.reserve("a", 60)
    with pytest.raises(MemoryBudgetError, match="budget"):
        ledger.reserve("b", 50)
    ledger.observe(90)  # 30 bytes freed but not returned to the OS count too
    assert ledger.resident_bytes == 90
    with pytest.raises(MemoryBudgetError):
        ledger.reserve("b", 20)
    ledger.release("a")
    ledger.release("a")  # idempotent
    ledger.clear_residual()
    ledger.reserve("b", 100)
    assert ledger.peak_bytes == 100


# ----------------------------------------------------------------------------- interleaving


def test_interleaved_overlaps_loading_and_running(chain):
    executor = LayeredExecutor(MemoryLedger(10**10))
    result = executor.run(chain["staged"], "interleaved", chain["input"])
    workers = {r.op: r.worker for r in result.steps if r.op in ("load", "run")}
    assert workers == {"load": "loader", "run": "executor"}
    # stage i+1 loads while stage i runs, read from the order of start/end events
    assert any(load == run + 1 for load, run in result.overlaps()), result.events
    # and never more than two stages resident: load i+2 starts after free i ended
    pos = {e: i for i, e in enumerate(result.events)}
    for i in range(len(chain["staged"].stages) - 2):
        assert pos[f"end free {i}"] < pos[f"start load {i + 2}"]
    bulk = executor.run(chain["staged"], "bulk", chain["input"])
    assert bulk.overlaps() == []  # bulk: every load ends before the first run starts


# ----------------------------------------------------------------------------- multi-model host


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Three small whole models (about 2.4 MB of file each) and one big one with stages."""
    root = tmp_path_factory.mktemp("zoo")
    sources = {}
    for i, name in enumerate(("alpha", "beta", "gamma")):
        path = write_conv_chain(root / f"{name}.onnx", layers=3, channels=96, size=8, seed=i)
        sources[name] = ModelSource(name, "1", path)
    big = write_conv_chain(root / "big.onnx", layers=4, channels=192, size=8, seed=9)
    stages = split_onnx(big, 4, root / "big-stages")
    sources["big"] = ModelSource("big", "1", big, tuple(f.path for f in stages))
    return sources


def _input(channels: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, channels, size, size), dtype=np.float32)


def test_host_keeps_models_resident_and_evicts_lru(zoo):
    probe = MultiModelHost(10**10, zoo.__getitem__)
    one = probe.infer("alpha", _input(96, 8))
    whole = probe.info()["models"]["alpha"]["whole_bytes"]
    probe.close()
    host = MultiModelHost(int(whole * 2.5), zoo.__getitem__)  # room for two whole models, not three
    try:
        x = _input(96, 8)
        first = host.infer("alpha", x)
        assert first.mode == "whole" and first.loaded_whole
        np.testing.assert_allclose(next(iter(first.outputs.values())), next(iter(one.outputs.values())), rtol=1e-5)
        host.infer("beta", x)
        again = host.infer("alpha", x)
        assert not again.loaded_whole  # still resident: no reload
        third = host.infer("gamma", x)
        assert third.evicted == ["beta"]  # beta was used least recently, not alpha
        assert host.info()["resident_models"] == ["alpha", "gamma"]
        assert host.memory.peak_bytes <= host.memory.budget_bytes
        assert host.infer("beta", x).evicted == ["alpha"]
    finally:
        host.close()
    assert host.memory.resident_bytes == 0


def test_host_runs_a_model_that_does_not_fit_split(zoo):
    x = _input(192, 8, seed=3)
    expected = _whole(zoo["big"].whole_path, {"x": x})
    host = MultiModelHost(10**10, zoo.__getitem__, policy="interleaved")
    try:
        host.infer("alpha", _input(96, 8))  # resident whole; the split run must make room for itself
        big = host._hosted("big")
        assert big.staged is not None and len(big.staged.stages) == 4
        host.memory.budget_bytes = big.whole_bytes - 1
        assert not host.fits_whole(big)
        assert plan_loading(big.staged.spec, "interleaved").peak_bytes < host.memory.budget_bytes
        out = host.infer("big", x)
        assert out.mode == "split" and out.policy == "interleaved"
        np.testing.assert_allclose(next(iter(out.outputs.values())), expected, rtol=1e-4, atol=1e-5)
        assert host.memory.peak_bytes <= host.memory.budget_bytes
        assert out.measured_peak_bytes <= host.memory.budget_bytes
    finally:
        host.close()


def test_host_rejects_bad_requests_with_the_figure(zoo):
    from app.errors import BadRequest, Unavailable

    host = MultiModelHost(1_000_000, zoo.__getitem__)
    try:
        with pytest.raises(BadRequest, match="shape"):
            host.infer("alpha", _input(96, 4))
        with pytest.raises(Unavailable, match="MB"):  # the big model cannot run even split in 1 MB
            host.infer("big", _input(192, 8))
    finally:
        host.close()


@pytest.mark.parametrize("order", ["masa", "fcfs"])
def test_request_order_across_models(zoo, order):
    """Queue [big (split, long), alpha (resident, short)]: MASA serves alpha first, FCFS big first."""
    host = MultiModelHost(10**10, zoo.__getitem__, order=order)
    try:
        host.infer("alpha", _input(96, 8))
        host.memory.budget_bytes = host._hosted("big").whole_bytes - 1  # big runs split
        f_big = host.submit("big", _input(192, 8))
        f_alpha = host.submit("alpha", _input(96, 8))
        host.run_pending()
        big, alpha = f_big.result(timeout=120), f_alpha.result(timeout=120)
        first = alpha if order == "masa" else big
        assert host.served_order[-2] == first.request_id, host.served_order
        assert big.mode == "split" and alpha.mode == "whole"
    finally:
        host.close()


# ----------------------------------------------------------------------------- registry + deployment


def _v2_binary(name: str, array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    import json

    header = json.dumps({"inputs": [{"name": name, "shape": list(array.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": array.nbytes}}]}).encode()
    return header + array.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                      "Content-Type": "application/octet-stream"}


@pytest.fixture(scope="module")
def layered_chain(demo_repo, tmp_path_factory):
    """A 4-layer, 256-channel chain (9.4 MB file) registered whole and split into 4 stages."""
    from model_registry.builders import build_onnx_variants
    from model_registry.split import find_stages, list_splits, register_split

    repo, _ = demo_repo
    root = tmp_path_factory.mktemp("registered-chain")
    source = write_conv_chain(root / "chain.onnx", layers=4, channels=256, size=8, seed=5)
    version = repo.register_version("layered-chain", build_onnx_variants(source, [1], root / "variants"))
    info = register_split(repo, "layered-chain", 4, version=version)
    assert [r["stage"] for r in info.records] == [0, 1, 2, 3]
    assert all(r["form"] == "split" and r["stage_count"] == 4 and len(r["sha256"]) == 64 for r in info.records)
    assert set(list_splits(repo, "layered-chain", version)) == {(1, 4)}
    paths = find_stages(repo, "layered-chain", version)  # downloaded through the verified cache
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    whole = repo.find("layered-chain", version=version, batch_size=1)  # the whole form is still there
    assert whole.path.is_file() and [v.backend for v in repo.list_variants("layered-chain", version=version)] == ["onnx"]
    return {"name": "layered-chain", "version": version, "source": source}


def test_split_registered_beside_whole_and_matches(layered_chain, demo_repo):
    from model_registry.split import find_stages

    repo, _ = demo_repo
    x = {"x": _input(256, 8, seed=7)}
    stages = find_stages(repo, layered_chain["name"], layered_chain["version"], stages=4)
    staged = profile_stages("layered-chain", stages, x)
    got = LayeredExecutor(MemoryLedger(10**10)).run(staged, "partial", x).outputs
    np.testing.assert_allclose(next(iter(got.values())), _whole(layered_chain["source"], x), rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def multimodel_url(deploy_apps, serve_app, layered_chain):
    app = {
        "name": "edgebatch-multimodel", "route_prefix": "/v1/multi",
        "import_path": "deployments.multimodel:build_app", "args": {},
        "deployments": [{"name": "MultiModel", "num_replicas": 1, "graceful_shutdown_timeout_s": 1,
                         "ray_actor_options": {"num_cpus": 0},
                         # the demo detector (about 19 MB resident) fits whole; the chain (about 48 MB) runs split,
                         # interleaved peak about 24 MB
                         "user_config": {"budget_mb": 30, "policy": "interleaved", "order": "masa"}}],
    }
    deploy_apps([app])
    yield f"{serve_app['url']}/v1/multi"
    deploy_apps(remove=["edgebatch-multimodel"])


def test_multimodel_deployment_serves_two_models_by_header(multimodel_url, layered_chain):
    import httpx

    images = np.random.default_rng(4).random((1, 3, 320, 320), dtype=np.float32)
    body, headers = _v2_binary("images", images)
    with httpx.Client(timeout=120) as client:
        demo = client.post(f"{multimodel_url}/infer", content=body,
                           headers={**headers, "serve_multiplexed_model_id": "demo-detector"})
        assert demo.status_code == 200, demo.text
        assert demo.headers["x-edgebatch-mode"] == "whole"
        (out,) = demo.json()["outputs"]
        assert out["name"] == "output0" and out["shape"] == [1, 7, 2000]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(1, 7, 2000),
                                   _whole(DEMO, {"images": images}), rtol=1e-3, atol=1e-3)

        x = _input(256, 8, seed=8)
        body, headers = _v2_binary("x", x)
        chain = client.post(f"{multimodel_url}/infer", content=body,
                            headers={**headers, "serve_multiplexed_model_id": "layered-chain"})
        assert chain.status_code == 200, chain.text
        assert chain.headers["x-edgebatch-mode"] == "split", client.get(f"{multimodel_url}/info").text
        (out,) = chain.json()["outputs"]
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                   _whole(layered_chain["source"], {"x": x}), rtol=1e-4, atol=1e-5)

        v2 = client.post(f"{multimodel_url}/v2/models/layered-chain/infer", content=body, headers=headers)
        assert v2.status_code == 200 and v2.json()["model_name"] == "layered-chain"

        info = client.get(f"{multimodel_url}/info").json()
        assert info["models"]["layered-chain"]["mode"] == "split"
        assert info["accounted_peak_bytes"] <= info["budget_bytes"] == 30_000_000


def test_multimodel_deployment_rejects_requests_without_a_model(multimodel_url):
    import httpx

    body, headers = _v2_binary("x", _input(256, 8))
    with httpx.Client(timeout=120) as client:
        missing = client.post(f"{multimodel_url}/infer", content=body, headers=headers)
        assert missing.status_code == 400
        assert "serve_multiplexed_model_id" in missing.json()["error"]
        unknown = client.post(f"{multimodel_url}/infer", content=body,
                              headers={**headers, "serve_multiplexed_model_id": "no-such-model"})
        assert unknown.status_code == 404 and "no-such-model" in unknown.json()["error"]
