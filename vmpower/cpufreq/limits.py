"""Setting a frequency through the policy limits: scaling_min_freq = scaling_max_freq.

Drivers that choose P-states themselves (intel_pstate in active mode, amd-pstate-epp)
have no ``scaling_setspeed``; the only way to ask for one frequency is to pin both
limits to it (DPDK's pstate backend does the same). The governor is left alone: with
min == max every governor lands on that frequency.

Order matters: the kernel refuses (before 5.3, EINVAL) or clamps a minimum above the
current maximum, so going up the maximum is raised first and going down the minimum
is lowered first. Precisely: the minimum goes first exactly when the new value is
below the current minimum; otherwise the maximum goes first. Either way the policy
never holds min > max between the two writes.
"""

from __future__ import annotations

from vmpower.cpufreq.backend import Backend, Report, policy_dir
from vmpower.sysfs import Sysfs


class LimitsBackend(Backend):
    """Frequency through scaling_min_freq / scaling_max_freq (both set to the value)."""

    def __init__(self, sysfs: Sysfs, driver: str, report: Report) -> None:
        super().__init__(sysfs, driver, report)
        # (min, max) as last written or read: spares a read per step on the hot path
        self._limits: dict[int, tuple[int, int]] = {}
        self._paths: dict[int, tuple[str, str]] = {}

    def read_requested(self, cpu: int) -> int | None:
        d = policy_dir(cpu)
        lo = self.read_int(f"{d}/scaling_min_freq")
        hi = self.read_int(f"{d}/scaling_max_freq")
        return hi if lo == hi else None

    def write_khz(self, cpu: int, freq_khz: int) -> None:
        limits = self._limits.get(cpu)
        if limits is None:
            d = policy_dir(cpu)
            self._paths[cpu] = (f"{d}/scaling_min_freq", f"{d}/scaling_max_freq")
            limits = (self.read_int(self._paths[cpu][0]), self.read_int(self._paths[cpu][1]))
        cur_min, cur_max = limits
        min_rel, max_rel = self._paths[cpu]
        # Until both writes are done the cached limits are unknown: a failure in
        # between leaves nothing cached, so the next call reads the files again.
        self._limits.pop(cpu, None)
        if freq_khz < cur_min:
            self.sysfs.write(min_rel, freq_khz)
            if cur_max != freq_khz:
                self.sysfs.write(max_rel, freq_khz)
        else:
            if cur_max != freq_khz:
                self.sysfs.write(max_rel, freq_khz)
            if cur_min != freq_khz:
                self.sysfs.write(min_rel, freq_khz)
        self._limits[cpu] = (freq_khz, freq_khz)

    def forget(self, cpu: int) -> None:
        self._limits.pop(cpu, None)
