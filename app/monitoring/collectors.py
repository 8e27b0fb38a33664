"""What a node has and how busy it is: CPU/RAM, NVIDIA GPUs, Jetson GPU, Coral EdgeTPUs.

Plain Python (no Ray): the Ray side (``deployments/collectors.py``) runs one
``NodeCollector`` per node and exports its samples to Prometheus, and
``edgebatch monitor nodes`` runs one locally. Every probe answers on every node:
where the hardware or its library is missing, the probe says so in a note and
reports no device, so a CPU-only node reads "no NVIDIA GPU: ..." instead of failing.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from app.errors import BadRequest
from app.monitoring.tegrastats import TegraStats, parse_tegrastats

DEVICE_KINDS = ("gpu", "jetson", "edgetpu", "cpu")


@dataclass
class DeviceSample:
    """One device at one instant; ``None`` where the device cannot tell (EdgeTPU load)."""

    kind: str  # "gpu" | "jetson" | "edgetpu" | "cpu"
    index: int
    name: str
    util_percent: float | None
    mem_used_bytes: int | None
    mem_total_bytes: int | None
    note: str = ""

    @property
    def label(self) -> str:
        """The ``device`` label in Prometheus: kind and index, e.g. ``gpu1``."""
        return f"{self.kind}{self.index}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceSample:
        return cls(
            kind=str(data["kind"]),
            index=int(data["index"]),
            name=str(data.get("name", "")),
            util_percent=None if data.get("util_percent") is None else float(data["util_percent"]),
            mem_used_bytes=None if data.get("mem_used_bytes") is None else int(data["mem_used_bytes"]),
            mem_total_bytes=None if data.get("mem_total_bytes") is None else int(data["mem_total_bytes"]),
            note=str(data.get("note", "")),
        )


@dataclass
class NodeSample:
    """Everything one node reported at ``timestamp`` (seconds since the epoch)."""

    node_id: str
    hostname: str
    timestamp: float
    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int
    devices: list[DeviceSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def accelerators(self) -> list[DeviceSample]:
        """The devices that are not the host CPU."""
        return [d for d in self.devices if d.kind != "cpu"]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["devices"] = [d.to_dict() for d in self.devices]
        if isinstance(self.cpu_percent, float) and math.isnan(self.cpu_percent):
            data["cpu_percent"] = None  # JSON has no NaN
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeSample:
        try:
            cpu = data.get("cpu_percent")
            return cls(
                node_id=str(data["node_id"]),
                hostname=str(data.get("hostname", "")),
                timestamp=float(data["timestamp"]),
                cpu_percent=float("nan") if cpu is None else float(cpu),
                ram_used_bytes=int(data.get("ram_used_bytes", 0)),
                ram_total_bytes=int(data.get("ram_total_bytes", 0)),
                devices=[DeviceSample.from_dict(d) for d in data.get("devices", [])],
                notes=[str(n) for n in data.get("notes", [])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"not a NodeSample dict ({exc!r}): expected NodeSample.to_dict() output") from None


@dataclass
class HostReading:
    """The node's own CPU load and RAM, which NodeSample carries as top-level fields."""

    cpu_percent: float
    ram_used_bytes: int
    ram_total_bytes: int


@dataclass
class ProbeReading:
    """What one probe saw: devices, plain-language notes, and the host figures if it reads them."""

    devices: list[DeviceSample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    host: HostReading | None = None


class Probe(Protocol):
    def read(self) -> ProbeReading: ...

    def close(self) -> None: ...


def _cpu_model() -> str:
    """x86 names the CPU under ``model name``; ARM boards under ``Hardware`` or ``Model`` (Pi)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and value.strip():
                fields.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    for key in ("model name", "hardware", "model"):
        if key in fields and not fields[key].isdigit():
            return fields[key]
    return platform.processor() or platform.machine() or "cpu"


class PsutilProbe:
    """CPU load (since the previous read) and RAM in use (total minus available)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._cpu_name = _cpu_model()
        psutil.cpu_percent(interval=None)  # primes the counter: the first call always answers 0.0
        self._last_read = time.monotonic()

    def read(self) -> ProbeReading:
        ps = self._psutil
        # A load over a few milliseconds is noise: right after priming, measure over a short window.
        short = time.monotonic() - self._last_read < 0.1
        cpu = float(ps.cpu_percent(interval=0.25 if short else None))
        self._last_read = time.monotonic()
        vm = ps.virtual_memory()
        used = int(vm.total - vm.available)
        cores = ps.cpu_count() or 0
        device = DeviceSample("cpu", 0, self._cpu_name, cpu, used, int(vm.total), note=f"{cores} logical cores")
        return ProbeReading(devices=[device], host=HostReading(cpu, used, int(vm.total)))

    def close(self) -> None:
        pass


class NvmlProbe:
    """NVIDIA GPUs through NVML (``nvidia-ml-py``); none on Jetson, where tegrastats reports the GPU."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml
        self._ready = False
        self._failure: str | None = None

    def _init(self) -> None:
        if self._ready or self._failure:
            return
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._ready = True
        except ImportError as exc:
            self._failure = f"nvidia-ml-py is not installed ({exc})"
        except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded / ...
            self._failure = f"{type(exc).__name__}: {exc}"

    @staticmethod
    def _text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    def read(self) -> ProbeReading:
        self._init()
        if not self._ready:
            return ProbeReading(notes=[f"no NVIDIA GPU: {self._failure}"])
        nv = self._nvml
        try:
            count = int(nv.nvmlDeviceGetCount())
        except Exception as exc:
            return ProbeReading(notes=[f"NVML answers but cannot count GPUs: {exc}"])
        if count == 0:
            return ProbeReading(notes=["no NVIDIA GPU: NVML found 0 devices"])
        devices = []
        for i in range(count):
            problems: list[str] = []
            name, util, used, total = f"GPU {i}", None, None, None
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(i)
            except Exception as exc:
                devices.append(DeviceSample("gpu", i, name, None, None, None, note=f"NVML handle failed: {exc}"))
                continue
            try:
                name = self._text(nv.nvmlDeviceGetName(handle))
            except Exception as exc:
                problems.append(f"name: {exc}")
            try:
                util = float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception as exc:  # NotSupported on some boards (MIG slices)
                problems.append(f"utilization: {exc}")
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(handle)
                used, total = int(mem.used), int(mem.total)
            except Exception as exc:
                problems.append(f"memory: {exc}")
            devices.append(DeviceSample("gpu", i, name, util, used, total, note="; ".join(problems)))
        return ProbeReading(devices=devices)

    def close(self) -> None:
        if self._ready:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._ready = False


def jetson_device_sample(stats: TegraStats, name: str = "Jetson GPU") -> DeviceSample:
    """A Jetson GPU as a device: GR3D load, and the board's RAM since the GPU shares it."""
    util = None if stats.gpu_utilization is None else round(stats.gpu_utilization * 100.0, 3)
    return DeviceSample(
        "jetson", 0, name, util, stats.ram_used_bytes, stats.ram_total_bytes,
        note="memory is the board RAM, shared with the CPU",
    )


def _jetson_model() -> str:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            text = Path(path).read_bytes().rstrip(b"\x00").decode(errors="replace").strip()
            if text:
                return text
        except OSError:
            continue
    return "Jetson GPU"


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies, so a collector
    killed by Ray (no chance to call close) leaves no tegrastats behind."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class TegrastatsProbe:
    """The Jetson GPU from ``tegrastats --interval``: a reader thread keeps its latest line.

    Runs the binary only where it exists; elsewhere it reports "no Jetson" and stays idle.
    """

    def __init__(self, binary: str = "tegrastats", interval_ms: int = 1000, model_name: str | None = None) -> None:
        self._binary = shutil.which(binary) if os.sep not in binary else (binary if os.access(binary, os.X_OK) else None)
        self._requested = binary
        self._interval_ms = int(interval_ms)
        self._model_name = model_name
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._line: str | None = None
        self._error: str | None = None

    @property
    def available(self) -> bool:
        return self._binary is not None

    def _start(self) -> None:
        if self._proc is not None or self._binary is None:
            return
        try:
            self._proc = subprocess.Popen(
                [self._binary, "--interval", str(self._interval_ms)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            self._error = f"cannot run {self._binary}: {exc}"
            return
        self._thread = threading.Thread(target=self._pump, name="tegrastats-reader", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        proc = self._proc
        assert proc is not None and proc.stdout is not None
        for line in proc.stdout:
            if line.strip():
                with self._lock:
                    self._line = line
        code = proc.wait()
        if code not in (0, None) and code >= 0:
            err = proc.stderr.read().strip() if proc.stderr else ""
            with self._lock:
                self._error = f"tegrastats exited with {code}" + (f": {err[-200:]}" if err else "")

    def latest_line(self) -> str | None:
        with self._lock:
            return self._line

    def read(self) -> ProbeReading:
        if self._binary is None:
            return ProbeReading(notes=[f"no Jetson: `{self._requested}` not found on PATH"])
        self._start()
        with self._lock:
            line, error = self._line, self._error
        if line is None:
            return ProbeReading(notes=[error or "tegrastats started, no line yet"])
        try:
            stats = parse_tegrastats(line)
        except BadRequest as exc:
            return ProbeReading(notes=[f"tegrastats line not understood: {exc.message}"])
        if self._model_name is None:
            self._model_name = _jetson_model()
        notes = [error] if error else []
        return ProbeReading(devices=[jetson_device_sample(stats, self._model_name)], notes=notes)

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# Coral USB Accelerator: 1a6e:089a before the runtime loads its firmware, 18d1:9302 after.
EDGETPU_USB_IDS = {("1a6e", "089a"): "Coral USB Accelerator (firmware not loaded yet)",
                   ("18d1", "9302"): "Coral USB Accelerator"}


class EdgeTpuProbe:
    """Coral EdgeTPUs, presence only (the runtime exposes no load or memory figures).

    PCIe/M.2 boards appear as ``/dev/apex_N`` (gasket driver); USB sticks by their
    vendor:product ids in sysfs. Whether ``libedgetpu.so.1`` loads decides if LiteRT can
    use them, so that is reported too.
    """

    def __init__(
        self,
        dev_root: str | Path = "/dev",
        usb_root: str | Path = "/sys/bus/usb/devices",
        library: str = "libedgetpu.so.1",
        loader: Callable[[str], Any] = ctypes.CDLL,
    ) -> None:
        self._dev_root = Path(dev_root)
        self._usb_root = Path(usb_root)
        self._library = library
        self._loader = loader
        self._library_note: str | None = None

    def _library_status(self) -> str:
        if self._library_note is None:
            try:
                self._loader(self._library)
                self._library_note = f"{self._library} loads"
            except OSError as exc:
                self._library_note = f"{self._library} does not load ({exc}); install the Edge TPU runtime"
        return self._library_note

    def _usb_devices(self) -> list[tuple[str, str]]:
        found = []
        try:
            entries = sorted(self._usb_root.iterdir())
        except OSError:
            return []
        for entry in entries:
            try:
                ids = ((entry / "idVendor").read_text().strip().lower(), (entry / "idProduct").read_text().strip().lower())
            except OSError:
                continue
            if ids in EDGETPU_USB_IDS:
                found.append((entry.name, EDGETPU_USB_IDS[ids] + f" [{ids[0]}:{ids[1]}] at usb {entry.name}"))
        return found

    def read(self) -> ProbeReading:
        pcie = sorted(self._dev_root.glob("apex_*"))
        usb = self._usb_devices()
        if not pcie and not usb:
            return ProbeReading(notes=["no EdgeTPU: no /dev/apex_* and no USB 1a6e:089a or 18d1:9302"])
        lib = self._library_status()
        devices = [DeviceSample("edgetpu", i, f"Coral PCIe EdgeTPU ({p.name})", None, None, None, note=lib)
                   for i, p in enumerate(pcie)]
        devices += [DeviceSample("edgetpu", len(pcie) + i, name, None, None, None, note=lib)
                    for i, (_, name) in enumerate(usb)]
        return ProbeReading(devices=devices)

    def close(self) -> None:
        pass


def default_probes() -> list[Probe]:
    """Every probe this project knows; each is harmless on a node without its hardware."""
    return [PsutilProbe(), NvmlProbe(), TegrastatsProbe(), EdgeTpuProbe()]


class NodeCollector:
    """Runs the probes and folds their readings into one NodeSample; a failing probe becomes a note."""

    def __init__(self, probes: Sequence[Probe] | None = None, node_id: str = "local", hostname: str | None = None) -> None:
        self.probes: list[Probe] = list(probes) if probes is not None else default_probes()
        self.node_id = node_id
        self.hostname = hostname or socket.gethostname()

    def sample(self) -> NodeSample:
        devices: list[DeviceSample] = []
        notes: list[str] = []
        host: HostReading | None = None
        for probe in self.probes:
            try:
                reading = probe.read()
            except Exception as exc:  # one broken probe must not hide the others
                notes.append(f"{type(probe).__name__} failed: {type(exc).__name__}: {exc}")
                continue
            devices.extend(reading.devices)
            notes.extend(reading.notes)
            if host is None and reading.host is not None:
                host = reading.host
        if host is None:
            notes.append("no host probe: CPU and RAM not read")
            host = HostReading(float("nan"), 0, 0)
        if not any(d.kind in ("gpu", "jetson") for d in devices):
            notes.insert(0, "no GPU on this node: CPU only" if not any(d.kind == "edgetpu" for d in devices)
                         else "no GPU on this node")
        return NodeSample(
            node_id=self.node_id,
            hostname=self.hostname,
            timestamp=time.time(),
            cpu_percent=host.cpu_percent,
            ram_used_bytes=host.ram_used_bytes,
            ram_total_bytes=host.ram_total_bytes,
            devices=devices,
            notes=notes,
        )

    def close(self) -> None:
        for probe in self.probes:
            try:
                probe.close()
            except Exception:
                pass
