"""`ray up` of the shipped cluster.yaml, for real: Ray's own launcher, its local provider, SSH.

The hosts are namespaces of this machine (tests/rayup_lan.py): a head and three workers, each with
its own address, sshd on port 22, processes, home and /tmp/ray. The test makes a variant of
cluster.yaml by substituting ONLY what names this site (checked below against the real file):
- the four IPs (provider.head_ip, worker_ips and the same keys in NODE_RESOURCES) -> the hosts' IPs;
- auth.ssh_user -> root, auth.ssh_private_key -> the key made here;
- cluster_name -> one per run (Ray keeps per-cluster state and SSH control sockets by that name).
Each host comes with ~/edgebatch-venv already made (the project's .venv) and the install stamp
the setup command writes after `pip install -e ~/edgebatch`, so no host installs from PyPI here;
everything else (file mounts, node tags, token, Ray start with the v1 autoscaler, the MLflow
registry on the head) runs as shipped. Then, as cluster.yaml's header says: `edgebatch up` on the
head (through `ray exec`) with the head's registry address, a Detector that needs a worker-only tag
(`jetson_node`), a request served by that replica, and `ray down`.

Slow (minutes) and needs root, openssh-server and rsync: `pytest -m rayup` (left out of the
default run by pyproject's addopts; .ci/run runs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import wait_for
from tests.rayup_lan import Lan, missing_tools

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TOKEN = "/root/.edgebatch/ray/auth_token"  # where cluster.yaml's file_mounts put the token on each host
ON_HEAD_RAY = f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={TOKEN} RAY_USAGE_STATS_ENABLED=0"

pytestmark = [
    pytest.mark.rayup,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(bool(missing_tools()), reason=f"ray up test needs: {', '.join(missing_tools())}"),
]


def lan_variant(text: str, ips: list[str], key: Path, cluster_name: str) -> str:
    """cluster.yaml with this LAN's addresses, user, key and a per-run cluster name; nothing else."""
    cfg = yaml.safe_load(text)
    shipped = [cfg["provider"]["head_ip"], *cfg["provider"]["worker_ips"]]
    assert len(shipped) == len(ips)
    for old, new in zip(shipped, ips):
        text = re.sub(rf"(?<![\d.]){re.escape(old)}(?![\d])", new, text)
    for field, value in ((r"ssh_user", "root"), (r"ssh_private_key", str(key)), (r"cluster_name", cluster_name)):
        text, n = re.subn(rf"(?m)^(\s*{field}:\s*)\S+", rf"\g<1>{value}", text)
        assert n == 1, field
    return text


def _undo(variant: str, ips: list[str], shipped: dict) -> dict:
    text = variant
    for new, old in zip(ips, [shipped["provider"]["head_ip"], *shipped["provider"]["worker_ips"]]):
        text = re.sub(rf"(?<![\d.]){re.escape(new)}(?![\d])", old, text)
    cfg = yaml.safe_load(text)
    cfg["auth"] = shipped["auth"]
    cfg["cluster_name"] = shipped["cluster_name"]
    return cfg


def copy_checkout(dest: Path) -> None:
    """The files of this checkout a user would have after `git clone` (tracked and new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def serve_config_on_worker(tag_resource: str) -> dict:
    """The shipped Serve config's detector app, its Detector asking for a tag only a worker has."""
    cfg = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    cfg["applications"] = [a for a in cfg["applications"] if a["name"] == "edgebatch"]
    det = cfg["applications"][0]["deployments"][0]
    det["ray_actor_options"] = {**det.get("ray_actor_options", {}), "resources": {tag_resource: 0.001}}
    det["user_config"].update(batch_sizes=[1, 2], max_batch_size=2)
    return cfg


def client_env(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "EDGEBATCH_", "MLFLOW_TRACKING"))}
    env.update(PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}", RAY_USAGE_STATS_ENABLED="0",
               RAY_TMPDIR=str(workdir / "client-tmp"))  # Ray's client-side cluster state for this run
    return env


def ray_cli(lan_cluster: dict, *args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "ray"), *args], cwd=lan_cluster["client"], env=lan_cluster["env"],
                          capture_output=True, text=True, timeout=timeout_s)


def head_python(head, code: str, timeout_s: float = 300) -> dict:
    """Run Python on the head (a driver of the cluster `ray up` started); it prints ``RESULT <json>``
    (Ray may print its own lines too)."""
    out = head.run(f"{ON_HEAD_RAY} ~/edgebatch-venv/bin/python - <<'EOF'\n{code}\nEOF", timeout_s=timeout_s)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"on the head: rc {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


NODES_UP = """
import json, time, ray
ray.init(address="127.0.0.1:6379", logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + {deadline}
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= {count} or time.monotonic() > deadline:
        break
    time.sleep(1)  # polling Ray's node table with a deadline
print("RESULT", json.dumps({{n["NodeManagerAddress"]: n["Resources"] for n in nodes}}))
"""

REPLICAS = """
import json, ray
ray.init(address="127.0.0.1:6379", logging_level="ERROR", log_to_driver=False, namespace="serve")
from ray.serve._private.constants import SERVE_CONTROLLER_NAME
controller = ray.get_actor(SERVE_CONTROLLER_NAME)
details = ray.get(controller.get_serve_instance_details.remote())
deps = details["applications"]["edgebatch"]["deployments"]
print("RESULT", json.dumps({name: [r["node_ip"] for r in d["replicas"] if r["state"] == "RUNNING"] for name, d in deps.items()}))
"""

DETECT = """
import json, time, httpx
from app.bench.images import sample_jpegs
t0 = time.perf_counter()
r = httpx.post("http://127.0.0.1:8000/v1/detect", content=sample_jpegs(1, 640, 360)[0],
               headers={"Content-Type": "image/jpeg"}, timeout=60)
print("RESULT", json.dumps({"status": r.status_code, "body": r.json(), "ms": (time.perf_counter() - t0) * 1000}))
"""


@pytest.fixture(scope="module")
def lan_cluster(tmp_path_factory):
    shipped_text = (ROOT / "cluster.yaml").read_text()
    shipped = yaml.safe_load(shipped_text)
    size = 1 + len(shipped["provider"]["worker_ips"])
    workdir = tmp_path_factory.mktemp("rayup")
    lan = Lan(workdir / "lan", size)
    try:
        lan.start()
        ips = [h.ip for h in lan.hosts]
        client = workdir / "client"
        copy_checkout(client)
        variant = lan_variant(shipped_text, ips, lan.key, f"edgebatch-rayup-{lan.subnet}")
        assert _undo(variant, ips, shipped) == shipped  # only the site's names changed
        (client / "rayup-cluster.yaml").write_text(variant)
        (client / "rayup-serve.yaml").write_text(yaml.safe_dump(serve_config_on_worker("jetson_node"), sort_keys=False))
        mapping = {new: old for old, new in zip([shipped["provider"]["head_ip"], *shipped["provider"]["worker_ips"]], ips)}
        for host in lan.hosts:  # pre-provisioned: the venv `pip install -e` would have made, and its stamp
            (host.home / "edgebatch-venv").symlink_to(VENV_BIN.parent)
            (host.home / ".edgebatch").mkdir()
            shutil.copy(ROOT / "pyproject.toml", host.home / ".edgebatch" / "installed-pyproject.toml")
        env = client_env(workdir)
        subprocess.run([str(VENV_BIN / "edgebatch"), "token"], cwd=client, env=env, check=True, capture_output=True)
        info = {"lan": lan, "client": client, "env": env, "ips": ips, "shipped_ip": mapping, "figures": {},
                "head": lan.hosts[0], "workdir": workdir}
        t0 = time.monotonic()
        up = ray_cli(info, "up", "-y", "--no-config-cache", "rayup-cluster.yaml", timeout_s=900)
        info["up_output"] = up.stdout + up.stderr
        assert up.returncode == 0, f"ray up failed:\n{info['up_output'][-6000:]}"
        info["figures"]["ray_up_head_s"] = time.monotonic() - t0
        info["t0"] = t0
        yield info
    finally:
        lan.stop()


def _shipped_resources(ip: str, shipped_text: str) -> dict:
    cmd = next(c for c in yaml.safe_load(shipped_text)["setup_commands"] if "node_resources.json" in c)
    return json.loads(re.search(r"printf '%s' '(.*)'", cmd, re.S).group(1))[ip]


def test_ray_up_brings_up_every_listed_worker_with_its_tags(lan_cluster):
    head = lan_cluster["head"]
    nodes = head_python(head, NODES_UP.format(deadline=420, count=len(lan_cluster["ips"])), timeout_s=480)
    lan_cluster["figures"]["all_nodes_s"] = time.monotonic() - lan_cluster["t0"]
    assert sorted(nodes) == sorted(lan_cluster["ips"]), f"nodes up: {sorted(nodes)}\n{lan_cluster['up_output'][-3000:]}"
    shipped_text = (ROOT / "cluster.yaml").read_text()
    for ip, resources in nodes.items():
        for tag, amount in _shipped_resources(lan_cluster["shipped_ip"][ip], shipped_text).items():
            assert resources.get(tag) == amount, f"{ip} advertises {resources}, cluster.yaml gives it {tag}={amount}"


def test_edgebatch_up_on_the_head_serves_from_a_replica_on_a_worker(lan_cluster):
    head = lan_cluster["head"]
    jetson_ip = next(ip for ip, old in lan_cluster["shipped_ip"].items()
                     if "jetson_node" in _shipped_resources(old, (ROOT / "cluster.yaml").read_text()))
    registry = f"http://{head.ip}:5000"

    def registry_up():
        import requests

        try:
            return requests.get(f"{registry}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(registry_up, 180, "the MLflow registry that cluster.yaml starts on the head", interval_s=1)
    except AssertionError as exc:  # keep what the server said (a fourth run failed here and its log was lost)
        log = head.home / ".edgebatch" / "logs" / "mlflow-server.log"
        tail = log.read_text(errors="replace")[-4000:] if log.exists() else f"{log} does not exist"
        raise AssertionError(f"{exc}\n--- {log}:\n{tail}\n--- ray up:\n{lan_cluster['up_output'][-3000:]}") from None
    # cluster.yaml's steps on the head (rayup-serve.yaml came with the checkout's file mount)
    t0 = time.monotonic()
    up = ray_cli(lan_cluster, "exec", "rayup-cluster.yaml",
                 "cd ~/edgebatch && export PYTHONPATH=$HOME/edgebatch EDGEBATCH_HOME=~/.edgebatch "
                 f"RAY_ADDRESS=127.0.0.1:6379 MLFLOW_TRACKING_URI={registry} && "
                 "~/edgebatch-venv/bin/edgebatch up --config rayup-serve.yaml --timeout 400", timeout_s=600)
    out = up.stdout + up.stderr
    assert up.returncode == 0 and "serving demo-detector" in out, out[-5000:]
    assert "cannot reach" not in out, out[-3000:]  # the registry address reaches every node: no warning
    replicas = head_python(head, REPLICAS)
    assert replicas["Detector"] == [jetson_ip], replicas
    reply = head_python(head, DETECT)
    lan_cluster["figures"]["edgebatch_up_to_first_reply_s"] = time.monotonic() - t0
    assert reply["status"] == 200 and reply["body"]["model"] == "demo-detector", reply
    assert isinstance(reply["body"]["detections"], list)
    status = ray_cli(lan_cluster, "exec", "rayup-cluster.yaml",
                     "export EDGEBATCH_HOME=~/.edgebatch RAY_ADDRESS=127.0.0.1:6379 && ~/edgebatch-venv/bin/edgebatch status")
    assert status.returncode == 0 and "Detector: HEALTHY" in status.stdout, status.stdout[-3000:]
    print(json.dumps(lan_cluster["figures"]))


RAY_PROCESSES = "ps -eo stat=,comm= | awk '$1 !~ /^Z/ && ($2 == \"raylet\" || $2 == \"gcs_server\")'"


def test_ray_down_stops_the_cluster(lan_cluster):
    t0 = time.monotonic()
    down = ray_cli(lan_cluster, "down", "-y", "rayup-cluster.yaml")
    assert down.returncode == 0, down.stdout[-3000:] + down.stderr[-2000:]
    lan_cluster["figures"]["ray_down_s"] = time.monotonic() - t0
    head, workers = lan_cluster["head"], lan_cluster["lan"].hosts[1:]
    wait_for(lambda: head.run(RAY_PROCESSES).stdout.strip() == "", 60, "Ray on the head to stop after `ray down`", 0.5)
    # the local provider only forgets the workers; their Ray exits by itself once the head is gone
    wait_for(lambda: all(w.run(RAY_PROCESSES).stdout.strip() == "" for w in workers), 180,
             "Ray on the workers to exit after the head went", 2)
    lan_cluster["figures"]["workers_gone_after_ray_down_s"] = time.monotonic() - t0
    print(json.dumps(lan_cluster["figures"]))
