"""The Ray cluster of one edgebatch instance: start its head, connect to it, stop it.

Every command connects only to the cluster its state folder recorded, or to the one
``RAY_ADDRESS`` names; never to Ray's machine-wide ``auto`` lookup, which finds
whatever head was started last on the machine (another instance's, or another
user's). ``down`` stops only the processes of the head ``up`` started.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from app.errors import Unavailable
from app.instance import InstancePorts, InstanceRecord, ensure_ray_token, ray_auth_env
from app.state import StateDir
from deployments.config_file import NODE_ENV, PROJECT_ROOT

NO_INSTANCE = ("no edgebatch instance is recorded in {root}; start one with `edgebatch up` "
               "(or set RAY_ADDRESS to join a cluster, or EDGEBATCH_HOME to pick another instance's state folder)")


def cluster_address(state: StateDir | None = None) -> str | None:
    """RAY_ADDRESS, else the address `edgebatch up` recorded in the state folder, else None."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    record = InstanceRecord.load(state or StateDir.default())
    return record.address if record else None


def _gcs_answers(address: str, timeout_s: float = 2.0) -> bool:
    """A TCP probe of the GCS port first: ray.init on a dead address retries for minutes."""
    import socket

    if address.startswith("ray://"):
        return True  # Ray Client: let ray.init report
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def ray_running(address: str | None = None, state: StateDir | None = None) -> bool:
    """Connect this process to the instance's cluster if it answers; False when there is none.

    A head from `ray start` (Ray 2.60) wants token authentication, which a driver only sends when
    ``RAY_AUTH_MODE=token`` and the token path are set before Ray is imported: the CLI does that first
    thing (`app.cli`)."""
    import ray

    if ray.is_initialized():
        return True
    address = address or cluster_address(state)
    if not address or address == "auto" or not _gcs_answers(address):
        return False
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RaySystemError) as exc:
        if "auth" in str(exc).lower() or "token" in str(exc).lower():
            raise Unavailable(f"the Ray cluster at {address} refused this instance's token "
                              f"({type(exc).__name__}); it belongs to another instance or user") from None
        return False
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the CLI prints its own lines
    return True


def require_cluster(state: StateDir | None = None) -> None:
    """Connect, or one line saying how to get a cluster."""
    state = state or StateDir.default()
    if not ray_running(state=state):
        address = cluster_address(state)
        if address is None:
            raise Unavailable(NO_INSTANCE.format(root=state.root))
        raise Unavailable(f"no Ray cluster answers at {address} (recorded in {state.instance_file} or RAY_ADDRESS); "
                          "start it with `edgebatch up`")


def registry_reach_warning(tracking_uri: str, host_local: bool, this_ip: str, node_ips: list[str]) -> str | None:
    """One line when the registry `up` hands every replica can only be reached from this host, while
    the cluster has nodes on other hosts (their replicas would fail to load a model)."""
    others = sorted(set(node_ips) - {this_ip})
    if not host_local or not others:
        return None
    return (f"warning: replicas on the {len(others)} other host(s) of this cluster ({', '.join(others[:4])}) cannot "
            f"reach the model registry {tracking_uri}; start an MLflow server on the head (cluster.yaml does) "
            "and run `edgebatch up` with MLFLOW_TRACKING_URI=http://<head-ip>:5000")


def alive_node_ips() -> tuple[str, list[str]]:
    """This driver's node IP and every alive node's."""
    import ray

    return ray.util.get_node_ip_address(), [n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")]


def _ray_bin() -> str:
    return shutil.which("ray") or str(Path(sys.executable).with_name("ray"))


def _last_error_line(text: str) -> str:
    """The line of `ray start`'s output that says what went wrong (not its traceback frames)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if any(k in ln for k in ("Error", "error", "failed", "Failed", "already in use", "taken")) \
                and not ln.startswith(("File ", "Traceback", "^")):
            return ln[-400:]
    return (lines[-1] if lines else "no output")[-400:]


def start_local_head(state: StateDir, ports: InstancePorts, *, num_cpus: int | None = None,
                     dashboard: bool = True, direct_ingress: bool = False) -> InstanceRecord:
    """`ray start --head` with this instance's token and ports; records it in the state folder so
    later commands and `down` find this head. A failed start leaves no process behind."""
    ensure_ray_token(state)
    cmd = [_ray_bin(), "start", "--head", "--disable-usage-stats", "--dashboard-host=127.0.0.1",
           f"--include-dashboard={'true' if dashboard else 'false'}", *ports.ray_start_args()]
    if num_cpus:
        cmd.append(f"--num-cpus={num_cpus}")
    env = dict(os.environ)
    env.update(ray_auth_env(state))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PROJECT_ROOT, env.get("PYTHONPATH")]))
    env.update({k: os.environ.get(k, v) for k, v in NODE_ENV.items()})  # the proxy's too, not only replicas'
    if direct_ingress:
        from deployments.config_file import DIRECT_INGRESS_ENV

        env[DIRECT_INGRESS_ENV] = "1"  # read by Serve's controller and replicas at import
    address = f"127.0.0.1:{ports.gcs}"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
    except subprocess.TimeoutExpired:
        _kill_head_processes(str(ports.gcs), None)
        raise Unavailable("`ray start --head` did not finish in 180 s (stopped what it had started)") from None
    if proc.returncode != 0:
        _kill_head_processes(str(ports.gcs), None)
        raise Unavailable(f"`ray start --head` failed: {_last_error_line(proc.stderr + proc.stdout)} "
                          "(stopped what it had started)")
    record = InstanceRecord(address=address, started_head=True, ports=ports, direct_ingress=direct_ingress)
    record.save(state)
    return record


def record_session(state: StateDir, record: InstanceRecord) -> None:
    """After connecting to the head `up` started, note its session folder (so `down` stops that
    head's processes only: ``ray stop`` would stop every Ray instance on the machine) and the ports
    Ray picked itself."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    session_dir = node.get_session_dir_path() if node is not None else None
    if session_dir:
        record.session_dir = session_dir
    if record.ports is not None:
        me = ray.get_runtime_context().get_node_id()
        for info in ray.nodes():
            if info.get("NodeID") == me:
                record.ports.node_manager = info.get("NodeManagerPort")
                record.ports.object_manager = info.get("ObjectManagerPort")
                record.ports.runtime_env_agent = info.get("RuntimeEnvAgentPort")
                break
    record.save(state)


def head_processes(session_dir: str | None, gcs_port: str) -> list:
    """The processes of one head: those naming its session folder or its GCS port on their command
    line (gcs_server, raylet, dashboard, log monitor), and everything they started: Ray's workers
    rename themselves (``ray::ProxyActor``), so only their parentage ties them to this head."""
    import psutil

    roots = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        args = proc.info.get("cmdline") or []
        if (session_dir and session_dir in " ".join(args)) or any(
                a == f"--gcs_server_port={gcs_port}" or (a.startswith(("--gcs-address=", "--gcs_address=", "--address="))
                                                         and a.endswith(f":{gcs_port}")) for a in args):
            roots.append(proc)
    found = {p.pid: p for p in roots}
    for proc in roots:
        try:
            found.update({c.pid: c for c in proc.children(recursive=True) if c.pid != os.getpid()})
        except psutil.Error:
            pass
    return list(found.values())


def _kill_head_processes(gcs_port: str, session_dir: str | None, timeout_s: float = 15.0) -> int:
    import psutil

    victims = head_processes(session_dir, gcs_port)
    for proc in victims:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=timeout_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    return len(victims)


def stop_local(state: StateDir, timeout_s: float = 15.0) -> str:
    """Stop the head `edgebatch up` started, and only that: a joined cluster is left alone."""
    record = InstanceRecord.load(state)
    if record is None:
        return f"no edgebatch instance is recorded in {state.root}; nothing stopped"
    if not record.started_head:
        InstanceRecord.forget(state)
        return f"left the joined Ray cluster at {record.address} running (`up` did not start it)"
    port = record.address.rpartition(":")[2]
    n = _kill_head_processes(port, record.session_dir, timeout_s)
    InstanceRecord.forget(state)
    if not n:
        return f"no Ray head runs at {record.address} any more"
    return f"stopped the local Ray head at {record.address} ({n} processes)"
