"""The batch-pipeline simulation and `edgebatch bench adapt --profile`: the policies on device profiles.

The target of issue 16: on every shipped profile (and at any number of streams) the default policy
settles within 5% of the best static size's throughput, after at most two probes.
"""

from __future__ import annotations

import json

import pytest

from app.cli import main as cli
from app.errors import BadRequest
from app.simulation import (
    DeviceProfile,
    SimulationSettings,
    SizePoint,
    compare,
    load_profile,
    profile_from_dict,
    shipped_profiles,
    simulate,
)
from policies.batch_size import DEFAULT_POLICY, PolicyConfig

PROFILES = sorted(shipped_profiles())


def default_row(profile: DeviceProfile):
    result = compare(profile)
    return result, next(r for r in result.policies if r.policy == DEFAULT_POLICY)


def test_profiles_ship_and_say_where_their_numbers_come_from():
    assert {"cpu-2core-demo320", "cpu-2core-yolov8n640", "gpu-synthetic-oom16"} <= set(PROFILES)
    for name in PROFILES:
        profile = load_profile(name)
        assert profile.kind in ("measured", "published", "synthetic") and profile.source and profile.description
        if profile.kind == "synthetic":
            assert "not a measurement" in profile.description


@pytest.mark.parametrize("name", PROFILES)
def test_default_policy_settles_within_5_percent_of_the_best_static_size_in_two_probes(name):
    result, row = default_row(load_profile(name))
    assert row.settled_size is not None, row
    assert row.ratio_to_best_static >= 0.95, (row, result.best_static)
    assert row.probes <= 2, row


@pytest.mark.parametrize("name", PROFILES)
@pytest.mark.parametrize("streams", [1, 2, 3, 5, 8])
def test_the_target_holds_at_other_stream_counts(name, streams):
    _, row = default_row(load_profile(name).with_load(streams=streams))
    assert row.settled_size is not None and row.ratio_to_best_static >= 0.95 and row.probes <= 2, row


def test_the_paper_policies_stay_at_the_smallest_size_where_the_device_is_behind():
    """Why the default needed more than Algorithm 1: on a miss it lowers, which cannot help a saturated GPU."""
    result = compare(load_profile("gpu-synthetic-oom16"))
    rows = {r.policy: r for r in result.policies}
    assert result.best_static.settled_size == 4
    assert rows["algorithm1"].settled_size == 1 and rows["algorithm1"].ratio_to_best_static < 0.5
    assert rows[DEFAULT_POLICY].settled_size == 4 and rows[DEFAULT_POLICY].dropped_per_s == 0


def test_a_static_size_serves_the_smaller_of_the_stream_and_the_device_capacity():
    profile = DeviceProfile("t", "synthetic", "not a measurement", "test", (
        SizePoint(1, 0.010), SizePoint(4, 0.020)), fps=30.0, streams=2)  # capacities 100 and 200 items/s
    settings = SimulationSettings(windows=20, tail_windows=10)
    for size, expected in ((1, 60.0), (4, 60.0)):
        run = simulate(profile, "fixed", PolicyConfig(allowed_sizes=(1, 4), start_size=size), settings)
        assert run.throughput == pytest.approx(expected, rel=0.02)
    over = profile.with_load(streams=10)  # 300 frames/s: more than either size
    run = simulate(over, "fixed", PolicyConfig(allowed_sizes=(1, 4), start_size=1), settings)
    assert run.throughput == pytest.approx(100.0, rel=0.02)
    assert sum(w.dropped for w in run.windows[-10:]) > 0  # drop_oldest: the queue stays bounded


def test_a_variant_that_does_not_fit_fails_and_the_policy_backs_off():
    profile = load_profile("gpu-synthetic-oom16")
    assert profile.fails(16) and not profile.fails(8)
    run = simulate(profile.with_load(streams=8), DEFAULT_POLICY, PolicyConfig(allowed_sizes=profile.sizes))
    assert {w.batch_size for w in run.windows[-20:]} == {8}
    assert all(w.failed == 0 for w in run.windows[-20:])


def test_profiles_from_a_device_check_and_a_bench_sweep(tmp_path):
    check = {"kind": "edgebatch-devicecheck", "profile": load_profile("gpu-synthetic-oom16").to_dict()}
    (tmp_path / "devicecheck.json").write_text(json.dumps(check))
    assert load_profile(str(tmp_path / "devicecheck.json")).sizes == (1, 2, 4, 8, 16)
    sweep = {"bench": "sweep", "rows": [
        {"backend": "onnx", "batch_size": 1, "concurrency": 1, "throughput": 50.0, "p50_ms": 20.0, "ok": True},
        {"backend": "onnx", "batch_size": 1, "concurrency": 2, "throughput": 90.0, "p50_ms": 22.0, "ok": True},
        {"backend": "onnx", "batch_size": 4, "concurrency": 1, "throughput": 80.0, "p50_ms": 50.0, "ok": True}]}
    (tmp_path / "sweep.txt").write_text("== edgebatch bench sweep ==\ntable\n" + json.dumps(sweep) + "\n")
    profile = load_profile(str(tmp_path / "sweep.txt"))  # the bench's whole output: its JSON last line
    assert [(p.batch_size, p.d_batch_s, p.capacity) for p in profile.points] == [(1, 0.02, 50.0), (4, 0.05, 80.0)]


@pytest.mark.parametrize("data, match", [
    ([1, 2], "not a JSON object"),
    ({"sizes": [{"batch_size": 1}]}, "needs 'sizes'"),
    ({"sizes": [{"batch_size": 2, "d_batch_ms": 5}, {"batch_size": 1, "d_batch_ms": 3}]}, "increasing"),
    ({"sizes": [{"batch_size": 1, "d_batch_ms": 0}]}, "must be > 0"),
    ({"kind": "guessed", "sizes": [{"batch_size": 1, "d_batch_ms": 1}]}, "kind 'guessed'"),
])
def test_bad_profiles_are_refused_naming_the_problem(data, match):
    with pytest.raises(BadRequest, match=match):
        profile_from_dict(data, "test.json")


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(BadRequest, match="gpu-synthetic-oom16"):
        load_profile("xavier-from-memory")


def test_bench_adapt_profile_prints_a_simulated_table_and_json_last(capsys):
    assert cli(["bench", "adapt", "--profile", "cpu-2core-yolov8n640", "--windows", "30", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "SIMULATED" in out[0] and any(line.startswith("SIMULATED: no model ran") for line in out)
    result = json.loads(out[-1])
    assert result["simulated"] is True and result["profile"]["name"] == "cpu-2core-yolov8n640"
    assert result["best_static_batch_size"] == 2 and result["default_within_5_percent"] is True
    assert {r["policy"] for r in result["rows"]} >= {"static 1", "static 16", "algorithm1", "aimd", DEFAULT_POLICY}
    assert cli(["bench", "adapt", "--profile", "nope"]) == 2
    assert "no profile 'nope'" in capsys.readouterr().err
