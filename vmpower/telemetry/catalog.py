"""The catalogue of signals and controls, their domains, and request validation.

This module owns what a name means: its native domain, units, description, whether it
can be written, how it aggregates over a coarser domain, and whether it is sensitive
(readable by default or not, see ``vmpower.telemetry.access``). It also owns the host's
domain topology (``Topology``: CPUs, packages, VMs) and the validation of a request
``(name, domain, index)`` against it. Reading and writing are ``vmpower.telemetry.sources``.

Domains, finest first: ``cpu`` (a host CPU number), ``package`` (a physical package id),
``board`` (index 0: the whole host), and ``vm`` (a VM name, or its position in the sorted
list of VM names). A cpu signal may be asked at package or board (aggregated over the
CPUs inside); a package signal at board; vm signals only at vm. A control asked at a
coarser domain is written to every CPU inside it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmpower.cpuset import format_cpu_list, parse_cpu_list
from vmpower.errors import SysfsError, TelemetryError
from vmpower.sysfs import Sysfs

BOARD = "board"
PACKAGE = "package"
CPU = "cpu"
VM = "vm"
DOMAINS = (BOARD, PACKAGE, CPU, VM)
# Coarser domains a native domain can be asked at.
_REACHABLE = {
    CPU: (CPU, PACKAGE, BOARD),
    PACKAGE: (PACKAGE, BOARD),
    BOARD: (BOARD,),
    VM: (VM,),
}

CPU_DIR = "devices/system/cpu"


@dataclass(frozen=True)
class SignalInfo:
    """One catalogue entry. ``aggregation`` says how a coarser domain combines members."""

    name: str
    domain: str
    units: str
    description: str
    writable: bool = False
    aggregation: str = "avg"
    sensitive: bool = False

    def row(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "domain": self.domain,
            "units": self.units,
            "writable": self.writable,
            "aggregation": self.aggregation,
            "description": self.description,
        }


CATALOG: dict[str, SignalInfo] = {
    info.name: info
    for info in (
        SignalInfo(
            "TIME",
            BOARD,
            "s",
            "Seconds since the session started (monotonic clock).",
            aggregation="first",
        ),
        SignalInfo(
            "CPU_FREQUENCY_STATUS",
            CPU,
            "Hz",
            "Current frequency of the CPU as cpufreq reports it (scaling_cur_freq).",
        ),
        SignalInfo(
            "CPU_FREQUENCY_MIN_AVAIL",
            CPU,
            "Hz",
            "Lowest frequency the hardware allows (cpuinfo_min_freq).",
        ),
        SignalInfo(
            "CPU_FREQUENCY_MAX_AVAIL",
            CPU,
            "Hz",
            "Highest frequency the hardware allows, turbo included (cpuinfo_max_freq).",
        ),
        SignalInfo(
            "CPU_FREQUENCY_MIN_CONTROL",
            CPU,
            "Hz",
            "Lower limit of the CPU's frequency (scaling_min_freq). Writable: within"
            " cpuinfo_min_freq..cpuinfo_max_freq and never above the maximum limit;"
            " restored when the session ends.",
            writable=True,
        ),
        SignalInfo(
            "CPU_FREQUENCY_MAX_CONTROL",
            CPU,
            "Hz",
            "Upper limit of the CPU's frequency (scaling_max_freq). Writable: within"
            " cpuinfo_min_freq..cpuinfo_max_freq and never below the minimum limit;"
            " restored when the session ends.",
            writable=True,
        ),
        SignalInfo(
            "CPU_UTILIZATION",
            CPU,
            "0-1",
            "Share of time the CPU was busy (not idle, not iowait) since the previous read"
            " (since boot for the first), from /proc/stat.",
        ),
        SignalInfo(
            "CPU_ENERGY",
            PACKAGE,
            "J",
            "Energy counter of the package (powercap intel-rapl energy_uj), wrap-around"
            " corrected with max_energy_range_uj.",
            aggregation="sum",
            sensitive=True,
        ),
        SignalInfo(
            "CPU_POWER",
            PACKAGE,
            "W",
            "Average package power since the previous read (since the session started for"
            " the first), derived from CPU_ENERGY.",
            aggregation="sum",
            sensitive=True,
        ),
        SignalInfo(
            "VM_VCPU_TIME",
            VM,
            "s",
            "CPU time all vCPUs of the VM have used (libvirt).",
        ),
        SignalInfo(
            "VM_ENERGY",
            VM,
            "J",
            "Energy attributed to the VM since the session started: over each interval"
            " between samples, each package's energy is shared among the VMs in proportion"
            " to the vCPU time they used on that package's CPUs. Host and idle energy is"
            " shared too; energy of an interval no VM ran in is attributed to none.",
            sensitive=True,
        ),
    )
}


def signal_info(name: str) -> SignalInfo:
    """The catalogue entry of ``name``; TelemetryError naming the known ones otherwise."""
    info = CATALOG.get(name) if isinstance(name, str) else None
    if info is None:
        raise TelemetryError(
            f"unknown signal or control {name!r} (known: {', '.join(sorted(CATALOG))})"
        )
    return info


@dataclass(frozen=True)
class Request:
    """One requested signal or control. ``index`` is a VM name for the vm domain."""

    name: str
    domain: str
    index: int | str

    def label(self) -> str:
        """Column name: ``CPU_FREQUENCY_STATUS@cpu-0``."""
        return f"{self.name}@{self.domain}-{self.index}"

    def to_json(self) -> list[Any]:
        return [self.name, self.domain, self.index]

    def __str__(self) -> str:
        return f"{self.name} {self.domain} {self.index}"


def parse_request(obj: Any, what: str = "signal") -> Request:
    """A request from JSON: ``[name, domain, index]`` or ``{"name", "domain", "index"}``."""
    if isinstance(obj, Mapping):
        obj = [obj.get("name"), obj.get("domain"), obj.get("index")]
    if not isinstance(obj, list | tuple) or len(obj) != 3:
        raise TelemetryError(f"a {what} request is [name, domain, index], not {obj!r}")
    name, domain, index = obj
    if not isinstance(name, str) or not name:
        raise TelemetryError(f"{what} request {obj!r}: the name must be a string")
    if not isinstance(domain, str) or domain not in DOMAINS:
        raise TelemetryError(f"{what} request {obj!r}: domain must be one of {', '.join(DOMAINS)}")
    if isinstance(index, bool) or not isinstance(index, int | str):
        raise TelemetryError(f"{what} request {obj!r}: the index must be an integer")
    if isinstance(index, str):
        text = index.strip()
        if text.isdigit():
            index = int(text)
        elif domain != VM or not text:
            raise TelemetryError(f"{what} request {obj!r}: the index must be an integer")
        else:
            index = text
    return Request(name, domain, index)


def parse_requests(items: Any, what: str) -> list[Request]:
    if items is None:
        return []
    if not isinstance(items, list):
        raise TelemetryError(f"{what}s must be a list of [name, domain, index]")
    return [parse_request(item, what) for item in items]


@dataclass(frozen=True)
class Topology:
    """The host's domains: present CPUs, packages (id → CPUs), VM names (sorted)."""

    cpus: tuple[int, ...]
    packages: Mapping[int, tuple[int, ...]]
    vms: tuple[str, ...] = ()

    @classmethod
    def discover(
        cls, sysfs: Sysfs, cpus: Iterable[int] | None = None, vms: Iterable[str] = ()
    ) -> Topology:
        """Read the CPUs and their packages under ``sysfs``.

        A CPU without ``topology/physical_package_id`` (offline CPUs hide it, simulated
        trees lack it) counts in package 0.
        """
        if cpus is None:
            cpus = _present_cpus(sysfs)
        cpu_list = tuple(sorted(set(cpus)))
        packages: dict[int, list[int]] = {}
        for cpu in cpu_list:
            try:
                package = sysfs.read_int(f"{CPU_DIR}/cpu{cpu}/topology/physical_package_id")
            except SysfsError:
                package = 0
            packages.setdefault(max(package, 0), []).append(cpu)
        if not packages:
            packages[0] = []
        return cls(cpu_list, {p: tuple(c) for p, c in sorted(packages.items())}, tuple(sorted(vms)))

    def package_of(self, cpu: int) -> int:
        for package, members in self.packages.items():
            if cpu in members:
                return package
        return 0

    def cpus_of(self, domain: str, index: int | str) -> tuple[int, ...]:
        """The CPUs inside a (validated) cpu, package or board domain."""
        if domain == CPU:
            assert isinstance(index, int)
            return (index,)
        if domain == PACKAGE:
            return self.packages[int(index)]
        return self.cpus

    def packages_of(self, domain: str, index: int | str) -> tuple[int, ...]:
        """The packages inside a (validated) package or board domain."""
        if domain == PACKAGE:
            return (int(index),)
        return tuple(self.packages)

    def resolve(self, request: Request, write: bool = False) -> Request:
        """Validate ``request`` (name, writability, domain, index); vm indices → names."""
        info = signal_info(request.name)
        kind = "control" if write else "signal"
        if write and not info.writable:
            writable = sorted(n for n, i in CATALOG.items() if i.writable)
            raise TelemetryError(
                f"{request.name} is a signal, not a control (controls: {', '.join(writable)})"
            )
        if request.domain not in _REACHABLE[info.domain]:
            raise TelemetryError(
                f"{kind} {request.name} cannot be asked at domain {request.domain!r} (its"
                f" domain is {info.domain}; usable: {', '.join(_REACHABLE[info.domain])})"
            )
        index = request.index
        domain = request.domain
        if domain == VM:
            if isinstance(index, int):
                if not 0 <= index < len(self.vms):
                    raise TelemetryError(
                        f"{request}: no VM number {index} ({len(self.vms)} VMs known, 0-based)"
                    )
                index = self.vms[index]
            elif index not in self.vms:
                raise TelemetryError(
                    f"{request}: unknown VM {index!r} (known: {', '.join(self.vms) or 'none'})"
                )
            return Request(request.name, domain, index)
        if not isinstance(index, int):
            raise TelemetryError(f"{request}: the index of domain {domain} must be an integer")
        if domain == BOARD and index != 0:
            raise TelemetryError(f"{request}: the board domain has only index 0")
        if domain == PACKAGE and index not in self.packages:
            known = ", ".join(str(p) for p in self.packages)
            raise TelemetryError(f"{request}: no package {index} (packages: {known})")
        if domain == CPU and index not in self.cpus:
            raise TelemetryError(f"{request}: no CPU {index} (present: {_ranges(self.cpus)})")
        return request


def _present_cpus(sysfs: Sysfs) -> list[int]:
    try:
        return sorted(parse_cpu_list(sysfs.read(f"{CPU_DIR}/present")))
    except (SysfsError, ValueError):
        pass
    try:
        names = sysfs.listdir(CPU_DIR)
    except SysfsError:
        return []
    return sorted(int(n[3:]) for n in names if n.startswith("cpu") and n[3:].isdigit())


def _ranges(cpus: Iterable[int]) -> str:
    return format_cpu_list(cpus) or "none"
