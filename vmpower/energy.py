"""The daemon's lifetime energy books: intel-rapl package energy, shared among the VMs.

Owned by the monitor thread. Every ``metrics.energy_period_s`` (``tick``), and before a
metrics snapshot, each package's ``energy_uj`` is read (wrap-corrected with
``max_energy_range_uj``: Documentation/power/powercap/powercap.rst; the reader is
``vmpower.telemetry.sources.EnergyZone``) and the energy since the previous read is
split: each VM gets the share of the package's CPU capacity its vCPUs used on that
package's CPUs, the rest is the host's (its own processes, and idle):

    vm share = vCPU seconds the VM ran on the package's CPUs
               / (the package's CPUs x the seconds between two vCPU reads)

(shares are scaled down if they add up to more than 1: clocks of two reads never line up
exactly). So every joule of a package lands in exactly one place, and the books balance:
Σ VM + Σ host (+ what VMs that went away had, ``departed_j``) = Σ package.

The vCPU times come from the libvirt worker thread (``Hypervisor.read_vcpu_times``),
never from this thread: a hung libvirtd leaves the last shares in force for
STALE_PERIODS periods (or times the interval between samples, when that is longer: a
host with more VMs than the hypervisor reads a second, ``registry.VCPU_READS_PER_S``),
then the energy goes to the host. Read a VM at a time (virDomainGetVcpus), each vCPU's
time counts on the package of the CPU it runs on at the read (libvirt reports no more).
Read for all VMs at once (virConnectGetAllDomainStats, QEMU's driver), no host CPU is
named (CPU_NOT_REPORTED): the time is shared among the packages of the CPUs the vCPU is
pinned to (``vcpu_pins``), by their share of them, as a scheduler free to use them all
would spread it. The package of a CPU is ``cpuN/topology/physical_package_id``
(``vmpower.telemetry.catalog.Topology``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Protocol

from vmpower.errors import SysfsError
from vmpower.hypervisor.model import CPU_NOT_REPORTED
from vmpower.logbook import KindLog
from vmpower.sysfs import Sysfs
from vmpower.telemetry.catalog import Topology
from vmpower.telemetry.sources import EnergyZone, find_energy_zones

log = logging.getLogger("vmpower.energy")

RAPL_DIR = "devices/virtual/powercap/intel-rapl"  # under the sysfs root
STALE_PERIODS = 5  # vCPU shares older than this many periods: the energy is the host's
MAX_VMS = 65536  # VMs with books; past it, the books of VMs gone are folded away
# Package splits of pin sets kept (a host has a few distinct ones; a set of 256 CPUs is
# ~8 KiB, so this bounds the cache near 32 MiB even if every one were distinct).
SPLITS_KEPT = 4096


class VcpuSample(Protocol):
    """What ``Hypervisor.read_vcpu_times`` hands back (``hypervisor.session.VcpuTimes``)."""

    @property
    def vms(self) -> Mapping[str, tuple[tuple[float, int], ...]]: ...

    @property
    def read_at(self) -> float: ...


ReadVcpuTimes = Callable[[Callable[[VcpuSample | None], None]], bool]
# A VM's vCPUs' host CPUs (``Hypervisor.vcpu_pins``); None when not known.
VcpuPins = Callable[[str], "tuple[frozenset[int], ...] | None"]


class EnergyAccount:
    """Package, VM and host energy (J) since the daemon started."""

    def __init__(
        self,
        sysfs_root: Path,
        read_vcpu_times: ReadVcpuTimes,
        clock: Callable[[], float],
        period_s: float = 1.0,
        errors: KindLog | None = None,
        vcpu_pins: VcpuPins | None = None,
    ) -> None:
        self._read_vcpu_times = read_vcpu_times
        self._vcpu_pins = vcpu_pins
        self._split_of: dict[frozenset[int], tuple[tuple[int, float], ...]] = {}
        self._clock = clock
        self.period_s = period_s
        self._errors = errors or KindLog(log, "energy counters unreadable", one="unreadable")
        self._rapl = Sysfs(Path(sysfs_root) / RAPL_DIR)
        self._zones: dict[int, EnergyZone] = {}
        for package, (zone_dir, max_range) in find_energy_zones(self._rapl).items():
            try:
                reader = self._rapl.open_reader(f"{zone_dir}/energy_uj")
            except SysfsError as exc:  # root only since CVE-2020-8694: say so once
                log.warning("intel-rapl zone %s unreadable, left out: %s", zone_dir, exc)
                continue
            self._zones[package] = EnergyZone(package, reader, max_range)
        topology = Topology.discover(Sysfs(sysfs_root))
        self._package_of = {cpu: p for p, cpus in topology.packages.items() for cpu in cpus}
        self._capacity = {p: max(len(cpus), 1) for p, cpus in topology.packages.items()}
        self._gen = 0
        self._last_j: dict[int, float] = {}
        self.package_j: dict[int, float] = {}
        self.host_j: dict[int, float] = {}
        self.vm_j: dict[str, float] = {}
        self.departed_j = 0.0  # what VMs had that are no longer kept (forget())
        self._shares: dict[int, dict[str, float]] = {}
        self._shares_at: float | None = None
        self._prev: VcpuSample | None = None
        # Between the last two vCPU samples: a period, or longer on a host with more VMs
        # than the hypervisor reads a second (registry.VCPU_READS_PER_S).
        self._sample_every_s = 0.0
        for package in self._zones:
            self.package_j[package] = 0.0
            self.host_j[package] = 0.0
        self._read_zones()  # the books start now

    @property
    def enabled(self) -> bool:
        """True when the host has readable intel-rapl package zones."""
        return bool(self._zones)

    def packages(self) -> list[int]:
        return sorted(self._zones)

    # -- the monitor thread's calls ----------------------------------------------------------

    def tick(self) -> None:
        """The periodic turn: book the energy so far, ask libvirt for the next shares."""
        self.update()
        self._read_vcpu_times(self._on_vcpu_times)

    def update(self) -> None:
        """Book the energy spent since the last update (cheap: one pread per package)."""
        now = self._clock()
        fresh = (
            self._shares_at is not None
            and now - self._shares_at
            <= STALE_PERIODS * max(self.period_s, self._sample_every_s) + 1.0
        )
        for package, spent_j in self._read_zones().items():
            self.package_j[package] += spent_j
            shares = self._shares.get(package) if fresh else None
            given = 0.0
            if shares:
                vm_j = self.vm_j
                for vm, share in shares.items():
                    part = spent_j * share
                    vm_j[vm] = vm_j.get(vm, 0.0) + part
                    given += part
            self.host_j[package] += spent_j - given

    def _read_zones(self) -> dict[int, float]:
        """Each package's energy since the previous read (J); unreadable ones left out."""
        self._gen += 1
        spent: dict[int, float] = {}
        for package, zone in self._zones.items():
            try:
                now_j = zone.joules(self._gen)
            except (SysfsError, OSError, ValueError) as exc:
                self._errors.note(f"package-{package}", "unreadable", str(exc))
                continue
            before = self._last_j.get(package)
            self._last_j[package] = now_j
            if before is not None:
                spent[package] = max(0.0, now_j - before)
        return spent

    def _on_vcpu_times(self, sample: VcpuSample | None) -> None:
        """A vCPU read came back: the shares of each package's CPU capacity per VM."""
        if sample is None:
            return
        prev, self._prev = self._prev, sample
        if prev is None:
            return
        dt = sample.read_at - prev.read_at
        if not dt > 0:
            return
        self._sample_every_s = dt
        used: dict[int, dict[str, float]] = {}
        package_of = self._package_of
        for vm, vcpus in sample.vms.items():
            before = prev.vms.get(vm)
            if before is None or len(before) != len(vcpus):
                continue  # just started or resized: from the next read on
            pins = None
            for index, ((t, cpu), (t0, _cpu0)) in enumerate(zip(vcpus, before, strict=True)):
                ran = t - t0
                if ran <= 0 or not math.isfinite(ran):
                    continue
                if cpu != CPU_NOT_REPORTED:
                    package = package_of.get(cpu, 0)
                    per_vm = used.setdefault(package, {})
                    per_vm[vm] = per_vm.get(vm, 0.0) + ran
                    continue
                if pins is None:
                    pins = (self._vcpu_pins(vm) if self._vcpu_pins else None) or ()
                allowed = pins[index] if index < len(pins) else frozenset()
                for package, part in self._split(allowed):
                    per_vm = used.setdefault(package, {})
                    per_vm[vm] = per_vm.get(vm, 0.0) + ran * part
        shares: dict[int, dict[str, float]] = {}
        for package, per_vm in used.items():
            capacity_s = self._capacity.get(package, 1) * dt
            total = sum(per_vm.values()) / capacity_s
            scale = 1.0 / total if total > 1.0 else 1.0
            shares[package] = {vm: s / capacity_s * scale for vm, s in per_vm.items()}
        self._shares = shares
        self._shares_at = sample.read_at

    def _split(self, cpus: frozenset[int]) -> tuple[tuple[int, float], ...]:
        """How a vCPU's time is shared among packages when the read named no host CPU
        (the bulk statistics): by the share of its allowed CPUs on each, as a scheduler
        free to use them all would spread it; every CPU when its pins are not known."""
        split = self._split_of.get(cpus)
        if split is None:
            counts: dict[int, int] = {}
            for cpu in cpus or self._package_of:
                package = self._package_of.get(cpu, 0)
                counts[package] = counts.get(package, 0) + 1
            total = sum(counts.values())
            split = tuple((package, n / total) for package, n in sorted(counts.items()))
            split = split or ((0, 1.0),)  # no topology: one package, as package_of says
            if len(self._split_of) >= SPLITS_KEPT:  # pin sets come and go with VMs
                self._split_of.clear()
            self._split_of[cpus] = split
        return split

    def forget(self, keep: Iterable[str]) -> None:
        """Fold the books of VMs not in ``keep`` into ``departed_j`` once there are many."""
        if len(self.vm_j) <= MAX_VMS:
            return
        kept = set(keep)
        for vm in [v for v in self.vm_j if v not in kept]:
            self.departed_j += self.vm_j.pop(vm)

    def vm_energy_j(self, vm: str) -> float | None:
        """The VM's energy so far; None when this host has no intel-rapl zone."""
        if not self._zones:
            return None
        return self.vm_j.get(vm, 0.0)

    def close(self) -> None:
        for zone in self._zones.values():
            zone.close()
        self._zones.clear()
        self._rapl.close()
