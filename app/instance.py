"""One edgebatch instance on this machine: its Ray token, its ports and where it serves.

Everything an instance binds or needs to reconnect is kept in its state folder, so
two instances (two ``EDGEBATCH_HOME`` folders) live side by side and every command
finds its own cluster and never Ray's machine-wide "auto" fallback. Plain Python:
client commands read it without importing Ray.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from app.errors import ConfigError, Unavailable
from app.state import StateDir

# Ray's own environment variables for token authentication (Ray 2.60 turns it on by default)
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"
RAY_AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
RAY_AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_HTTP_HOST = "127.0.0.1"

# Ray's fixed defaults; used when free, else a free port is picked (and recorded)
DEFAULT_PORTS = {
    "http": 8000,
    "gcs": 6379,
    "dashboard": 8265,
    "client_server": 10001,
    "dashboard_agent_http": 52365,
}
# Ray hands worker processes ports from this range by default: the client server must lie outside it
RAY_WORKER_PORTS = range(10002, 20000)


@dataclass
class InstancePorts:
    """Every port `edgebatch up` binds on this machine (Serve HTTP and the Ray head's)."""

    http: int
    gcs: int
    dashboard: int
    client_server: int
    dashboard_agent_http: int
    dashboard_agent_grpc: int
    metrics_export: int
    # picked free by Ray itself at start, read back from the node and recorded
    node_manager: int | None = None
    object_manager: int | None = None
    runtime_env_agent: int | None = None

    OPTIONS = {  # the `edgebatch up` option that sets each one
        "http": "--port",
        "gcs": "--ray-port",
        "dashboard": "--dashboard-port",
        "client_server": "--ray-client-server-port",
        "dashboard_agent_http": "--dashboard-agent-port",
        "dashboard_agent_grpc": "--dashboard-agent-grpc-port",
        "metrics_export": "--metrics-export-port",
    }

    def ray_start_args(self) -> list[str]:
        return [
            f"--port={self.gcs}",
            f"--dashboard-port={self.dashboard}",
            f"--ray-client-server-port={self.client_server}",
            f"--dashboard-agent-listen-port={self.dashboard_agent_http}",
            f"--dashboard-agent-grpc-port={self.dashboard_agent_grpc}",
            f"--metrics-export-port={self.metrics_export}",
        ]


@dataclass
class InstanceRecord:
    """What `edgebatch up` noted about the instance it runs, in ``<state>/instance.json``."""

    address: str  # the Ray GCS address every later command connects to
    started_head: bool  # True: `up` started this head and `down` stops it; False: a joined cluster
    http_url: str | None = None
    ports: InstancePorts | None = None
    session_dir: str | None = None
    direct_ingress: bool = False

    @classmethod
    def load(cls, state: StateDir) -> InstanceRecord | None:
        try:
            data = json.loads(state.instance_file.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            return None
        known = {f.name for f in fields(cls)}
        ports = data.get("ports")
        try:
            data["ports"] = InstancePorts(**ports) if isinstance(ports, dict) else None
        except TypeError:
            data["ports"] = None
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, state: StateDir) -> None:
        tmp = state.instance_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(state.instance_file)

    @staticmethod
    def forget(state: StateDir) -> None:
        state.instance_file.unlink(missing_ok=True)


def ensure_ray_token(state: StateDir) -> Path:
    """The Ray token this instance's head and drivers use: created on first need, in the state
    folder, readable by its owner only (Ray's own ``~/.ray/auth_token`` is never touched)."""
    path = state.ray_token_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    if not path.exists() or not path.read_text().strip():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 bits of hex
    os.chmod(path, 0o600)
    return path


def ray_auth_env(state: StateDir) -> dict[str, str]:
    """Environment that makes Ray's CLIs and drivers use this instance's token.

    A token the user chose (``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH``) wins; so does Ray's own
    lookup when ``RAY_ADDRESS`` names a cluster that is not ours (its token is the cluster's)."""
    env = {RAY_AUTH_MODE_ENV: os.environ.get(RAY_AUTH_MODE_ENV, "token")}
    if os.environ.get(RAY_AUTH_TOKEN_ENV) or os.environ.get(RAY_AUTH_TOKEN_PATH_ENV):
        return env
    if os.environ.get("RAY_ADDRESS") and not state.ray_token_file.exists():
        return env
    env[RAY_AUTH_TOKEN_PATH_ENV] = str(state.ray_token_file)
    return env


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    if host != "0.0.0.0":  # Ray binds most of its ports on all interfaces
        return port_free(port, "0.0.0.0")
    return True


def free_port(avoid: set[int] | None = None) -> int:
    """A port the kernel calls free now, outside Ray's worker port range and not in ``avoid``."""
    avoid = avoid or set()
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid and port not in RAY_WORKER_PORTS and port_free(port):
            return port
    raise Unavailable("could not find a free TCP port on this machine")


def plan_ports(wanted: dict[str, int | None], *, http_default: int = DEFAULT_PORTS["http"],
               head: bool = True) -> InstancePorts:
    """Every port of a new instance: the ones the user named must be free (else one line naming the
    option); the others take Ray's default when free and a free port otherwise."""
    chosen: dict[str, int] = {}
    names = ("http",) + (tuple(n for n in InstancePorts.OPTIONS if n != "http") if head else ())
    for name in names:
        port = wanted.get(name)
        option = InstancePorts.OPTIONS[name]
        if port is not None:
            if not 1 <= port <= 65535:
                raise ConfigError(f"{option} {port} is not a TCP port (1-65535)")
            if port in chosen.values():
                raise ConfigError(f"{option} {port} is already used for another port of this instance; pick another")
            if name == "client_server" and port in RAY_WORKER_PORTS:
                raise ConfigError(f"{option} {port} lies in Ray's worker port range "
                                  f"{RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}; pick one outside it")
            if not port_free(port):
                raise Unavailable(f"port {port} ({name.replace('_', ' ')}) is taken on this machine: pass another "
                                  f"{option}, or leave it out and `edgebatch up` picks a free one")
            chosen[name] = port
            continue
        default = http_default if name == "http" else DEFAULT_PORTS.get(name)
        if default is not None and default not in chosen.values() and port_free(default):
            chosen[name] = default
        else:
            chosen[name] = free_port(set(chosen.values()))
    if not head:
        return InstancePorts(http=chosen["http"], gcs=0, dashboard=0, client_server=0, dashboard_agent_http=0,
                             dashboard_agent_grpc=0, metrics_export=0)
    return InstancePorts(**chosen)


def recorded_http_url(state: StateDir | None = None) -> str:
    """Where the instance of this state folder serves HTTP: what `up` recorded, else the default."""
    record = InstanceRecord.load(state or StateDir.default())
    if record is not None and record.http_url:
        return record.http_url
    return f"http://{DEFAULT_HTTP_HOST}:{DEFAULT_PORTS['http']}"
