"""Parse one line of Jetson ``tegrastats`` output.

Jetson GPUs are invisible to NVML and DCGM on JetPack, so tegrastats is where GPU
load, shared RAM, temperatures and power rails come from. Its line format drifts
between JetPack releases, so the parser reads fields by name and keeps going when
one is missing or unfamiliar:

- JetPack 4 (Nano, TX2, Xavier NX):
  ``RAM 2448/7765MB (lfb 1x4MB) SWAP 0/3882MB (cached 0MB) CPU [12%@1190,off] EMC_FREQ 0%
  GR3D_FREQ 45%@1109 ... GPU@40C ... VDD_IN 4865/4865`` (rails in mW, current/average);
  the Nano names its rails ``POM_5V_IN``, the AGX Xavier ``GPU``, ``CPU``, ``SOC``...
- JetPack 5/6 (Orin): a leading ``MM-DD-YYYY HH:MM:SS`` timestamp,
  ``GR3D_FREQ 0%@[305,305]`` (one frequency per GPC), lower-case sensor names,
  ``-256C`` for a sensor that is absent, and rails written ``VDD_IN 4986mW/4986mW``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from app.errors import BadRequest

_UNIT_BYTES = {"B": 1, "kB": 1024, "KB": 1024, "MB": 1024**2, "GB": 1024**3}

# tegrastats prints this temperature for a sensor that is not fitted or not read.
ABSENT_SENSOR_C = -256.0

# Rails that measure the whole module's input: when one is present it is the total.
INPUT_RAILS = ("VDD_IN", "POM_5V_IN")

_TIMESTAMP = re.compile(r"^\s*(\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2})\s+")
_RAM = re.compile(r"\bRAM (\d+)/(\d+)([kMG]?B)\b")
_SWAP = re.compile(r"\bSWAP (\d+)/(\d+)([kMG]?B)(?: \(cache[a-z]* (\d+)([kMG]?B)\))?")
_CPU = re.compile(r"\bCPU \[([^\]]*)\]")
_CPU_CORE = re.compile(r"^(\d+(?:\.\d+)?)%(?:@(\d+))?$")
_GR3D = re.compile(r"\bGR3D_FREQ (\d+(?:\.\d+)?)%(?:@(\[[\d,\s]*\]|\d+))?")
_EMC = re.compile(r"\bEMC_FREQ (\d+(?:\.\d+)?)%(?:@(\d+))?")
_TEMP = re.compile(r"(?<![\w@])([A-Za-z][A-Za-z0-9_]*)@(-?\d+(?:\.\d+)?)C\b")
# A rail is NAME current/average, optionally with mW, followed by a space or the end:
# the look-ahead keeps "RAM 2448/7765MB" and "IRAM 0/252kB" out.
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*) (\d+)(?:mW)?/(\d+)(?:mW)?(?=\s|$)")
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})


@dataclass(frozen=True)
class PowerRail:
    """One INA3221 rail: instantaneous and running-average power, in milliwatts."""

    current_mw: int
    average_mw: int


@dataclass(frozen=True)
class TegraStats:
    """One tegrastats line, in SI units (bytes, fractions 0..1, MHz, deg C, mW).

    ``cpu_loads`` has one entry per core, ``None`` for a core that is offline.
    ``gpu_freqs_mhz`` has one entry per GPC on Orin, one in all on older boards.
    """

    ram_used_bytes: int
    ram_total_bytes: int
    swap_used_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_cached_bytes: int | None = None
    cpu_loads: tuple[float | None, ...] = ()
    cpu_freqs_mhz: tuple[int | None, ...] = ()
    gpu_utilization: float | None = None
    gpu_freqs_mhz: tuple[int, ...] = ()
    emc_utilization: float | None = None
    emc_freq_mhz: int | None = None
    temperatures_c: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    power_rails: Mapping[str, PowerRail] = field(default_factory=lambda: MappingProxyType({}))
    timestamp_text: str | None = None

    @property
    def gpu_temperature_c(self) -> float | None:
        """The GPU sensor (``GPU@`` on JetPack 4/5, ``gpu@`` on JetPack 6), if fitted."""
        for name, value in self.temperatures_c.items():
            if name.lower() == "gpu":
                return value
        return None

    @property
    def total_power_w(self) -> float | None:
        """Module input power: the input rail when there is one, else the sum of the rails.

        AGX Orin has no single input rail; its module power is the sum of its rails
        (as jtop reports it). ``NC`` rails are not connected and are left out.
        """
        for name in INPUT_RAILS:
            if name in self.power_rails:
                return self.power_rails[name].current_mw / 1000.0
        rails = [r.current_mw for n, r in self.power_rails.items() if n != "NC"]
        return sum(rails) / 1000.0 if rails else None


def _to_bytes(value: str, unit: str) -> int:
    return int(value) * _UNIT_BYTES[unit]


def _parse_cpus(body: str) -> tuple[tuple[float | None, ...], tuple[int | None, ...]]:
    loads: list[float | None] = []
    freqs: list[int | None] = []
    for token in (t.strip() for t in body.split(",")):
        if not token:
            continue
        m = _CPU_CORE.match(token)
        if m is None:  # "off" or anything unknown: the core reports no load
            loads.append(None)
            freqs.append(None)
            continue
        loads.append(float(m.group(1)) / 100.0)
        freqs.append(int(m.group(2)) if m.group(2) else None)
    return tuple(loads), tuple(freqs)


def _parse_freqs(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    return tuple(int(f) for f in re.findall(r"\d+", text))


def parse_tegrastats(line: str) -> TegraStats:
    """Parse one tegrastats line; raises BadRequest when the line has no ``RAM used/total`` field."""
    text = line.strip()
    ram = _RAM.search(text)
    if ram is None:
        shown = text if len(text) <= 120 else text[:117] + "..."
        raise BadRequest(
            f"not a tegrastats line (no 'RAM used/totalMB' field): {shown!r}; "
            "pass one line of `tegrastats --interval <ms>` output"
        )
    ts = _TIMESTAMP.match(text)
    swap = _SWAP.search(text)
    cpu = _CPU.search(text)
    gr3d = _GR3D.search(text)
    emc = _EMC.search(text)
    loads, cpu_freqs = _parse_cpus(cpu.group(1)) if cpu else ((), ())

    temperatures: dict[str, float] = {}
    for name, value in _TEMP.findall(text):
        celsius = float(value)
        if celsius != ABSENT_SENSOR_C:
            temperatures[name] = celsius

    rails: dict[str, PowerRail] = {}
    for name, current, average in _RAIL.findall(text):
        if name in _NOT_RAILS:
            continue
        # Orin repeats "NC 0mW/0mW" for unconnected channels: one entry is enough.
        rails[name] = PowerRail(int(current), int(average))

    return TegraStats(
        ram_used_bytes=_to_bytes(ram.group(1), ram.group(3)),
        ram_total_bytes=_to_bytes(ram.group(2), ram.group(3)),
        swap_used_bytes=_to_bytes(swap.group(1), swap.group(3)) if swap else None,
        swap_total_bytes=_to_bytes(swap.group(2), swap.group(3)) if swap else None,
        swap_cached_bytes=_to_bytes(swap.group(4), swap.group(5)) if swap and swap.group(4) else None,
        cpu_loads=loads,
        cpu_freqs_mhz=cpu_freqs,
        gpu_utilization=float(gr3d.group(1)) / 100.0 if gr3d else None,
        gpu_freqs_mhz=_parse_freqs(gr3d.group(2)) if gr3d else (),
        emc_utilization=float(emc.group(1)) / 100.0 if emc else None,
        emc_freq_mhz=int(emc.group(2)) if emc and emc.group(2) else None,
        temperatures_c=MappingProxyType(temperatures),
        power_rails=MappingProxyType(rails),
        timestamp_text=ts.group(1) if ts else None,
    )
