"""The CLI's lifecycle helpers and its error contract: one line on stderr, exit 2, no traceback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main
from app.state import StateDir
from deployments import cluster, config_file, status


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"  # closed again: nothing listens there


def test_cluster_address_is_ray_address_or_the_recorded_head_never_auto(tmp_path, monkeypatch):
    state = StateDir(tmp_path).ensure()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.cluster_address(state) is None  # never Ray's machine-wide "auto" lookup
    state.instance_file.write_text(json.dumps({"address": "127.0.0.1:6390", "started_head": True}))
    assert cluster.cluster_address(state) == "127.0.0.1:6390"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    assert cluster.cluster_address(state) == "10.0.0.5:6379"


def test_dead_address_is_reported_at_once_not_after_ray_retries():
    # ray.init on a dead GCS retries for minutes; the TCP probe answers first
    assert cluster._gcs_answers(_dead_address(), timeout_s=1.0) is False


def test_down_leaves_a_cluster_it_did_not_start(tmp_path):
    state = StateDir(tmp_path).ensure()
    assert "nothing stopped" in cluster.stop_local(state)
    state.instance_file.write_text(json.dumps({"address": "127.0.0.1:6390", "started_head": False}))
    assert "left the joined Ray cluster" in cluster.stop_local(state)


def test_status_without_ray_is_one_clear_line(tmp_path):
    env = {"EDGEBATCH_HOME": str(tmp_path), "RAY_ADDRESS": _dead_address(), "PATH": "/usr/bin:/bin",
           "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, "-m", "app.cli", "status"], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "edgebatch up" in proc.stderr


def test_bad_batch_sizes_name_the_fix(capsys):
    assert main(["bench", "engine", "--batch-sizes", "one,two"]) == 2
    err = capsys.readouterr().err
    assert "--batch-sizes" in err and "1,2,4,8,16" in err


@pytest.mark.parametrize("argv, fix", [
    (["bench", "http", "--external", "--no-bare", "--url", "http://127.0.0.1:9", "--peer-url", "http://127.0.0.1:9",
      "--clients", "8,many"], "8,32"),
    (["bench", "streams", "--url", "http://127.0.0.1:9", "--seconds", "1"], "--seconds > 1"),
])
def test_bad_bench_options_name_the_fix_before_any_load(argv, fix, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEBATCH_HOME", str(tmp_path))
    assert main(argv) == 2
    assert fix in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["models", "show", "../etc"], ["models", "show", "no/such/model/x"]])
def test_bad_model_names_are_refused_with_a_message(argv, capsys, state, demo_repo):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("edgebatch: error:")


def test_up_names_a_bad_user_config_field_before_starting_ray(tmp_path, monkeypatch, capsys):
    import yaml

    config = yaml.safe_load(Path(config_file.DEFAULT_CONFIG).read_text())
    config["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = 32
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("EDGEBATCH_HOME", str(tmp_path / "home"))
    called = []
    monkeypatch.setattr(cluster, "start_local_head", lambda *a, **k: called.append(a))
    assert main(["up", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "deployments[0].user_config" in err and "max_batch_size 32" in err and "Traceback" not in err
    assert not called  # refused before any Ray head was started


def test_direct_ingress_urls_list_replica_ports_not_the_proxy(monkeypatch):
    import types

    import ray

    target = lambda port: types.SimpleNamespace(port=port)  # noqa: E731
    groups = [types.SimpleNamespace(protocol="RequestProtocol.HTTP", targets=[target(8000), target(30003)]),
              types.SimpleNamespace(protocol="RequestProtocol.GRPC", targets=[target(40000)])]

    class Controller:
        class get_target_groups:  # noqa: N801 - mimics an actor method
            @staticmethod
            def remote(app_name):
                return groups

        class get_http_config:  # noqa: N801
            @staticmethod
            def remote():
                return types.SimpleNamespace(host="0.0.0.0", port=8000)

    monkeypatch.setattr(ray, "get_actor", lambda name, namespace=None: Controller)
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: ref)
    assert status.direct_ingress_urls("edgebatch") == ["http://127.0.0.1:30003"]
    monkeypatch.setattr(ray, "get_actor", lambda *a, **k: (_ for _ in ()).throw(ValueError("no controller")))
    assert status.direct_ingress_urls("edgebatch") == []  # off, or no Serve: nothing, never an error
