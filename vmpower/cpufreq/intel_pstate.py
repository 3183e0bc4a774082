"""intel_pstate (active mode; ``intel_cpufreq`` is its passive mode): limits backend.

intel_pstate exposes no frequency table (intel_pstate.rst: "it would not be practical
… to supply the CPUFreq core with a table"); the P-state grid is the 100 MHz bus clock,
so the table is cpuinfo_max_freq down to cpuinfo_min_freq in 100 MHz steps. With HWP
``base_frequency`` is the highest non-turbo frequency: "any frequency above this will
be in the turbo frequency range". The system-wide switch is ``intel_pstate/no_turbo``
(1 = turbo not allowed); the driver has no ``boost`` attribute.

Priority cores (Intel SST-BF): some cores get a higher base frequency than the others;
DPDK's pstate backend marks a core whose base frequency exceeds the package's
non-turbo maximum as high priority. Without the MSR, vmpower compares
``base_frequency`` across CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmpower.cpufreq.backend import CPU_DIR, policy_dir
from vmpower.cpufreq.limits import LimitsBackend
from vmpower.cpufreq.model import CpuInfo, full_range_table, make_info

NO_TURBO = f"{CPU_DIR}/intel_pstate/no_turbo"


class IntelPstateBackend(LimitsBackend):
    switch_inverted = True

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        d = policy_dir(cpu)
        low = self.read_int(f"{d}/cpuinfo_min_freq")
        high = self.read_int(f"{d}/cpuinfo_max_freq")
        base = self.read_opt_int(f"{d}/base_frequency")
        if base is None or not low <= base <= high:
            # No HWP (or the kernel bug DPDK works around: base above the turbo
            # maximum): the turbo threshold is unknown, so the whole range counts as
            # non-turbo and no CPU is a priority core.
            self.report(
                f"base_frequency:{self.driver}",
                f"{self.driver}: no usable base_frequency (HWP off?): turbo range and"
                " priority cores unknown; the whole range is treated as non-turbo",
            )
            base = high
        table = full_range_table(low, base, high)
        return make_info(cpu, self.driver, table, base, priority=priority, continuous=True)

    def priority_values(self, cpus: Iterable[int]) -> dict[int, int]:
        values = {}
        for cpu in cpus:
            base = self.read_opt_int(f"{policy_dir(cpu)}/base_frequency")
            if base is not None:
                values[cpu] = base
        return values

    def turbo_switch(self, cpu: int) -> str | None:
        return NO_TURBO if self.sysfs.exists(NO_TURBO) else None
