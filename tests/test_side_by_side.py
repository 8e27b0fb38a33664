"""Two edgebatch instances on one machine, driven as a user drives them: the CLI in fresh HOMEs.

Each `edgebatch up` starts its own Ray head (token and ports in its state folder). Both
serve at once; Ray's own `serve deploy` of `edgebatch config export`'s YAML reconfigures
the same replica; a bad `user_config` pushed that way is refused while the replica keeps
serving; stopping one instance leaves the other serving and nothing of the stopped one behind.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import yaml

from app.config import DetectorConfig
from app.instance import InstanceRecord, free_port, port_free
from app.state import StateDir
from deployments.cluster import head_processes
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env.update({"HOME": str(home), "EDGEBATCH_HOME": str(home / "state"), "RAY_USAGE_STATS_ENABLED": "0"})
    return env


def cli(home: Path, *argv: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "edgebatch"), *argv], capture_output=True, text=True, env=_env(home),
                          cwd=ROOT, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"edgebatch {' '.join(argv)}: {proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc


def ray_cli(home: Path, *argv: str) -> subprocess.CompletedProcess:
    """Ray's own CLI (`serve ...`) in the environment `edgebatch env` exports for the instance."""
    env = _env(home)
    for line in cli(home, "env").stdout.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value.strip("'")
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=180)


def info(url: str) -> dict:
    return httpx.get(f"{url}/v1/info", timeout=30).json()


def detect(url: str, jpeg: bytes) -> httpx.Response:
    """One image, asking the longest deadline a client may (max_deadline_s): these tests are about
    instances and configs, and on CI's two cores a stall past the 3 s default is the deadline working."""
    headers = {"Content-Type": "image/jpeg", "X-Request-Timeout": str(DetectorConfig().max_deadline_s)}
    return httpx.post(f"{url}/v1/detect", content=jpeg, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    from app.bench.images import sample_jpegs

    return sample_jpegs()[0]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Instance A on explicit ports; B as README's "second copy" recipe (only --port and --ray-port
    given: every other port is taken by A, so B must pick free ones)."""
    a, b = tmp_path_factory.mktemp("inst-a"), tmp_path_factory.mktemp("inst-b")
    started = []
    try:
        for home, http, gcs in ((a, free_port(), free_port()), (b, free_port(), free_port())):
            cli(home, "up", "--port", str(http), "--ray-port", str(gcs), "--num-cpus", "2")
            started.append(home)
        yield {"a": a, "b": b}
    finally:
        for home in started:
            cli(home, "down", check=False)


def _record(home: Path) -> InstanceRecord:
    record = InstanceRecord.load(StateDir(home / "state"))
    assert record is not None
    return record


def test_both_serve_at_once_on_their_own_ports(two, jpeg):
    ra, rb = _record(two["a"]), _record(two["b"])
    pa, pb = vars(ra.ports), vars(rb.ports)
    assert not {v for v in pa.values() if v} & {v for v in pb.values() if v}  # no port shared
    for home, record in ((two["a"], ra), (two["b"], rb)):
        assert record.started_head and record.session_dir
        r = detect(record.http_url, jpeg)
        assert r.status_code == 200 and r.json()["detections"]
        status = json.loads(cli(home, "status", "--json").stdout)
        assert status["instance"]["ports"]["gcs"] == record.ports.gcs
        assert status["instance"]["address"] == record.address
        text = cli(home, "status").stdout
        assert f"gcs {record.ports.gcs}" in text and f"dashboard {record.ports.dashboard}" in text
        token = home / "state" / "ray" / "auth_token"
        assert (token.stat().st_mode & 0o777) == 0o600
        assert not (home / ".ray").exists()  # Ray's own ~/.ray is never touched


def test_serve_deploy_of_the_exported_yaml_keeps_the_replica(two, tmp_path):
    home = two["a"]
    url = _record(home).http_url
    pid = info(url)["pid"]
    live = tmp_path / "live.yaml"
    cli(home, "config", "export", "--out", str(live))
    config = yaml.safe_load(live.read_text())
    config["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = 4
    live.write_text(yaml.safe_dump(config))
    proc = ray_cli(home, "serve", "deploy", str(live))
    assert proc.returncode == 0, proc.stderr[-1500:]
    wait_for(lambda: info(url)["max_batch_size"] == 4, 60, "serve deploy to reconfigure the batch size")
    assert info(url)["pid"] == pid
    # and `edgebatch up` of the same file afterwards: still the same replica process
    config["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = 2
    live.write_text(yaml.safe_dump(config))
    cli(home, "up", "--config", str(live))
    assert info(url)["max_batch_size"] == 2 and info(url)["pid"] == pid


def test_a_bad_user_config_through_serve_deploy_keeps_the_replicas_serving(two, tmp_path, jpeg):
    home = two["a"]
    url = _record(home).http_url
    before = info(url)
    live = tmp_path / "bad.yaml"
    cli(home, "config", "export", "--out", str(live))
    config = yaml.safe_load(live.read_text())
    good_size = before["max_batch_size"]
    config["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = 32  # beyond the variants
    live.write_text(yaml.safe_dump(config))

    results: list[int] = []
    stop = threading.Event()

    def load() -> None:  # bounded: at most 2,000 requests or until the refusal is visible
        while not stop.is_set() and len(results) < 2000:
            try:
                results.append(detect(url, jpeg).status_code)
            except httpx.HTTPError:
                results.append(0)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        proc = ray_cli(home, "serve", "deploy", str(live))
        assert proc.returncode == 0, proc.stderr[-1500:]
        refused = wait_for(lambda: info(url).get("config_refused"), 90, "the replica to refuse the bad config")
        assert "max_batch_size 32" in json.dumps(refused)
        n = len(results)
        wait_for(lambda: len(results) >= n + 20, 60, "requests after the refusal")
    finally:
        stop.set()
        worker.join(timeout=60)
    assert results and all(code == 200 for code in results), f"{sum(c != 200 for c in results)} of {len(results)} failed"
    after = info(url)
    assert after["pid"] == before["pid"] and after["max_batch_size"] == good_size
    assert "REFUSED" in cli(home, "status").stdout
    # a good config clears the refusal
    config["applications"][0]["deployments"][0]["user_config"]["max_batch_size"] = good_size
    live.write_text(yaml.safe_dump(config))
    assert ray_cli(home, "serve", "deploy", str(live)).returncode == 0
    wait_for(lambda: not info(url).get("config_refused"), 60, "a good config to clear the refusal")


def test_stopping_one_leaves_the_other_serving_and_nothing_behind(two, jpeg):
    import psutil

    ra, rb = _record(two["a"]), _record(two["b"])
    cli(two["b"], "down")
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if rb.session_dir in " ".join(p.info.get("cmdline") or [])]
    assert not left, f"processes of the stopped instance remain: {left}"
    assert all(port_free(p) for p in (rb.ports.http, rb.ports.gcs, rb.ports.dashboard, rb.ports.client_server))
    assert detect(ra.http_url, jpeg).status_code == 200
    # the stopped instance's commands now say so in one line, and never reach A's cluster
    proc = cli(two["b"], "status", check=False)
    assert proc.returncode == 2 and "no edgebatch instance is recorded" in proc.stderr and "Traceback" not in proc.stderr


def _broken(home: Path, path: Path) -> Path:
    """This instance's config with the detector app's code missing: Serve reports DEPLOY_FAILED."""
    cli(home, "config", "export", "--out", str(path))
    config = yaml.safe_load(path.read_text())
    config["applications"][0]["import_path"] = "deployments.no_such_module:build_app"
    path.write_text(yaml.safe_dump(config))
    return path


def test_up_after_a_failed_deploy_deploys_again(two, tmp_path, jpeg):
    home = two["a"]
    proc = cli(home, "up", "--config", str(_broken(home, tmp_path / "broken.yaml")), "--timeout", "120", check=False)
    assert proc.returncode == 2 and "DEPLOY_FAILED" in proc.stderr and "no_such_module" in proc.stderr
    assert "Traceback" not in proc.stderr and "File \"" not in proc.stderr
    cli(home, "up")  # the stale DEPLOY_FAILED is not taken as this deploy's answer
    assert detect(_record(home).http_url, jpeg).status_code == 200


def test_a_failed_first_up_leaves_no_ray_process(tmp_path):
    home = tmp_path / "fresh"
    home.mkdir()
    good = cli(home, "config", "export").stdout  # before any `up`: the config for this state folder
    broken = tmp_path / "broken.yaml"
    broken.write_text(good.replace("deployments.app:build_app", "deployments.no_such_module:build_app", 1))
    proc = cli(home, "up", "--config", str(broken), "--timeout", "120", check=False)
    assert proc.returncode == 2 and "stopped the Ray head this `up` had started" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (home / "state" / "instance.json").exists()
    gcs = re.search(r"started a local head at 127\.0\.0\.1:(\d+)", proc.stdout).group(1)
    left = head_processes(None, gcs)
    assert not left, f"Ray processes left by the failed `up`: {[p.pid for p in left]}"
    assert port_free(int(gcs))
