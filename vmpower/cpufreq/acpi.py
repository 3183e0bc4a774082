"""acpi-cpufreq (and other drivers with a frequency table): userspace governor + setspeed.

The driver lists its P-states in ``scaling_available_frequencies``. A frequency is
chosen by switching the policy to the ``userspace`` governor (on first control; the
journal records the original governor) and writing ``scaling_setspeed``, which the
kernel accepts only under that governor (cpufreq.rst, "userspace").

Turbo comes in two shapes (both seen on hosts recorded by intel/pepc,
tests/data/real-hosts/):

* Intel: by the ACPI ``_PSS`` convention the whole turbo range is a single entry 1 MHz
  (1000 kHz) above the highest non-turbo P-state (intel_pstate.rst, "intel_pstate vs
  acpi-cpufreq"), so the CPU has turbo when the first two entries differ by exactly
  1000 kHz; asking the entry below it caps the CPU at the non-turbo maximum.
* AMD (EPYC): the table stops at the nominal P0, and ``cpuinfo_max_freq`` lies above it
  (acpi-cpufreq.c, get_max_boost_ratio(): the CPPC highest/nominal ratio). The boost
  range is reached from P0 while boost is on, so the only cap is the boost switch
  itself: the table gets a virtual top entry = ``cpuinfo_max_freq``; asking it writes
  P0 with the policy's ``boost`` on, and asking P0 or lower switches the policy's
  ``boost`` off. Without a per-policy ``boost`` (kernels before it) the CPU cannot be
  capped without the system-wide switch, which vmpower never turns off: it says so.

The switches are the cpufreq core's ``cpufreq/boost`` and, where present, the policy's
own ``boost`` (cpufreq.c): turbo is usable while both are on.
"""

from __future__ import annotations

from vmpower.cpufreq.backend import BOOST, Backend, Report
from vmpower.cpufreq.model import CpuInfo, make_info
from vmpower.errors import SysfsError
from vmpower.sysfs import Sysfs

PSS_TURBO_DELTA_KHZ = 1000

__all__ = ["BOOST", "PSS_TURBO_DELTA_KHZ", "SetspeedBackend"]


class SetspeedBackend(Backend):
    """Frequency through ``scaling_setspeed`` under the userspace governor."""

    def __init__(self, sysfs: Sysfs, driver: str, report: Report) -> None:
        super().__init__(sysfs, driver, report)
        self._userspace: set[int] = set()  # CPUs whose governor we set (or found) userspace
        self._setspeed: dict[int, str] = {}
        # CPUs whose boost range lies above the table: cpu -> P0 (the nominal kHz)
        self._p0: dict[int, int] = {}
        # cpu -> scaling_available_governors as probe read it: the take-over (a CPU's
        # first request) then reads only the governor. A list without "userspace" is
        # read again before refusing (the module may have been loaded since).
        self._governors: dict[int, tuple[str, ...]] = {}

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        d = self.dir(cpu)
        rel = f"{d}/scaling_available_frequencies"
        try:
            text = self.sysfs.read(rel)
        except SysfsError as exc:
            raise self.report(
                f"table:{self.driver}",
                f"{self.driver} lists no scaling_available_frequencies: frequencies cannot"
                f" be set ({exc.reason})",
            ) from None
        try:
            table = sorted({int(v) for v in text.split()}, reverse=True)
        except ValueError:
            raise SysfsError(self.sysfs.path(rel), f"not a list of kHz: {text!r}") from None
        if not table:
            raise SysfsError(self.sysfs.path(rel), "empty frequency table")
        self._p0.pop(cpu, None)
        try:
            self._governors[cpu] = tuple(
                self.sysfs.read(f"{d}/scaling_available_governors").split()
            )
        except SysfsError:
            self._governors.pop(cpu, None)  # the take-over reads it, and says why
        if self.driver != "acpi-cpufreq":
            return make_info(cpu, self.driver, table, table[0], priority=priority, continuous=False)
        if len(table) >= 2 and table[0] - table[1] == PSS_TURBO_DELTA_KHZ:
            return make_info(cpu, self.driver, table, table[1], priority=priority, continuous=False)
        top = self.read_opt_int(f"{d}/cpuinfo_max_freq")
        if top is not None and top > table[0] and self.boost_switches(cpu):
            self._p0[cpu] = table[0]
            if f"{d}/boost" not in self.boost_switches(cpu):
                self.report(
                    f"boost-cap:{self.driver}",
                    f"{self.driver}: boost above P0 ({table[0]} kHz) and no per-policy boost"
                    " on this kernel: CPUs keep boosting at P0 while cpufreq/boost is on",
                )
            return make_info(
                cpu, self.driver, [top, *table], table[0], priority=priority, continuous=False
            )
        return make_info(cpu, self.driver, table, table[0], priority=priority, continuous=False)

    def prepare(self, cpu: int) -> None:
        # The take-over writes the governor, then every request scaling_setspeed.
        d = self.dir(cpu)
        self.sysfs.keep_open(f"{d}/scaling_governor")
        self.sysfs.keep_open(f"{d}/scaling_setspeed")

    def turbo_switches(self, cpu: int) -> tuple[str, ...]:
        return self.boost_switches(cpu)

    def switch_is_global(self, rel: str) -> bool:
        return rel == BOOST

    def switch_follows_writes(self, cpu: int) -> bool:
        return cpu in self._p0

    def read_requested(self, cpu: int) -> int | None:
        d = self.dir(cpu)
        # Through the fds prepare() kept open, where it did: one pread each (first
        # contact asks this of every CPU a requester is new to).
        if self.sysfs.read_kept(f"{d}/scaling_governor") != "userspace":
            return None
        text = self.sysfs.read_kept(f"{d}/scaling_setspeed")
        if not text.isdigit():
            return None
        khz = int(text)
        p0 = self._p0.get(cpu)
        if p0 is not None and khz >= p0 and self._policy_boost(cpu) != "0":
            return self.read_int(f"{d}/cpuinfo_max_freq")  # boosting from P0
        return khz

    def write_khz(self, cpu: int, freq_khz: int) -> None:
        if cpu not in self._userspace:
            self._take_governor(cpu)
        p0 = self._p0.get(cpu)
        if p0 is None:
            self.sysfs.write(self._setspeed[cpu], freq_khz)
            return
        # Boost above P0: the turbo entry is P0 with the policy's boost on (the facade
        # switched the global one on first); P0 or lower caps by switching the
        # policy's boost off. Never the global switch.
        boost = self._policy_boost(cpu)
        want = "1" if freq_khz > p0 else "0"
        if boost is not None and boost != want:
            self.sysfs.write(f"{self.dir(cpu)}/boost", want)
        self.sysfs.write(self._setspeed[cpu], min(freq_khz, p0))

    def forget(self, cpu: int) -> None:
        self._userspace.discard(cpu)

    def _policy_boost(self, cpu: int) -> str | None:
        try:
            return self.sysfs.read_kept(f"{self.dir(cpu)}/boost")  # kept once written
        except SysfsError:
            return None

    def _take_governor(self, cpu: int) -> None:
        d = self.dir(cpu)
        # Both reads through the fd kept for the governor's writes (prepare): one pread
        # each. This one is also what the change puts back, and the journal's original.
        governor = self.sysfs.read_kept(f"{d}/scaling_governor")
        if governor != "userspace":
            available = self._governors.get(cpu, ())
            if "userspace" not in available:
                available = self._governors[cpu] = tuple(
                    self.sysfs.read(f"{d}/scaling_available_governors").split()
                )
            if "userspace" not in available:
                raise self.report(
                    f"userspace:{self.driver}",
                    f"{self.driver}: the userspace governor is not available (kernel built"
                    f" without CONFIG_CPU_FREQ_GOV_USERSPACE?): governors are"
                    f" {' '.join(available)}",
                )
            # scaling_setspeed's original is what the kernel shows under the governor
            # found (<unsupported>), not the frequency it shows once userspace runs:
            # restored newest first, a frequency would be refused (EINVAL) by a CPU
            # whose governor was put back meanwhile.
            self.sysfs.journal_now(f"{d}/scaling_setspeed")
            self.sysfs.write(f"{d}/scaling_governor", "userspace")
            # Read back: a governor module that fails to start leaves the old one.
            now = self.sysfs.read_kept(f"{d}/scaling_governor")
            if now != "userspace":
                raise SysfsError(
                    self.sysfs.path(f"{d}/scaling_governor"),
                    f"wrote 'userspace', the kernel kept {now!r}",
                )
        self._setspeed[cpu] = f"{d}/scaling_setspeed"
        self._userspace.add(cpu)
