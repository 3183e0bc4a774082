"""acpi-cpufreq (and other drivers with a frequency table): userspace governor + setspeed.

The driver lists its P-states in ``scaling_available_frequencies``. A frequency is
chosen by switching the policy to the ``userspace`` governor (on first control; the
journal records the original governor) and writing ``scaling_setspeed``, which the
kernel accepts only under that governor (cpufreq.rst, "userspace").

Turbo: by the ACPI ``_PSS`` convention the whole turbo range is a single entry 1 MHz
(1000 kHz) above the highest non-turbo P-state (intel_pstate.rst, "intel_pstate vs
acpi-cpufreq"), so the CPU has turbo when the first two entries differ by exactly
1000 kHz. The system-wide switch is ``devices/system/cpu/cpufreq/boost``.
"""

from __future__ import annotations

from vmpower.cpufreq.backend import CPU_DIR, Backend, Report, policy_dir
from vmpower.cpufreq.model import CpuInfo, make_info
from vmpower.errors import SysfsError
from vmpower.sysfs import Sysfs

PSS_TURBO_DELTA_KHZ = 1000
BOOST = f"{CPU_DIR}/cpufreq/boost"


class SetspeedBackend(Backend):
    """Frequency through ``scaling_setspeed`` under the userspace governor."""

    def __init__(self, sysfs: Sysfs, driver: str, report: Report) -> None:
        super().__init__(sysfs, driver, report)
        self._userspace: set[int] = set()  # CPUs whose governor we set (or found) userspace
        self._setspeed: dict[int, str] = {}

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        rel = f"{policy_dir(cpu)}/scaling_available_frequencies"
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
        turbo = (
            self.driver == "acpi-cpufreq"
            and len(table) >= 2
            and table[0] - table[1] == PSS_TURBO_DELTA_KHZ
        )
        nominal = table[1] if turbo else table[0]
        return make_info(cpu, self.driver, table, nominal, priority=priority, continuous=False)

    def turbo_switch(self, cpu: int) -> str | None:
        return BOOST if self.sysfs.exists(BOOST) else None

    def read_requested(self, cpu: int) -> int | None:
        d = policy_dir(cpu)
        if self.sysfs.read(f"{d}/scaling_governor") != "userspace":
            return None
        text = self.sysfs.read(f"{d}/scaling_setspeed")
        return int(text) if text.isdigit() else None

    def write_khz(self, cpu: int, freq_khz: int) -> None:
        if cpu not in self._userspace:
            self._take_governor(cpu)
        self.sysfs.write(self._setspeed[cpu], freq_khz)

    def forget(self, cpu: int) -> None:
        self._userspace.discard(cpu)

    def _take_governor(self, cpu: int) -> None:
        d = policy_dir(cpu)
        governor = self.sysfs.read(f"{d}/scaling_governor")
        if governor != "userspace":
            available = self.sysfs.read(f"{d}/scaling_available_governors").split()
            if "userspace" not in available:
                raise self.report(
                    f"userspace:{self.driver}",
                    f"{self.driver}: the userspace governor is not available (kernel built"
                    f" without CONFIG_CPU_FREQ_GOV_USERSPACE?): governors are"
                    f" {' '.join(available)}",
                )
            self.sysfs.write(f"{d}/scaling_governor", "userspace")
            # Read back: a governor module that fails to start leaves the old one.
            now = self.sysfs.read(f"{d}/scaling_governor")
            if now != "userspace":
                raise SysfsError(
                    self.sysfs.path(f"{d}/scaling_governor"),
                    f"wrote 'userspace', the kernel kept {now!r}",
                )
        self._setspeed[cpu] = f"{d}/scaling_setspeed"
        self._userspace.add(cpu)
