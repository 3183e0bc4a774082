"""amd-pstate (passive/guided) and amd-pstate-epp (active): limits backend.

amd-pstate is CPPC-based (amd-pstate.rst): the nominal frequency comes from
``cpuN/acpi_cppc/nominal_freq`` (MHz), the CPU has turbo when ``highest_perf`` >
``nominal_perf``, and ``amd_pstate_max_freq`` is the boost maximum even while boost is
off (when ``cpuinfo_max_freq`` drops to nominal). Turbo needs the global
``devices/system/cpu/cpufreq/boost`` and, on kernels that have it, the policy's
``cpuN/cpufreq/boost`` on (see ``Backend.boost_switches``); switching boost sets the
policy's ``scaling_max_freq`` to the new ``cpuinfo_max_freq`` (amd_pstate_cpu_boost_update),
so a limit written before it does not survive it.

Priority cores ("amd-pstate Preferred Core"): the platform ranks cores; the ranking is
``amd_pstate_prefcore_ranking`` (kernels ≥ 6.9) and is folded into
``acpi_cppc/highest_perf`` on older ones. It counts only while
``amd_pstate/prefcore`` is "enabled".
"""

from __future__ import annotations

from collections.abc import Iterable

from vmpower.cpufreq.backend import CPU_DIR
from vmpower.cpufreq.cppc import CppcBackend, cppc_dir

PREFCORE = f"{CPU_DIR}/amd_pstate/prefcore"


class AmdPstateBackend(CppcBackend):
    def _turbo_khz(
        self, cpu: int, cpuinfo_max: int, nominal: int, highest: int, nominal_perf: int
    ) -> int:
        boost_max = self.read_opt_int(f"{self.dir(cpu)}/amd_pstate_max_freq")
        if boost_max is not None and boost_max > nominal:
            return boost_max
        return super()._turbo_khz(cpu, cpuinfo_max, nominal, highest, nominal_perf)

    def priority_values(self, cpus: Iterable[int]) -> dict[int, int]:
        if self.sysfs.exists(PREFCORE) and self.sysfs.read(PREFCORE) != "enabled":
            return {}
        values = {}
        for cpu in cpus:
            rank = self.read_opt_int(f"{self.dir(cpu)}/amd_pstate_prefcore_ranking")
            if rank is None:
                rank = self.read_opt_int(f"{cppc_dir(cpu)}/highest_perf")
            if rank is not None:
                values[cpu] = rank
        return values
