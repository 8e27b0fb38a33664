"""`edgebatch bench sweep`: the engine-level sweep on a tiny ONNX model (no Ray, no registry)."""

from __future__ import annotations

import csv
import json

import pytest

from app.bench.sweep import MIN_RUNS, SweepPoint, run_point, sweep
from app.engines import create_engine
from tests.tiny_models import make_onnx_conv


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_onnx_conv(tmp_path_factory.mktemp("sweep") / "tiny.onnx", batch=None, height=16, width=16)


def factory_for(path, calls):
    def factory(backend: str, batch_size: int):
        calls.append((backend, batch_size))
        return create_engine(backend, path, options={"batch_size": batch_size, "intra_op_num_threads": 1})
    return factory


def test_point_runs_k_instances_and_counts_every_item(tiny):
    calls: list = []
    p = run_point(factory_for(tiny, calls), "onnx", 2, 3, runs=MIN_RUNS, warmup=1)
    assert p.ok, p.stop
    assert calls == [("onnx", 2)] * 3  # k engine instances, loaded once each
    assert p.runs == MIN_RUNS and p.seconds > 0
    assert p.throughput == pytest.approx(3 * 2 * MIN_RUNS / p.seconds)
    assert p.p50_ms <= p.p99_ms and p.memory_mb > 0
    assert p.device_util == "n/a"  # no NVML on this machine: said plainly, not zero
    with pytest.raises(ValueError, match=">= 30"):
        run_point(factory_for(tiny, []), "onnx", 1, 1, runs=5)


def test_sweep_stops_on_failure_and_reports_max_concurrency(tiny):
    def flaky(backend: str, batch_size: int, _n=[0]):  # noqa: B006 - a call counter shared across calls
        # the third instance of a point cannot be loaded (as when device memory runs out)
        _n[0] += 1
        if batch_size == 4 and _n[0] % 3 == 0:
            raise MemoryError("out of device memory")
        return create_engine(backend, tiny, options={"batch_size": batch_size, "intra_op_num_threads": 1})

    seen: list[SweepPoint] = []
    res = sweep(flaky, ["onnx"], [4], max_concurrency=5, runs=MIN_RUNS, warmup=1, drop_tolerance=0.99,
                on_point=seen.append)
    assert seen == res.points
    last = res.points[-1]
    assert not last.ok and "out of device memory" in last.stop
    assert res.max_concurrency() == {"onnx/b4": last.concurrency - 1}
    assert res.best() is not None and res.best().ok


def test_sweep_stops_when_throughput_falls(tiny):
    res = sweep(factory_for(tiny, []), ["onnx"], [1], max_concurrency=3, runs=MIN_RUNS, warmup=1)
    last = res.points[-1]
    assert last.stop.startswith("throughput fell") or last.stop.startswith("reached --max-concurrency")
    # every point before the stop was at least as fast as the best before it
    best = 0.0
    for p in res.points[:-1]:
        assert p.ok and p.throughput >= best
        best = max(best, p.throughput)


def test_cli_table_csv_json_and_plot(tiny, tmp_path, capsys):
    from app.cli import main

    out_csv, out_png = tmp_path / "s.csv", tmp_path / "s.png"
    rc = main(["bench", "sweep", str(tiny), "--batch-sizes", "1,2", "--max-concurrency", "2", "--threads", "1",
               "--warmup", "1", "--csv", str(out_csv), "--plot", str(out_png), "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "== edgebatch bench sweep =="
    obj = json.loads(lines[-1])
    assert obj["bench"] == "sweep" and {r["batch_size"] for r in obj["rows"]} == {1, 2}
    assert set(obj["max_concurrency"]) == {"onnx/b1", "onnx/b2"} and obj["best"]["ok"]
    rows = list(csv.DictReader(out_csv.open()))
    assert len(rows) == len(obj["rows"]) and float(rows[0]["throughput"]) > 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_name_the_fix(capsys):
    from app.cli import main

    assert main(["bench", "sweep", "missing/model.onnx"]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["bench", "sweep", "demo", "--runs", "5"]) == 2
    assert "at least 30" in capsys.readouterr().err
    assert main(["bench", "sweep", "demo", "--backends", "cuda"]) == 2
    assert "--backends" in capsys.readouterr().err
