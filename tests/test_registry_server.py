"""The model repository against a real ``mlflow server`` process, as a cluster uses it.

One server per module (it takes 10-25 s to start on 2 cores): SQLite backend and
an artifact folder in tmp, ``--serve-artifacts``, on a random free port. The
outage test stops it; the ``server`` fixture restarts it for any test after.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from app.errors import NotFound, Unavailable
from app.state import StateDir
from model_registry.builders import VariantFile, build_onnx_variants
from model_registry.cache import IntegrityError
from model_registry.demo import write_synthetic_detector
from model_registry.repository import ModelRepository

QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
for _key, _value in QUIET.items():
    os.environ.setdefault(_key, _value)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class MlflowServer:
    """An ``mlflow server`` child process (its own process group, so its workers stop with it)."""

    root: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    def start(self, deadline_s: float = 120.0) -> None:
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | QUIET
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.artifacts), "--serve-artifacts", "--workers", "1"],
            stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.root / 'server.log').read_text()[-2000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)  # polling interval of a health check with a deadline
        self.stop()
        raise RuntimeError(f"mlflow server not healthy within {deadline_s} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@pytest.fixture(scope="module")
def _server_process(tmp_path_factory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def server(_server_process: MlflowServer) -> MlflowServer:
    if not _server_process.running:  # the outage test stopped it
        _server_process.start()
    return _server_process


@pytest.fixture(autouse=True)
def _no_ambient_registry(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> list[VariantFile]:
    folder = tmp_path_factory.mktemp("server-variants")
    return build_onnx_variants(write_synthetic_detector(folder / "det.onnx"), [1, 2, 4], folder)


def _repo(server: MlflowServer, node: Path) -> ModelRepository:
    return ModelRepository(server.uri, state=StateDir(node / "state"), cache_dir=node / "cache")


def test_register_and_find_through_the_server(server, variants, tmp_path, monkeypatch):
    builder = _repo(server, tmp_path / "build-node")
    version = builder.register_version("srv-det", variants, progress=True)
    builder.set_alias("srv-det", "production", version)

    worker = ModelRepository.from_env(StateDir(tmp_path / "worker"))  # a node configured by env only
    assert worker.tracking_uri != server.uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    worker = ModelRepository.from_env(StateDir(tmp_path / "worker"))
    assert worker.tracking_uri == server.uri
    assert worker.resolve("srv-det", alias="production") == version
    found = worker.find("srv-det", alias="production", batch_size=2)
    assert found.tags["artifact"].startswith("mlflow-artifacts:")  # served by the server, not a shared disk
    assert found.path.is_relative_to(tmp_path / "worker") and found.path.read_bytes() == variants[1].path.read_bytes()
    assert not any((tmp_path / "build-node").rglob("blobs/*/*/*"))  # registering does not fill a cache
    with pytest.raises(NotFound, match="onnx batch 1,2,4"):
        worker.find("srv-det", alias="production", batch_size=16)


def test_concurrent_builds_through_the_server_get_distinct_versions(server, variants, tmp_path):
    barrier, results, errors = threading.Barrier(2), [], []

    def build(i: int) -> None:
        repo = _repo(server, tmp_path / f"node{i}")
        repo.check_available()
        barrier.wait(timeout=30)
        try:
            results.append(repo.register_version("srv-race", variants))
        except Exception as exc:  # any error: reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and sorted(results) == ["1", "2"]
    assert len(_repo(server, tmp_path / "check").describe("srv-race").versions) == 2


def test_tampered_artifact_on_the_server_is_refused(server, variants, tmp_path):
    repo = _repo(server, tmp_path)
    version = repo.register_version("srv-tamper", variants[:1])
    run_path = repo.list_variants("srv-tamper", version=version)[0].tags["artifact"].removeprefix("mlflow-artifacts:/")
    stored = server.artifacts / run_path
    assert stored.is_file()
    stored.write_bytes(stored.read_bytes() + b"trojan")
    with pytest.raises(IntegrityError, match="tampered"):
        repo.find("srv-tamper", version=version, batch_size=1)
    assert not any(repo.cache.root.rglob("blobs/*/*/*"))


def test_registry_outage_keeps_cached_variants_serving(server, variants, tmp_path):
    """Placed last: it stops the module's server (the ``server`` fixture restarts it if needed)."""
    with pytest.raises(Unavailable) as err:  # nothing listens on this port
        ModelRepository(f"http://127.0.0.1:{free_port()}", state=StateDir(tmp_path / "x")).check_available()
    assert "127.0.0.1" in err.value.message and "mlflow server" in err.value.message

    node = tmp_path / "edge-node"
    repo = _repo(server, node)
    version = repo.register_version("srv-outage", variants)
    repo.set_alias("srv-outage", "production", version)
    served = repo.find("srv-outage", alias="production", batch_size=4)

    server.stop()
    with pytest.raises(Unavailable) as err:
        repo.check_available()
    assert server.uri in err.value.message and "MLFLOW_TRACKING_URI" in err.value.message
    again = repo.find("srv-outage", alias="production", batch_size=4)
    assert again.path == served.path and again.version == version
    restarted = _repo(server, node)  # a replica restarted on the node while the registry is down
    assert restarted.find("srv-outage", alias="production", batch_size=4).path == served.path
    assert restarted.find("srv-outage", version=version, batch_size=4).sha256 == served.sha256
    with pytest.raises(Unavailable, match="not cached on this node"):
        restarted.find("srv-outage", alias="production", batch_size=1)
    served.path.write_bytes(b"x")  # corruption while offline: refused, never loaded
    with pytest.raises(IntegrityError):
        restarted.find("srv-outage", alias="production", batch_size=4)
    assert not served.path.exists()
