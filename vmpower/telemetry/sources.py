"""Reading signals and writing controls: what the batch server samples and applies.

This module owns the readers behind every catalogue name (``vmpower.telemetry.catalog``)
and the rules of the two writable controls. Files are opened once, when a session
starts, and re-read with ``pread`` at offset 0 on every sample (sysfs through
``Sysfs.open_reader``, so ``Sysfs`` stays the only code opening files under its root).
Several requests that share a file (``/proc/stat``, one package's energy counter, the
VMs' vCPU times) read it once per sample: ``Sources.begin()`` starts a sample and shared
readers cache by its generation number.

Kernel and platform rules behind the readers:

* cpufreq attributes are in kHz (Documentation/admin-guide/pm/cpufreq.rst); signals are
  in Hz.
* ``/proc/stat`` (Documentation/filesystems/proc.rst) counts USER_HZ ticks per CPU:
  user nice system idle iowait irq softirq steal guest guest_nice. guest and guest_nice
  are already included in user and nice (kernel/sched/cputime.c, account_guest_time),
  so the total is the sum of the first eight; idle time is idle + iowait.
* powercap ``energy_uj`` counts up to ``max_energy_range_uj`` and wraps to 0
  (Documentation/power/powercap/powercap.rst): a reading below the previous one gained
  ``max_energy_range_uj + 1 - previous + reading``. A counter that wraps twice between
  two reads cannot be told from one wrap, so the server also refreshes every counter
  on a timer. Since CVE-2020-8694 (Platypus) the kernel makes ``energy_uj`` readable by
  root only; that is why energy signals are sensitive (not readable by default).
* Frequency limits: the kernel clamps ``scaling_min/max_freq`` into
  ``cpuinfo_min_freq..cpuinfo_max_freq`` silently and refuses (kernels before 5.3) or
  clamps a minimum above the maximum; vmpower refuses both with a clear error before
  sending anything. The daemon writes them (``vmpower.power``, with
  ``vmpower.cpufreq.limits.write_limits``, the one place that orders them so
  min <= max holds in between): the batch server never writes a cpufreq file.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

from vmpower.errors import SysfsError, TelemetryError, VmpowerError
from vmpower.sysfs import Reader, Sysfs
from vmpower.telemetry.catalog import CPU_DIR, VM, Request, Topology, signal_info

log = logging.getLogger("vmpower.telemetry")

Clock = Callable[[], float]
ReadFn = Callable[[], float]


class VmTimes(Protocol):
    """Where VM vCPU times come from (libvirt in production)."""

    def vcpu_times(self) -> dict[str, list[tuple[float, int]]]:
        """Every active VM → per vCPU: (CPU time used in s, host CPU it runs on)."""
        ...


class LibvirtVmTimes:
    """VM vCPU times over a read-only libvirt connection of this process's own.

    The batch server is a fresh process (exec'd by the daemon), so it can open its own
    connection safely; read-only needs no write access to libvirtd.
    """

    def __init__(self, uri: str) -> None:
        import libvirt  # only sessions asking for VM signals pay for the import

        self._libvirt = libvirt
        # libvirt prints every error on stderr by default; ours are raised instead.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        try:
            self._conn = libvirt.openReadOnly(uri)
        except libvirt.libvirtError as exc:
            raise TelemetryError(f"cannot connect to libvirt at {uri}: {exc}") from None
        self.uri = uri

    def vcpu_times(self) -> dict[str, list[tuple[float, int]]]:
        libvirt = self._libvirt
        try:
            domains = self._conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        except libvirt.libvirtError as exc:
            raise TelemetryError(f"libvirt {self.uri}: cannot list VMs: {exc}") from None
        times: dict[str, list[tuple[float, int]]] = {}
        for dom in domains:
            try:
                infos, _maps = dom.vcpus()
                name = dom.name()
            except libvirt.libvirtError:
                continue  # stopped between the listing and this call
            # virVcpuInfo: (number, state, cpuTime in ns, cpu)
            times[name] = [(cpu_time_ns / 1e9, cpu) for _n, _s, cpu_time_ns, cpu in infos]
        return times

    def close(self) -> None:
        try:
            self._conn.close()
        except self._libvirt.libvirtError:
            pass


# -- shared per-sample sources ---------------------------------------------------------------


class ProcStat:
    """``/proc/stat`` kept open; per CPU (busy, total) ticks, parsed once per sample."""

    def __init__(self, path: Path, cpu_count: int) -> None:
        self.path = str(path)
        try:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise TelemetryError(f"cannot open {path}: {exc.strerror}") from None
        # Only the cpu lines at the top are needed (the intr line after them can be huge).
        self._size = 256 * (cpu_count + 2)
        self._gen = -1
        self._cpus: dict[int, tuple[int, int]] = {}

    def cpus(self, gen: int) -> dict[int, tuple[int, int]]:
        if gen != self._gen:
            self._cpus = self._parse()
            self._gen = gen
        return self._cpus

    def _parse(self) -> dict[int, tuple[int, int]]:
        while True:
            data = os.pread(self._fd, self._size, 0)
            lines = data.split(b"\n")
            # A complete answer ends the cpu lines with another line (or the file ends).
            if len(data) < self._size or not lines[-2].startswith(b"cpu"):
                break
            self._size *= 2
        result: dict[int, tuple[int, int]] = {}
        for line in lines:
            if not line.startswith(b"cpu"):
                if result:
                    break
                continue
            fields = line.split()
            label = fields[0][3:]
            if not label.isdigit():
                continue  # the "cpu " summary line
            ticks = [int(x) for x in fields[1:9]]
            total = sum(ticks)
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            result[int(label)] = (total - idle, total)
        if not result:
            raise TelemetryError(f"{self.path}: no per-CPU lines")
        return result

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class EnergyZone:
    """One intel-rapl package zone: its ``energy_uj`` kept open, wrap-around corrected."""

    def __init__(self, package: int, energy: Reader, max_range_uj: int) -> None:
        self.package = package
        self._energy = energy
        self._modulus_uj = max_range_uj + 1
        self._last_uj: int | None = None
        self._total_uj = 0
        self._gen = -1

    def joules(self, gen: int) -> float:
        """The extended counter (J) as of sample ``gen``."""
        if gen != self._gen:
            raw = self._energy.read_int()
            last = self._last_uj
            if last is None:
                self._total_uj = raw
            elif raw >= last:
                self._total_uj += raw - last
            else:  # wrapped past max_energy_range_uj back to 0
                self._total_uj += raw - last + self._modulus_uj
            self._last_uj = raw
            self._gen = gen
        return self._total_uj / 1e6

    def close(self) -> None:
        self._energy.close()


def find_energy_zones(powercap: Sysfs) -> dict[int, tuple[str, int]]:
    """package id → (zone directory, max_energy_range_uj) of the intel-rapl package zones."""
    try:
        names = powercap.listdir()
    except SysfsError:
        return {}
    zones: dict[int, tuple[str, int]] = {}
    for name in names:
        # Top-level zones are intel-rapl:N; intel-rapl:N:M are their subzones (core, dram).
        if not name.startswith("intel-rapl:") or name.count(":") != 1:
            continue
        try:
            label = powercap.read(f"{name}/name")
            max_range = powercap.read_int(f"{name}/max_energy_range_uj")
        except SysfsError:
            continue
        if label.startswith("package-") and label[len("package-") :].isdigit():
            zones[int(label[len("package-") :])] = (name, max_range)
    return zones


class VmAccount:
    """Per-VM vCPU time and shared-out energy, refreshed once per sample."""

    def __init__(
        self, vm_times: VmTimes, topology: Topology, zones: dict[int, EnergyZone] | None
    ) -> None:
        self._source = vm_times
        self._topology = topology
        self._zones = zones or {}
        self._gen = -1
        self.vcpu_time_s: dict[str, float] = {}
        self.energy_j: dict[str, float] = {}
        self._prev_vcpu: dict[tuple[str, int], float] = {}
        self._prev_zone_j: dict[int, float] = {}

    def share_energy(self, zones: dict[int, EnergyZone], gen: int) -> None:
        """Start sharing out these packages' energy; the first interval starts now."""
        self._zones = zones
        self._gen = -1
        self.refresh(gen)

    @property
    def shares_energy(self) -> bool:
        return bool(self._zones)

    def refresh(self, gen: int) -> None:
        if gen == self._gen:
            return
        self._gen = gen
        times = self._source.vcpu_times()
        self.vcpu_time_s = {vm: sum(t for t, _cpu in vcpus) for vm, vcpus in times.items()}
        if not self._zones:
            return
        # vCPU time each VM used on each package since the previous sample; a vCPU's
        # time counts on the package of the CPU it runs on now (libvirt reports no more).
        used: dict[int, dict[str, float]] = {}
        prev_vcpu = self._prev_vcpu
        current: dict[tuple[str, int], float] = {}
        for vm, vcpus in times.items():
            for i, (t, cpu) in enumerate(vcpus):
                current[(vm, i)] = t
                before = prev_vcpu.get((vm, i))
                if before is None or t < before:
                    continue
                package = self._topology.package_of(cpu)
                per_vm = used.setdefault(package, {})
                per_vm[vm] = per_vm.get(vm, 0.0) + (t - before)
        self._prev_vcpu = current
        for package, zone in self._zones.items():
            now_j = zone.joules(gen)
            before_j = self._prev_zone_j.get(package)
            self._prev_zone_j[package] = now_j
            shares = used.get(package)
            if before_j is None or not shares:
                continue
            spent_j = now_j - before_j
            total_s = sum(shares.values())
            if total_s <= 0:
                continue
            for vm, vm_s in shares.items():
                self.energy_j[vm] = self.energy_j.get(vm, 0.0) + spent_j * vm_s / total_s


# -- the sources of one session -----------------------------------------------------------------


class Sources:
    """Everything one session reads and writes; ``close()`` releases every open file."""

    def __init__(
        self,
        sysfs: Sysfs,
        powercap: Sysfs,
        proc_root: Path,
        topology: Topology,
        vm_times: Callable[[], VmTimes] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.sysfs = sysfs
        self.powercap = powercap
        self.proc_root = Path(proc_root)
        self.topology = topology
        self._vm_times_factory = vm_times
        self.clock = clock
        self.started_s = clock()
        self.gen = 0
        self._readers: list[Reader] = []
        self._reader_by_rel: dict[str, Reader] = {}
        self._proc_stat: ProcStat | None = None
        self._zones: dict[int, EnergyZone] | None = None
        self._vm_account: VmAccount | None = None
        self._vm_times: VmTimes | None = None

    def begin(self) -> int:
        """Start a new sample: shared files are read again at most once from now."""
        self.gen += 1
        return self.gen

    # -- opening ------------------------------------------------------------------------

    def _reader(self, rel: str, what: str) -> Reader:
        reader = self._reader_by_rel.get(rel)
        if reader is None:
            try:
                reader = self.sysfs.open_reader(rel)
            except SysfsError as exc:
                raise TelemetryError(f"{what}: cannot read {exc.path}: {exc.reason}") from None
            self._readers.append(reader)
            self._reader_by_rel[rel] = reader
        return reader

    def cpufreq_file(self, cpu: int, attribute: str, what: str) -> Reader:
        """A cpufreq attribute of ``cpu``, kept open (shared by every request using it)."""
        return self._reader(f"{CPU_DIR}/cpu{cpu}/cpufreq/{attribute}", what)

    def _energy_zones(self, packages: Iterable[int], what: str) -> list[EnergyZone]:
        if self._zones is None:
            self._zones = {}
            for package, (zone_dir, max_range) in find_energy_zones(self.powercap).items():
                try:
                    reader = self.powercap.open_reader(f"{zone_dir}/energy_uj")
                except SysfsError as exc:
                    log.warning("powercap zone %s unreadable: %s", zone_dir, exc)
                    continue
                self._zones[package] = EnergyZone(package, reader, max_range)
        zones = []
        for package in packages:
            zone = self._zones.get(package)
            if zone is None:
                raise TelemetryError(
                    f"{what}: no readable intel-rapl zone named package-{package} under"
                    f" {self.powercap.root}"
                )
            zones.append(zone)
        return zones

    def _vms(self, with_energy: bool, what: str) -> VmAccount:
        if self._vm_times is None:
            if self._vm_times_factory is None:
                raise TelemetryError(f"{what}: VM signals are not available here (no libvirt)")
            self._vm_times = self._vm_times_factory()
        if self._vm_account is None:
            self._vm_account = VmAccount(self._vm_times, self.topology, None)
        account = self._vm_account
        if with_energy and not account.shares_energy:
            zones = self._energy_zones(tuple(self.topology.packages), what)
            account.share_energy({z.package: z for z in zones}, self.begin())
        return account

    def signal(self, request: Request) -> ReadFn:
        """A function reading ``request`` (already validated against the topology)."""
        name, domain, index = request.name, request.domain, request.index
        what = str(request)
        info = signal_info(name)
        if name == "TIME":
            started, clock = self.started_s, self.clock
            return lambda: clock() - started
        if info.domain == "cpu":
            cpus = self.topology.cpus_of(domain, index)
            if name == "CPU_UTILIZATION":
                return self._utilization(cpus, what)
            attribute = {
                "CPU_FREQUENCY_STATUS": "scaling_cur_freq",
                "CPU_FREQUENCY_MIN_AVAIL": "cpuinfo_min_freq",
                "CPU_FREQUENCY_MAX_AVAIL": "cpuinfo_max_freq",
                "CPU_FREQUENCY_MIN_CONTROL": "scaling_min_freq",
                "CPU_FREQUENCY_MAX_CONTROL": "scaling_max_freq",
            }[name]
            return self._khz_as_hz(cpus, attribute, domain, what)
        if info.domain == "package":
            packages = self.topology.packages_of(domain, index)
            zones = self._energy_zones(packages, what)
            if name == "CPU_ENERGY":
                return lambda: sum(zone.joules(self.gen) for zone in zones)
            return self._power(zones)
        if info.domain == VM:
            assert isinstance(index, str)
            account = self._vms(name == "VM_ENERGY", what)
            account.refresh(self.begin())
            if name == "VM_VCPU_TIME":

                def vcpu_time() -> float:
                    account.refresh(self.gen)
                    return account.vcpu_time_s.get(index, math.nan)

                return vcpu_time

            def vm_energy() -> float:
                account.refresh(self.gen)
                return account.energy_j.get(index, 0.0)

            return vm_energy
        raise TelemetryError(f"{what}: no reader for this signal")  # pragma: no cover

    def _khz_as_hz(self, cpus: Sequence[int], attribute: str, domain: str, what: str) -> ReadFn:
        readers = []
        for cpu in cpus:
            try:
                readers.append(self.cpufreq_file(cpu, attribute, what))
            except TelemetryError:
                if domain == "cpu":
                    raise
                log.info("%s: cpu %d has no %s (offline?): left out", what, cpu, attribute)
        if not readers:
            raise TelemetryError(f"{what}: no CPU of this {domain} has cpufreq {attribute}")
        if len(readers) == 1:
            only = readers[0]
            return lambda: only.read_int() * 1000.0
        count = len(readers)
        return lambda: sum(r.read_int() for r in readers) * 1000.0 / count

    def _utilization(self, cpus: Sequence[int], what: str) -> ReadFn:
        if self._proc_stat is None:
            self._proc_stat = ProcStat(self.proc_root / "stat", len(self.topology.cpus))
        stat = self._proc_stat
        wanted = frozenset(cpus)
        if not wanted & set(stat.cpus(self.begin())):
            raise TelemetryError(f"{what}: {stat.path} has no line for these CPUs (offline?)")
        return _Utilization(stat, wanted, self).read

    def _power(self, zones: list[EnergyZone]) -> ReadFn:
        gen = self.begin()
        state = {"j": sum(z.joules(gen) for z in zones), "t": self.clock(), "w": math.nan}

        def read() -> float:
            now_j = sum(z.joules(self.gen) for z in zones)
            now_s = self.clock()
            if now_s > state["t"]:
                state["w"] = (now_j - state["j"]) / (now_s - state["t"])
                state["j"], state["t"] = now_j, now_s
            return state["w"]

        return read

    def refresh_counters(self) -> None:
        """Read every energy counter once (the anti-double-wrap timer calls this)."""
        if self._zones:
            gen = self.begin()
            for zone in self._zones.values():
                try:
                    zone.joules(gen)
                except SysfsError as exc:
                    log.warning("energy counter refresh failed: %s", exc)

    def has_energy(self) -> bool:
        return bool(self._zones)

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers.clear()
        self._reader_by_rel.clear()
        if self._zones:
            for zone in self._zones.values():
                zone.close()
        if self._proc_stat is not None:
            self._proc_stat.close()
        closer = getattr(self._vm_times, "close", None)
        if closer is not None:
            closer()


class _Utilization:
    """Busy share of a set of CPUs between two reads (since boot for the first)."""

    def __init__(self, stat: ProcStat, cpus: frozenset[int], sources: Sources) -> None:
        self._stat = stat
        self._cpus = cpus
        self._sources = sources
        self._busy: int | None = None
        self._total = 0
        self._last = math.nan

    def read(self) -> float:
        busy = total = 0
        for cpu, (cpu_busy, cpu_total) in self._stat.cpus(self._sources.gen).items():
            if cpu in self._cpus:
                busy += cpu_busy
                total += cpu_total
        if self._busy is None:
            value = busy / total if total > 0 else math.nan
        elif total > self._total:
            value = (busy - self._busy) / (total - self._total)
        else:
            return self._last  # no tick elapsed (USER_HZ): the previous value stands
        self._busy, self._total, self._last = busy, total, value
        return value


class Sampler:
    """Reads a session's signals, in request order; a failing signal reads NaN."""

    def __init__(self, sources: Sources, requests: Sequence[Request]) -> None:
        self._sources = sources
        self.requests = list(requests)
        self._readers = [sources.signal(r) for r in self.requests]
        self._failing: set[int] = set()

    def sample(self) -> list[float]:
        self._sources.begin()
        values: list[float] = []
        append = values.append
        for i, read in enumerate(self._readers):
            try:
                append(float(read()))
            except (VmpowerError, OSError, ValueError, ZeroDivisionError) as exc:
                append(math.nan)
                if i not in self._failing:  # once per signal, not once per sample
                    self._failing.add(i)
                    log.warning("%s reads NaN: %s", self.requests[i], exc)
                continue
            if i in self._failing:
                self._failing.discard(i)
                log.info("%s readable again", self.requests[i])
        return values


_LIMITS = {"CPU_FREQUENCY_MIN_CONTROL": "min", "CPU_FREQUENCY_MAX_CONTROL": "max"}


Limits = dict[int, tuple[int | None, int | None]]
"""A session's frequency limits: host CPU → (minimum kHz or None, maximum kHz or None)."""


class ControlApplier:
    """Turns a session's control values into its frequency limits and hands them over.

    The batch server never writes cpufreq files itself: ``send`` gives the session's
    whole set of limits to the daemon, whose one arbiter applies them as the session's
    wishes, with the same rules as every other requester, journaled once by the
    daemon's restore journal (issue #12, point 5; docs/telemetry.md, "Controls").
    Values are checked before anything is sent: a finite frequency in Hz inside
    ``cpuinfo_min_freq..cpuinfo_max_freq``, never a minimum above the session's own
    maximum. A NaN value leaves its control as it was; a refused write keeps the limits
    as they were before it.
    """

    def __init__(
        self, sources: Sources, requests: Sequence[Request], send: Callable[[Limits], None]
    ) -> None:
        self._send = send
        self.requests = list(requests)
        self._targets: list[tuple[str, tuple[int, ...]]] = []
        self._files: dict[int, dict[str, Reader]] = {}
        self.held: Limits = {}
        for request in self.requests:
            info = signal_info(request.name)
            if not info.writable or request.name not in _LIMITS:
                raise TelemetryError(f"{request}: not a control")
            if request.domain == VM:
                raise TelemetryError(f"{request}: frequency controls have no vm domain")
            cpus = sources.topology.cpus_of(request.domain, request.index)
            for cpu in cpus:
                if cpu in self._files:
                    continue
                what = str(request)
                self._files[cpu] = {
                    "hw_min": sources.cpufreq_file(cpu, "cpuinfo_min_freq", what),
                    "hw_max": sources.cpufreq_file(cpu, "cpuinfo_max_freq", what),
                }
            self._targets.append((_LIMITS[request.name], tuple(cpus)))

    def apply(self, values: Sequence[float]) -> int:
        """Hand ``values`` (Hz, in request order) over; returns how many CPUs they name."""
        if len(values) != len(self.requests):
            raise TelemetryError(f"expected {len(self.requests)} control values, got {len(values)}")
        held = dict(self.held)
        touched: set[int] = set()
        for request, (limit, cpus), value in zip(self.requests, self._targets, values, strict=True):
            if math.isnan(value):
                continue
            if not math.isfinite(value) or value <= 0:
                raise TelemetryError(f"{request}: {value!r} is not a frequency in Hz")
            khz = round(value / 1000)
            for cpu in cpus:
                files = self._files[cpu]
                try:
                    hw_min, hw_max = files["hw_min"].read_int(), files["hw_max"].read_int()
                except SysfsError as exc:
                    raise TelemetryError(f"cannot read cpu {cpu}'s range: {exc}") from None
                if not hw_min <= khz <= hw_max:
                    raise TelemetryError(
                        f"{request}: {khz * 1000} Hz is outside cpu {cpu}'s"
                        f" {hw_min * 1000}-{hw_max * 1000} Hz"
                        " (cpuinfo_min_freq-cpuinfo_max_freq)"
                    )
                lo, hi = held.get(cpu, (None, None))
                held[cpu] = (khz, hi) if limit == "min" else (lo, khz)
                touched.add(cpu)
        for cpu in sorted(touched):
            lo, hi = held[cpu]
            if lo is not None and hi is not None and lo > hi:
                raise TelemetryError(
                    f"cpu {cpu}: minimum {lo * 1000} Hz would be above maximum"
                    f" {hi * 1000} Hz (scaling_min_freq must not exceed scaling_max_freq)"
                )
        if touched:
            self._send(held)
            self.held = held
        return len(touched)

    def release(self) -> None:
        """The session's limits go (the client quit): the daemon restores what is left."""
        if self.held:
            self._send({})
            self.held = {}

    def cpus(self) -> list[int]:
        return sorted(self._files)
