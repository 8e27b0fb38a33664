"""cluster.yaml checked offline with Ray's own preparation and validation, and against the tenancy tags."""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def node_resources(cluster: dict) -> dict[str, dict[str, float]]:
    """The host -> resources mapping the setup commands write."""
    cmd = next(c for c in cluster["setup_commands"] if "node_resources.json" in c and "printf" in c)
    return json.loads(re.search(r"printf '%s' '(.*)'", cmd, re.S).group(1))


def test_ray_prepares_and_validates_the_file(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    assert "available_node_types" not in cluster  # the local provider refuses it (field notes)
    assert prepared["provider"]["head_ip"] == cluster["provider"]["head_ip"]


def test_every_host_declares_its_tags(cluster):
    mapping = node_resources(cluster)
    hosts = {cluster["provider"]["head_ip"], *cluster["provider"]["worker_ips"]}
    assert set(mapping) == hosts
    for ip, res in mapping.items():
        assert res and all(isinstance(v, (int, float)) and v > 0 for v in res.values()), ip
        assert any(k.endswith("_node") for k in res), f"{ip} declares no node tag"
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert sum("--resources=" in c for c in starts) == 2
    assert any("--head" in c for c in cluster["head_start_ray_commands"])
    assert any("pip install" in c and "~/edgebatch" in c for c in cluster["setup_commands"])


def test_start_command_picks_this_hosts_resources(cluster, tmp_path):
    """Run the start command's own lookup with a fake home and a fake `hostname -I`."""
    mapping = node_resources(cluster)
    cmd = next(c for c in cluster["worker_start_ray_commands"] if "--resources=" in c)
    code = re.search(r"-c '(.*?)'\)\"", cmd, re.S).group(1)
    (tmp_path / ".edgebatch").mkdir()
    (tmp_path / ".edgebatch" / "node_resources.json").write_text(json.dumps(mapping))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    edge_ip = cluster["provider"]["worker_ips"][-1]
    (fake_bin / "hostname").write_text(f"#!/bin/sh\necho 10.9.9.9 {edge_ip}\n")
    (fake_bin / "hostname").chmod(0o755)
    env = {"HOME": str(tmp_path), "PATH": f"{fake_bin}:/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert json.loads(out.stdout) == mapping[edge_ip]


def test_example_tenancy_tags_are_offered_by_the_cluster(cluster):
    from app.tenancy import tag_resource

    _, tenancy = example_tenancy()
    offered = {k for res in node_resources(cluster).values() for k in res}
    for model in tenancy.models:
        for p in model.placements:
            assert tag_resource(p.tag) in offered, f"{model.name}/{p.name}: no host declares {tag_resource(p.tag)}"


def hosts_as_ray_sees_them(cluster: dict) -> dict[str, dict[str, float]]:
    """Each host's resources once `ray up` started it: its --resources JSON plus its GPU count. The
    x86 host's one card is found by Ray itself; the Jetson declares its integrated GPU with
    --num-gpus=1 (GPUs never go into --resources, which Ray refuses for "GPU")."""
    hosts = node_resources(cluster)
    assert all("GPU" not in res for res in hosts.values())
    assert "--num-gpus=1" in " ".join(cluster["worker_start_ray_commands"])
    for res in hosts.values():
        if "gpu_node" in res or "jetson_node" in res:
            res["GPU"] = 1.0  # one card per GPU host, one Jetson module: what the comments in cluster.yaml list
    return hosts


def example_tenancy():
    from app.tenancy import parse_tenancy

    serve_cfg = yaml.safe_load((ROOT / "deployments" / "tenancy_example.yaml").read_text())
    return serve_cfg, parse_tenancy(serve_cfg["applications"][0]["args"])


def test_example_bookings_fit_the_cluster_devices(cluster):
    """Every replica of the tenancy example, with its tag and device share, packs onto the hosts
    cluster.yaml lists (first fit, largest share first): no GPU, Coral or Jetson booked twice."""
    from app.tenancy import required_resources
    from deployments.tenancy import actor_options

    free = {ip: dict(res) for ip, res in hosts_as_ray_sees_them(cluster).items()}
    _, tenancy = example_tenancy()
    replicas = []
    for model in tenancy.models:
        for p in model.placements:
            need = {k: v for k, v in required_resources(actor_options(p)).items() if k != "CPU"}
            replicas += [(f"{model.name}.{p.name}#{i}", need) for i in range(p.num_replicas)]
    replicas.sort(key=lambda r: -sum(v for k, v in r[1].items() if not k.endswith("_node")))
    for name, need in replicas:
        host = next((ip for ip, res in free.items() if all(res.get(k, 0.0) + 1e-9 >= v for k, v in need.items())),
                    None)
        assert host is not None, f"{name} needs {need}; left on the hosts: {free}"
        for k, v in need.items():
            free[host][k] -= v
    gpu_host = next(ip for ip, res in node_resources(cluster).items() if "gpu_node" in res)
    assert abs(free[gpu_host]["GPU"]) < 1e-9  # the example books the GPU host's one card exactly


def test_docs_build_every_variant_the_example_names():
    """Each (model, backend, alias) a placement loads has a build command in docs/multitenancy.md;
    demo-detector's ONNX variants @production are the ones `edgebatch up` registers."""
    text = (ROOT / "docs" / "multitenancy.md").read_text()
    commands = re.findall(r"edgebatch models build[^\n`]*", text)
    _, tenancy = example_tenancy()
    for model in tenancy.models:
        for p in model.placements:
            alias = p.alias or model.alias
            if (model.name, p.backend, alias) == ("demo-detector", "onnx", "production"):
                continue
            backend_flag = f"--backend {p.backend}" if p.backend != "onnx" else ""
            assert any(f"--name {model.name} " in f"{c} " and backend_flag in c and f"--alias {alias}" in c
                       and (p.backend != "onnx" or "--backend" not in c) for c in commands), \
                f"no documented build of {model.name} {p.backend} @{alias}"

def test_head_runs_the_autoscaler_that_starts_every_listed_worker(cluster):
    """Ray 2.50+'s `ray up` starts the v2 autoscaler, which counts the head towards min_workers (one
    node type for head and workers), while prepare_config caps min_workers at len(worker_ips)."""
    from ray.autoscaler._private.util import prepare_config

    prepared = prepare_config(copy.deepcopy(cluster))
    node_type = prepared["available_node_types"][prepared["head_node_type"]]
    assert node_type["min_workers"] == len(cluster["provider"]["worker_ips"])  # no room to count the head
    head_start = next(c for c in cluster["head_start_ray_commands"] if "--head" in c)
    assert head_start.index("RAY_enable_autoscaler_v2=0") < head_start.index("ray start --head")


def test_the_head_serves_the_registry_every_node_reads(cluster):
    registry = next(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    assert "--host 0.0.0.0 --port 5000" in registry and "/health" in registry  # started once, reachable


def test_every_start_command_exports_what_edgebatch_up_gives_its_own_ray(cluster):
    """The proxies and replicas of a `ray up` cluster must run as those of `edgebatch up` do: objects
    passed inline, and Serve's proxies stamping each request's arrival for the gateway's deadline."""
    from deployments.config_file import NODE_ENV

    starts = [next(c for c in cluster[key] if "ray start" in c)
              for key in ("head_start_ray_commands", "worker_start_ray_commands")]
    for start in starts:
        for name, value in NODE_ENV.items():
            assert f"{name}={value}" in start and start.index(name) < start.index("ray start"), (name, start)
