"""One instance per state folder: its token, its ports, its record; config files checked by key.

Ray-free: these run in milliseconds. The real two-instance run is tests/test_side_by_side.py.
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from app.cli import main
from app.config import DetectorConfig
from app.errors import ConfigError, Unavailable
from app.instance import InstancePorts, InstanceRecord, ensure_ray_token, plan_ports, ray_auth_env, recorded_http_url
from app.state import StateDir
from deployments import config_file
from deployments.status import cause_line


def test_ray_token_lives_in_the_state_folder_owner_only(tmp_path):
    state = StateDir(tmp_path / "s").ensure()
    path = ensure_ray_token(state)
    token = path.read_text()
    assert path.parent == state.root / "ray" and len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert ensure_ray_token(state).read_text() == token  # kept, not regenerated


AUTH_KEYS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def _unset(monkeypatch) -> None:
    """Unset Ray's auth variables for one test and restore them after (also those `main` sets)."""
    for key in AUTH_KEYS:
        monkeypatch.setenv(key, "x")  # recorded, so teardown restores the value before this test
        monkeypatch.delenv(key)


def test_auth_env_points_ray_at_this_instance_unless_the_user_chose(tmp_path, monkeypatch):
    state = StateDir(tmp_path).ensure()
    _unset(monkeypatch)
    assert ray_auth_env(state) == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(state.ray_token_file)}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/elsewhere/token")
    assert "RAY_AUTH_TOKEN_PATH" not in ray_auth_env(state)  # the user's own token wins
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")  # a cluster that is not ours: Ray's own lookup
    assert "RAY_AUTH_TOKEN_PATH" not in ray_auth_env(state)


def _listening() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_ports_named_must_be_free_others_fall_back_to_free_ones():
    taken = _listening()
    try:
        port = taken.getsockname()[1]
        with pytest.raises(Unavailable, match=rf"port {port} \(dashboard\) is taken.*--dashboard-port"):
            plan_ports({"dashboard": port})
        ports = plan_ports({}, http_default=port)  # the config's HTTP port is taken: a free one instead
        assert ports.http != port
        values = [v for k, v in vars(ports).items() if v is not None]
        assert len(values) == len(set(values)) == len(InstancePorts.OPTIONS)
        assert not 10002 <= ports.client_server <= 19999  # outside Ray's worker port range
    finally:
        taken.close()
    with pytest.raises(ConfigError, match="worker port range"):
        plan_ports({"client_server": 12000})
    with pytest.raises(ConfigError, match="not a TCP port"):
        plan_ports({"gcs": 70000})


def test_instance_record_round_trip_and_recorded_url(tmp_path):
    state = StateDir(tmp_path).ensure()
    assert recorded_http_url(state) == "http://127.0.0.1:8000"
    ports = plan_ports({})
    InstanceRecord(address=f"127.0.0.1:{ports.gcs}", started_head=True, ports=ports,
                   http_url="http://127.0.0.1:8123", session_dir="/tmp/ray/session_x").save(state)
    back = InstanceRecord.load(state)
    assert back.ports == ports and back.started_head and back.session_dir == "/tmp/ray/session_x"
    assert recorded_http_url(state) == "http://127.0.0.1:8123"
    state.instance_file.write_text("[not a record")
    assert InstanceRecord.load(state) is None


@pytest.mark.parametrize("text, named", [
    ("- a\n- b\n", "the top level must be a mapping"),
    ("applications:\n  name: x\n", "applications must be a list"),
    ("http_options: 8000\napplications: []\n", "http_options must be a mapping"),
    ("applications:\n  - name: x\n    deployments: [3]\n", "applications[0] (x).deployments[0] must be a mapping"),
    ("applications:\n  - name: x\n    runtime_env: {env_vars: [A]}\n", "applications[0] (x).runtime_env.env_vars"),
    ("applications:\n  - name: x\n    deployments:\n      - name: Detector\n        user_config: [1]\n",
     "deployments[0].user_config must be a mapping"),
    ("applications:\n  - name: x\n    import_path: 3\n", "applications.0.import_path"),
])
def test_a_config_of_the_wrong_shape_is_named_by_its_key(tmp_path, text, named):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        config_file.load_serve_config(path, StateDir(tmp_path).ensure())
    assert named in err.value.message and str(path) in err.value.message


def test_exported_config_is_what_up_deploys(tmp_path, monkeypatch):
    import yaml

    state = StateDir(tmp_path).ensure()
    monkeypatch.setenv("EDGEBATCH_HOME", str(state.root))
    applied = config_file.load_serve_config(None, state, port=8123)
    exported = yaml.safe_load(config_file.export_yaml(applied))
    assert exported == applied
    env = exported["applications"][0]["runtime_env"]["env_vars"]
    assert env["EDGEBATCH_HOME"] == str(state.root) and exported["http_options"]["port"] == 8123
    # deploying the exported file again adds nothing: same runtime_env, so Serve sees the same code version
    again = config_file.complete_serve_config(exported, state, port=8123)
    assert again == applied


def test_readme_version_3_is_accepted_as_written():
    assert DetectorConfig(version=3).version == "3"
    for bad in (0, -1, "x", 2.5, True):
        with pytest.raises(ValueError):
            DetectorConfig(version=bad)


def test_cause_line_drops_ray_traceback_frames():
    msg = ("A replica failed to start with exception. Retrying 2 more time(s). Error:\n"
           "ray::ServeReplica:edgebatch:Detector.initialize_and_get_metadata() (pid=1, ip=1)\n"
           '  File "/x/repository.py", line 515, in _registered_model\n    raise NotFound(\n    ^^^^^\n'
           "app.errors.NotFound: model nosuch is not in the registry")
    line = cause_line(msg)
    assert "File " not in line and "^^" not in line and "\n" not in line
    assert line.startswith("A replica failed to start") and line.endswith("model nosuch is not in the registry")


def _cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update({"HOME": str(home), "EDGEBATCH_HOME": str(home / "state"), "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


@pytest.mark.parametrize("argv", [["status"], ["batch", "status"], ["monitor", "prometheus-config"]])
def test_commands_never_attach_to_another_cluster_on_the_machine(tmp_path, argv):
    """No instance recorded here and no RAY_ADDRESS: one line, even while other Ray heads run
    (Ray's `auto` would pick whichever started last)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "app.cli", *argv], capture_output=True, text=True,
                          env=_cli_env(tmp_path), cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no edgebatch instance is recorded" in proc.stderr and "edgebatch up" in proc.stderr


def test_bench_http_against_an_unreachable_url_is_one_line(capsys, tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    monkeypatch.setenv("EDGEBATCH_HOME", str(tmp_path))
    _unset(monkeypatch)
    rc = main(["bench", "http", "--external", "--no-bare", "--url", f"http://127.0.0.1:{dead}", "--batch-sizes", "1",
               "--duration", "1", "--warmup", "0"])
    out = capsys.readouterr()
    assert rc == 2 and "no ready inference server" in out.err and out.err.count("\n") == 1
    assert "failed" not in out.out  # no table of failures


def test_env_exports_this_instance_for_rays_own_clis(tmp_path, monkeypatch, capsys):
    state = StateDir(tmp_path).ensure()
    monkeypatch.setenv("EDGEBATCH_HOME", str(state.root))
    _unset(monkeypatch)
    assert main(["env"]) == 2  # nothing recorded yet
    ports = plan_ports({})
    InstanceRecord(address=f"127.0.0.1:{ports.gcs}", started_head=True, ports=ports).save(state)
    capsys.readouterr()
    assert main(["env"]) == 0
    lines = dict(line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["RAY_ADDRESS"] == f"127.0.0.1:{ports.gcs}"
    assert lines["RAY_DASHBOARD_ADDRESS"] == f"http://127.0.0.1:{ports.dashboard}"
    assert lines["RAY_AUTH_TOKEN_PATH"] == str(state.ray_token_file) and lines["RAY_AUTH_MODE"] == "token"


def test_up_refuses_to_expose_http_without_an_api_token(tmp_path, monkeypatch, capsys):
    import yaml

    from deployments import cluster

    config = yaml.safe_load(config_file.DEFAULT_CONFIG.read_text())
    config["http_options"]["host"] = "0.0.0.0"
    exposed = tmp_path / "exposed.yaml"
    exposed.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("EDGEBATCH_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("EDGEBATCH_API_TOKEN", raising=False)
    called = []
    monkeypatch.setattr(cluster, "start_local_head", lambda *a, **k: called.append(a))
    assert main(["up", "--config", str(exposed)]) == 2
    err = capsys.readouterr().err
    assert "0.0.0.0 would expose the API without a token" in err and "--api-token" in err
    assert not called and not (tmp_path / "state" / "api_token").exists()


def test_every_replica_gets_opencvs_pixel_limit_before_it_decodes(tmp_path):
    config = config_file.load_serve_config(None, StateDir(tmp_path).ensure())
    for app in config["applications"]:
        assert int(app["runtime_env"]["env_vars"]["OPENCV_IO_MAX_IMAGE_PIXELS"]) > 0
