"""cppc_cpufreq (ACPI CPPC, arm64 servers and others): limits backend.

CPPC describes performance on an abstract scale in ``cpuN/acpi_cppc/``
(cppc_sysfs.rst): ``highest_perf`` (may be a boost level), ``nominal_perf`` (highest
sustained), ``lowest_perf``; ``nominal_freq`` and ``lowest_freq`` give the matching
frequencies **in MHz**, not kHz. The CPU has turbo when highest_perf > nominal_perf
(DPDK's cppc backend uses the same test). The table is the turbo entry, then the
nominal frequency down to cpuinfo_min_freq in 100 MHz steps (DPDK's layout).

Priority cores: on platforms whose cores differ, ``highest_perf`` is higher on the
cores that can run faster.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmpower.cpufreq.backend import BOOST, CPU_DIR
from vmpower.cpufreq.limits import LimitsBackend
from vmpower.cpufreq.model import CpuInfo, make_info, stepped_table

KHZ_PER_MHZ = 1000


def cppc_dir(cpu: int) -> str:
    return f"{CPU_DIR}/cpu{cpu}/acpi_cppc"


class CppcBackend(LimitsBackend):
    """cppc_cpufreq; amd-pstate extends it with its own files."""

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        d = self.dir(cpu)
        low = self.read_int(f"{d}/cpuinfo_min_freq")
        high = self.read_int(f"{d}/cpuinfo_max_freq")
        nominal, turbo_khz = self._nominal_and_turbo(cpu, high)
        table = stepped_table(low, nominal, turbo_khz)
        return make_info(cpu, self.driver, table, nominal, priority=priority, continuous=True)

    def _nominal_and_turbo(self, cpu: int, cpuinfo_max: int) -> tuple[int, int | None]:
        c = cppc_dir(cpu)
        highest = self.read_opt_int(f"{c}/highest_perf")
        nominal_perf = self.read_opt_int(f"{c}/nominal_perf")
        nominal_mhz = self.read_opt_int(f"{c}/nominal_freq")
        if not highest or not nominal_perf or not nominal_mhz:
            self.report(
                f"acpi_cppc:{self.driver}",
                f"{self.driver}: acpi_cppc/ lacks highest_perf, nominal_perf or nominal_freq:"
                " turbo range unknown; the whole range is treated as non-turbo",
            )
            return cpuinfo_max, None
        nominal = nominal_mhz * KHZ_PER_MHZ
        if highest <= nominal_perf:
            return min(nominal, cpuinfo_max), None
        return nominal, self._turbo_khz(cpu, cpuinfo_max, nominal, highest, nominal_perf)

    def _turbo_khz(
        self, cpu: int, cpuinfo_max: int, nominal: int, highest: int, nominal_perf: int
    ) -> int:
        if cpuinfo_max > nominal:
            return cpuinfo_max
        # boost off at start: cpuinfo_max_freq stops at nominal; the perf scale is linear
        return round(nominal * highest / nominal_perf / KHZ_PER_MHZ) * KHZ_PER_MHZ

    def priority_values(self, cpus: Iterable[int]) -> dict[int, int]:
        values = {}
        for cpu in cpus:
            perf = self.read_opt_int(f"{cppc_dir(cpu)}/highest_perf")
            if perf is not None:
                values[cpu] = perf
        return values

    def turbo_switches(self, cpu: int) -> tuple[str, ...]:
        # the global cpufreq/boost and the policy's own boost (cpufreq.c)
        return self.boost_switches(cpu)

    def switch_is_global(self, rel: str) -> bool:
        return rel == BOOST
