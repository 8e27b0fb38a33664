"""Resource collectors, their Prometheus export, and reading them back with PromQL.

The hardware paths (NVML, tegrastats, EdgeTPU) run against fakes here: this machine
has no GPU, no Jetson and no Coral. The Ray part runs on the session cluster; the
Prometheus part runs a real /usr/bin/prometheus scraping the test cluster.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import types
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml

from app.errors import BadRequest, Unavailable
from app.monitoring.collectors import (
    DeviceSample,
    EdgeTpuProbe,
    NodeCollector,
    NodeSample,
    NvmlProbe,
    ProbeReading,
    PsutilProbe,
    TegrastatsProbe,
    jetson_device_sample,
)
from app.monitoring.promql import PromQLClient, prometheus_config
from app.monitoring.tegrastats import parse_tegrastats
from tests.conftest import free_port, stop_process, wait_for

MB = 1024**2

# Recorded tegrastats lines.
XAVIER_NX_JP46 = (
    "RAM 2448/7765MB (lfb 1x4MB) SWAP 0/3882MB (cached 0MB) CPU [12%@1190,8%@1190,10%@1190,11%@1190,off,off] "
    "EMC_FREQ 0% GR3D_FREQ 45%@1109 APE 150 MTS fg 0% bg 0% AO@40.5C GPU@40C PMIC@50C AUX@40C CPU@41.5C "
    "thermal@40.6C VDD_IN 4865/4865 VDD_CPU_GPU_CV 1063/1063 VDD_SOC 1431/1431"
)
AGX_ORIN_JP5 = (
    "03-15-2023 10:12:30 RAM 3251/30536MB (lfb 6113x4MB) SWAP 0/15268MB (cached 0MB) "
    "CPU [2%@729,1%@729,0%@729,0%@729,off,off,off,off,0%@729,0%@729,0%@729,0%@729] EMC_FREQ 0%@2133 "
    "GR3D_FREQ 0%@[305,305] VIC_FREQ 729 APE 174 CV0@-256C CPU@45.218C SOC2@42.781C SOC0@43.625C CV1@-256C "
    "GPU@-256C tj@45.218C SOC1@42.093C CV2@-256C VDD_GPU_SOC 2010mW/2010mW VDD_CPU_CV 402mW/402mW "
    "VIN_SYS_5V0 2825mW/2825mW NC 0mW/0mW VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
ORIN_NANO_JP6 = (
    "11-20-2024 14:03:11 RAM 2117/7620MB (lfb 12x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [5%@1510,3%@1510,0%@1510,1%@1510,0%@729,0%@729] GR3D_FREQ 38%@[624] cpu@48.218C soc2@46.968C "
    "soc0@47.5C gpu@47.562C tj@48.218C soc1@46.843C VDD_IN 5118mW/5118mW VDD_CPU_GPU_CV 1219mW/1219mW "
    "VDD_SOC 1504mW/1504mW"
)


# ---------------------------------------------------------------- probes on this machine


def test_probes_on_this_machine_report_missing_hardware_plainly():
    collector = NodeCollector()
    try:
        sample = collector.sample()
    finally:
        collector.close()
    assert sample.ram_total_bytes > sample.ram_used_bytes > 0
    assert 0.0 <= sample.cpu_percent <= 100.0
    cpu = [d for d in sample.devices if d.kind == "cpu"]
    assert len(cpu) == 1 and cpu[0].mem_total_bytes == sample.ram_total_bytes
    assert sample.accelerators() == []  # no GPU, Jetson or EdgeTPU here
    assert any(n.startswith("no NVIDIA GPU:") for n in sample.notes), sample.notes
    assert any(n.startswith("no Jetson") for n in sample.notes)
    assert any(n.startswith("no EdgeTPU") for n in sample.notes)
    assert "no GPU on this node: CPU only" in sample.notes
    assert NodeSample.from_dict(json.loads(json.dumps(sample.to_dict()))) == sample


def test_a_failing_probe_becomes_a_note_not_an_exception():
    class Broken:
        def read(self) -> ProbeReading:
            raise RuntimeError("sensor bus gone")

        def close(self) -> None:
            pass

    sample = NodeCollector([Broken(), PsutilProbe()], node_id="n1", hostname="h").sample()
    assert sample.node_id == "n1" and sample.ram_total_bytes > 0
    assert any("Broken failed: RuntimeError: sensor bus gone" in n for n in sample.notes)


def test_node_sample_from_bad_dict_is_a_bad_request():
    with pytest.raises(BadRequest, match="NodeSample"):
        NodeSample.from_dict({"hostname": "x"})


# ---------------------------------------------------------------- NVML (fake pynvml)


class _NvmlError(Exception):
    pass


def _fake_pynvml(calls: list[str]) -> types.ModuleType:
    gpus = [
        {"name": b"NVIDIA A2", "util": 37, "used": 3 * 1024**3, "total": 16 * 1024**3},
        {"name": "NVIDIA GeForce RTX 3060", "util": None, "used": 512 * MB, "total": 12 * 1024**3},
    ]
    nv = types.ModuleType("pynvml")

    def rec(name, fn):
        def wrapped(*a):
            calls.append(name)
            return fn(*a)
        return wrapped

    def util(h):
        if gpus[h]["util"] is None:
            raise _NvmlError("Not Supported")
        return types.SimpleNamespace(gpu=gpus[h]["util"], memory=5)

    nv.NVMLError = _NvmlError
    nv.nvmlInit = rec("nvmlInit", lambda: None)
    nv.nvmlShutdown = rec("nvmlShutdown", lambda: None)
    nv.nvmlDeviceGetCount = rec("nvmlDeviceGetCount", lambda: len(gpus))
    nv.nvmlDeviceGetHandleByIndex = rec("nvmlDeviceGetHandleByIndex", lambda i: i)
    nv.nvmlDeviceGetName = rec("nvmlDeviceGetName", lambda h: gpus[h]["name"])
    nv.nvmlDeviceGetUtilizationRates = rec("nvmlDeviceGetUtilizationRates", util)
    nv.nvmlDeviceGetMemoryInfo = rec(
        "nvmlDeviceGetMemoryInfo",
        lambda h: types.SimpleNamespace(used=gpus[h]["used"], total=gpus[h]["total"], free=gpus[h]["total"] - gpus[h]["used"]),
    )
    return nv


def test_nvml_probe_with_two_fake_gpus(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(calls))
    probe = NvmlProbe()
    reading = probe.read()
    probe.read()
    probe.close()
    assert calls.count("nvmlInit") == 1 and calls[-1] == "nvmlShutdown"
    assert reading.notes == []
    a2, rtx = reading.devices
    assert a2 == DeviceSample("gpu", 0, "NVIDIA A2", 37.0, 3 * 1024**3, 16 * 1024**3, note="")
    assert (rtx.kind, rtx.index, rtx.name) == ("gpu", 1, "NVIDIA GeForce RTX 3060")
    assert rtx.util_percent is None and "utilization: Not Supported" in rtx.note
    assert (rtx.mem_used_bytes, rtx.mem_total_bytes) == (512 * MB, 12 * 1024**3)
    sample = NodeCollector([PsutilProbe(), NvmlProbe(nvml=_fake_pynvml([]))], node_id="gpu-node").sample()
    assert [d.label for d in sample.accelerators()] == ["gpu0", "gpu1"]
    assert not any(n.startswith("no GPU") for n in sample.notes)


def test_nvml_probe_without_the_library_says_so(monkeypatch):
    nv = _fake_pynvml([])

    def no_library():
        raise _NvmlError("NVML Shared Library Not Found")

    nv.nvmlInit = no_library
    reading = NvmlProbe(nvml=nv).read()
    assert reading.devices == []
    assert reading.notes == ["no NVIDIA GPU: _NvmlError: NVML Shared Library Not Found"]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    reading = NvmlProbe().read()
    assert reading.devices == [] and reading.notes[0].startswith("no NVIDIA GPU: nvidia-ml-py is not installed")


# ---------------------------------------------------------------- tegrastats


def test_tegrastats_xavier_nx_jetpack4():
    stats = parse_tegrastats(XAVIER_NX_JP46)
    assert (stats.ram_used_bytes, stats.ram_total_bytes) == (2448 * MB, 7765 * MB)
    assert stats.gpu_utilization == pytest.approx(0.45) and stats.gpu_freqs_mhz == (1109,)
    assert stats.cpu_loads == (0.12, 0.08, 0.10, 0.11, None, None)
    assert stats.gpu_temperature_c == 40.0
    assert stats.total_power_w == pytest.approx(4.865)
    device = jetson_device_sample(stats, "NVIDIA Jetson Xavier NX")
    assert device == DeviceSample("jetson", 0, "NVIDIA Jetson Xavier NX", 45.0, 2448 * MB, 7765 * MB,
                                  note="memory is the board RAM, shared with the CPU")


def test_tegrastats_orin_jetpack5_and_6():
    agx = parse_tegrastats(AGX_ORIN_JP5)
    assert agx.timestamp_text == "03-15-2023 10:12:30"
    assert agx.ram_total_bytes == 30536 * MB and agx.gpu_utilization == 0.0
    assert agx.gpu_freqs_mhz == (305, 305) and agx.emc_freq_mhz == 2133
    assert len(agx.cpu_loads) == 12 and agx.cpu_loads.count(None) == 4
    assert agx.gpu_temperature_c is None  # -256C: sensor absent
    assert "CV0" not in agx.temperatures_c and agx.temperatures_c["tj"] == pytest.approx(45.218)
    assert agx.total_power_w == pytest.approx((2010 + 402 + 2825 + 301) / 1000)  # no input rail: the sum, NC left out
    nano = parse_tegrastats(ORIN_NANO_JP6)
    assert nano.gpu_utilization == pytest.approx(0.38) and nano.gpu_freqs_mhz == (624,)
    assert nano.gpu_temperature_c == pytest.approx(47.562) and nano.total_power_w == pytest.approx(5.118)
    assert jetson_device_sample(nano).util_percent == pytest.approx(38.0)
    with pytest.raises(BadRequest, match="not a tegrastats line"):
        parse_tegrastats("GR3D_FREQ 12%")


def test_tegrastats_probe_runs_the_binary_and_reads_its_lines(tmp_path):
    assert TegrastatsProbe(binary="tegrastats-not-here").read().notes[0].startswith("no Jetson")
    fake = tmp_path / "tegrastats"
    args_file = tmp_path / "args"
    fake.write_text(f'#!/bin/sh\necho "$@" > {args_file}\nwhile true; do echo "{ORIN_NANO_JP6}"; sleep 0.2; done\n')
    fake.chmod(0o755)
    probe = TegrastatsProbe(binary=str(fake), interval_ms=200, model_name="Jetson Orin Nano")
    try:
        first = probe.read()  # starts the subprocess
        assert first.devices or first.notes == ["tegrastats started, no line yet"]
        reading = wait_for(lambda: probe.read().devices and probe.read(), 30, "a tegrastats line")
        (device,) = reading.devices
        assert (device.kind, device.name, device.util_percent) == ("jetson", "Jetson Orin Nano", pytest.approx(38.0))
        assert (device.mem_used_bytes, device.mem_total_bytes) == (2117 * MB, 7620 * MB)
        assert args_file.read_text().split() == ["--interval", "200"]
    finally:
        probe.close()
    assert probe._proc is None


# ---------------------------------------------------------------- EdgeTPU


def _usb(root: Path, name: str, vendor: str, product: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "idVendor").write_text(vendor + "\n")
    (root / name / "idProduct").write_text(product + "\n")


def test_edgetpu_probe_with_a_fake_sysfs(tmp_path):
    dev, usb = tmp_path / "dev", tmp_path / "usb"
    dev.mkdir()
    usb.mkdir()
    loads: list[str] = []

    def missing(name):
        loads.append(name)
        raise OSError(f"{name}: cannot open shared object file")

    probe = EdgeTpuProbe(dev_root=dev, usb_root=usb, loader=missing)
    empty = probe.read()
    assert empty.devices == [] and empty.notes[0].startswith("no EdgeTPU") and loads == []

    (dev / "apex_0").touch()
    _usb(usb, "1-1", "18d1", "9302")
    _usb(usb, "1-2", "1a6e", "089a")
    _usb(usb, "1-3", "046d", "c52b")  # a mouse
    (usb / "usb1").mkdir()  # a hub entry without ids
    reading = EdgeTpuProbe(dev_root=dev, usb_root=usb, loader=missing).read()
    names = [d.name for d in reading.devices]
    assert [d.kind for d in reading.devices] == ["edgetpu"] * 3 and [d.index for d in reading.devices] == [0, 1, 2]
    assert names[0] == "Coral PCIe EdgeTPU (apex_0)"
    assert "Coral USB Accelerator [18d1:9302]" in names[1] and "firmware not loaded" in names[2]
    assert all(d.util_percent is None and d.mem_total_bytes is None for d in reading.devices)
    assert "libedgetpu.so.1 does not load" in reading.devices[0].note and loads == ["libedgetpu.so.1"]

    ok = EdgeTpuProbe(dev_root=dev, usb_root=usb, loader=lambda name: object()).read()
    assert all(d.note == "libedgetpu.so.1 loads" for d in ok.devices)


# ---------------------------------------------------------------- PromQL client, offline


def test_promql_client_reports_a_server_that_is_down():
    client = PromQLClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(Unavailable, match="does not answer"):
        client.query("up")
    with pytest.raises(BadRequest, match="http://"):
        PromQLClient("localhost:9090")


def test_prometheus_config_lists_targets():
    config = yaml.safe_load(prometheus_config(["10.0.0.1:8080", "10.0.0.2:8080"], scrape_interval_s=2))
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "ray" and job["scrape_interval"] == "2s"
    assert job["static_configs"] == [{"targets": ["10.0.0.1:8080", "10.0.0.2:8080"]}]
    sd = yaml.safe_load(prometheus_config([], service_discovery_files=["/tmp/ray/x.json"]))
    assert sd["scrape_configs"][0]["file_sd_configs"] == [{"files": ["/tmp/ray/x.json"]}]
    with pytest.raises(BadRequest, match="host:port"):
        prometheus_config(["10.0.0.1"])
    with pytest.raises(BadRequest, match="no scrape targets"):
        prometheus_config([])


def _cli(*args: str) -> subprocess.CompletedProcess:
    """The real `edgebatch` entry point in a child process, pointed at a Ray address nobody answers."""
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120)


def test_cli_without_ray_samples_locally_and_explains_what_needs_ray():
    nodes = _cli("monitor", "nodes", "--json")
    assert nodes.returncode == 0, nodes.stderr
    assert "a local NodeCollector" in nodes.stdout and "no NVIDIA GPU" in nodes.stdout
    assert list(json.loads(nodes.stdout.strip().splitlines()[-1])) == ["local"]
    config = _cli("monitor", "prometheus-config")
    assert config.returncode == 2 and "Traceback" not in config.stderr
    lines = config.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgebatch: error: no Ray cluster answers at 127.0.0.1:")
    assert "start it with `edgebatch up`" in lines[0]
    bad = _cli("monitor", "prometheus-config", "--scrape-interval", "0")
    assert bad.returncode == 2 and "--scrape-interval must be > 0" in bad.stderr


# ---------------------------------------------------------------- on the Ray cluster


@pytest.fixture(scope="module")
def monitor(ray_cluster, deploy_apps):
    """The edgebatch-monitor app from serve_config.yaml, sampling every second."""
    from ray import serve

    from deployments.collectors import MONITOR_APP, SUPERVISOR, monitor_app_entry

    deploy_apps([monitor_app_entry(sample_interval_s=1.0, reconcile_interval_s=0.5)])
    return serve.get_deployment_handle(SUPERVISOR, app_name=MONITOR_APP)


def _collector_nodes(handle) -> set[str]:
    return set(handle.collector_nodes.remote().result(timeout_s=30))


def _samples() -> dict[str, NodeSample]:
    from deployments.collectors import latest_samples

    try:
        return latest_samples(timeout_s=10)
    except Unavailable:
        return {}


def test_supervisor_keeps_one_collector_per_alive_node(ray_cluster, monitor):
    from deployments.collectors import alive_node_ids

    head = ray_cluster.head_node.node_id
    wait_for(lambda: _collector_nodes(monitor) == set(alive_node_ids()), 60, "a collector on every alive node")
    samples = wait_for(lambda: (s := _samples()) and set(alive_node_ids()) <= set(s) and s, 60, "samples of every node")
    for node_id, sample in samples.items():
        assert sample.node_id == node_id  # the actor ran on the node it was pinned to
        assert sample.ram_total_bytes > 0 and any(d.kind == "cpu" for d in sample.devices)
        assert any(n.startswith("no NVIDIA GPU") for n in sample.notes)
    assert head in samples
    import asyncio

    from deployments.collectors import latest_samples_async

    assert head in asyncio.run(latest_samples_async(timeout_s=30))

    node = ray_cluster.add_node(num_cpus=1)
    try:
        wait_for(lambda: node.node_id in _collector_nodes(monitor), 120, "a collector on the added node")
        added = wait_for(lambda: _samples().get(node.node_id), 120, "a sample from the added node")
        assert added.node_id == node.node_id
    finally:
        ray_cluster.remove_node(node)
    wait_for(lambda: node.node_id not in _collector_nodes(monitor), 120, "the removed node's collector dropped")
    assert head in _collector_nodes(monitor)


def test_cli_monitor_nodes_reads_the_supervisor(ray_cluster, monitor):
    from app.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["monitor", "nodes", "--json", "--timeout", "60"]) == 0
    text = out.getvalue()
    assert "from the edgebatch-monitor application" in text
    samples = json.loads(text.strip().splitlines()[-1])
    assert ray_cluster.head_node.node_id in samples
    assert "no NVIDIA GPU" in text


@pytest.fixture
def prometheus(ray_cluster, monitor, tmp_path):
    """A real Prometheus scraping the test cluster, configured by `edgebatch monitor prometheus-config`."""
    binary = "/usr/bin/prometheus"
    if not os.path.exists(binary):
        pytest.skip("/usr/bin/prometheus is not installed (Debian package `prometheus`)")
    from app.cli import main

    config_file = tmp_path / "prometheus.yml"
    with redirect_stdout(io.StringIO()):
        assert main(["monitor", "prometheus-config", "--scrape-interval", "1", "--output", str(config_file)]) == 0
    port = free_port()
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config_file}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    client = PromQLClient(f"http://127.0.0.1:{port}", timeout_s=5)
    try:
        wait_for(lambda: proc.poll() is not None or client.ready(), 60, "Prometheus to be ready")
        assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
        yield client, config_file
    finally:
        stop_process(proc)
        log.close()


def test_exported_metrics_reach_a_real_prometheus(ray_cluster, prometheus):
    from deployments.collectors import RAY_METRIC_PREFIX, ray_metrics_targets

    client, config_file = prometheus
    config = yaml.safe_load(config_file.read_text())
    job = config["scrape_configs"][0]
    listed = [t for c in job.get("static_configs", []) for t in c["targets"]]
    assert set(ray_metrics_targets()) <= set(listed) or job.get("file_sd_configs")

    head = ray_cluster.head_node.node_id
    expr = f'{RAY_METRIC_PREFIX}edgebatch_node_cpu_percent{{node="{head}"}}'
    samples = wait_for(lambda: client.query(expr), 90, f"{expr} in Prometheus")
    assert all(0.0 <= s.value <= 100.0 for s in samples)
    assert samples[0].labels["hostname"] and samples[0].labels["node"] == head
    ram = client.query(f'{RAY_METRIC_PREFIX}edgebatch_device_mem_total_bytes{{node="{head}",kind="cpu"}}')
    assert ram and ram[0].value > 0 and ram[0].labels["device"] == "cpu0"
    present = client.query(f'sum by (kind) ({RAY_METRIC_PREFIX}edgebatch_device_present{{node="{head}"}})')
    assert {s.labels["kind"] for s in present} == {"cpu"}  # no accelerator on this machine

    now = samples[0].timestamp
    series = client.query_range(expr, now - 120, now, 1)  # a replaced collector leaves its own series
    assert series and all(s.labels["node"] == head for s in series)
    assert all(s.points and all(0 <= v <= 100 for _, v in s.points) for s in series)

    with pytest.raises(BadRequest, match="PromQL bad_data"):
        client.query("edgebatch_node_cpu_percent{")
    with pytest.raises(BadRequest, match="query_range"):
        client.query(f"{RAY_METRIC_PREFIX}edgebatch_node_cpu_percent[1m]")


def test_latest_samples_without_the_monitor_app_is_unavailable(ray_cluster, monitor, deploy_apps):
    from deployments.collectors import MONITOR_APP, latest_samples

    deploy_apps(remove=[MONITOR_APP])

    def unavailable():
        try:
            latest_samples(timeout_s=3)
        except Unavailable as exc:
            return exc.message if "not deployed" in exc.message else None  # not while DELETING
        return None

    message = wait_for(unavailable, 60, "latest_samples to report the missing app")
    assert f"'{MONITOR_APP}' application is not deployed" in message and "serve_config.yaml" in message
