"""intel_pstate (active mode; ``intel_cpufreq`` is its passive mode): limits backend.

intel_pstate exposes no frequency table (intel_pstate.rst: "it would not be practical
… to supply the CPUFreq core with a table"); the P-state grid is the 100 MHz bus clock,
so the table is the turbo ceiling down to cpuinfo_min_freq in 100 MHz steps. The
system-wide switch is ``intel_pstate/no_turbo`` (1 = turbo not allowed); the driver has
no ``boost`` attribute.

Where the facts come from (checked against hosts recorded by intel/pepc,
tests/data/real-hosts/):

* **the turbo ceiling** is ``cpuinfo_max_freq`` — except that since the 2024 rework of
  ``store_no_turbo()`` (intel_pstate_update_max_freq) the kernel shows the non-turbo
  maximum there while ``no_turbo=1``, so a host booted that way seems to have no turbo.
  ``intel_pstate/num_pstates`` (turbo P-state - min P-state + 1, non-hybrid parts only)
  gives the ceiling whatever no_turbo says: (min P-state + num_pstates - 1) * 100 MHz.
* **the highest non-turbo frequency**: with HWP, ``base_frequency`` ("any frequency above
  this will be in the turbo frequency range"); without HWP (passive mode on older
  parts) there is none, and it comes from ``intel_pstate/turbo_pct``, which
  show_turbo_pct() computes in 8-bit fixed point from the same P-states, inverted here.
  On hybrid parts the LP E-cores report ``base_frequency`` = ``cpuinfo_min_freq``
  (Meteor Lake: 400 MHz): not a usable base — capping there would pin them at the
  minimum; ``acpi_cppc/nominal_freq`` (MHz) is used when it lies in the range, else the
  whole range counts as non-turbo. ``CpuInfo.note`` says which CPUs had no usable base.

Priority cores (Intel SST-BF): some cores get a higher base frequency than the others;
DPDK's pstate backend marks a core whose base frequency exceeds the package's
non-turbo maximum as high priority. Without the MSR, vmpower compares
``base_frequency`` across CPUs.
"""

from __future__ import annotations

from collections.abc import Iterable

from vmpower.cpufreq.backend import CPU_DIR
from vmpower.cpufreq.limits import LimitsBackend
from vmpower.cpufreq.model import STEP_KHZ, CpuInfo, full_range_table, make_info

NO_TURBO = f"{CPU_DIR}/intel_pstate/no_turbo"
NUM_PSTATES = f"{CPU_DIR}/intel_pstate/num_pstates"
TURBO_PCT = f"{CPU_DIR}/intel_pstate/turbo_pct"
FRAC_BITS = 8  # intel_pstate.c's fixed point


def turbo_pct(min_pstate: int, max_pstate: int, turbo_pstate: int) -> int:
    """What intel_pstate.c's show_turbo_pct() prints for these P-states."""
    total = turbo_pstate - min_pstate + 1
    no_turbo = max_pstate - min_pstate + 1
    turbo_fp = (no_turbo << FRAC_BITS) // total
    return 100 - ((turbo_fp * (100 << FRAC_BITS)) >> FRAC_BITS >> FRAC_BITS)


def max_pstate_from(min_pstate: int, num_pstates: int, pct: int) -> int | None:
    """The highest non-turbo P-state that makes show_turbo_pct() print ``pct`` (the
    highest of several candidates: never cap lower than the facts allow)."""
    turbo_pstate = min_pstate + num_pstates - 1
    found = [
        p
        for p in range(min_pstate, turbo_pstate + 1)
        if turbo_pct(min_pstate, p, turbo_pstate) == pct
    ]
    return max(found) if found else None


class IntelPstateBackend(LimitsBackend):
    switch_inverted = True

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        d = self.dir(cpu)
        low = self.read_int(f"{d}/cpuinfo_min_freq")
        high = self.read_int(f"{d}/cpuinfo_max_freq")
        base = self.read_opt_int(f"{d}/base_frequency")
        num_pstates = self.read_opt_int(NUM_PSTATES)
        min_pstate = round(low / STEP_KHZ)
        if num_pstates:
            # no_turbo=1 hides the ceiling from cpuinfo_max_freq on kernels >= 6.10
            high = max(high, (min_pstate + num_pstates - 1) * STEP_KHZ)
        note = ""
        if base is not None and low < base <= high:
            nominal = base
        else:
            nominal, note = self._fallback_nominal(cpu, low, high, base, num_pstates, min_pstate)
        table = full_range_table(low, nominal, high)
        return make_info(
            cpu, self.driver, table, nominal, priority=priority, continuous=True, note=note
        )

    def _fallback_nominal(
        self,
        cpu: int,
        low: int,
        high: int,
        base: int | None,
        num_pstates: int | None,
        min_pstate: int,
    ) -> tuple[int, str]:
        """(highest non-turbo kHz, note) when base_frequency is missing or unusable."""
        pct = self.read_opt_int(TURBO_PCT)
        if base is None and num_pstates and pct is not None:
            max_pstate = max_pstate_from(min_pstate, num_pstates, pct)
            if max_pstate is not None and low <= max_pstate * STEP_KHZ <= high:
                return max_pstate * STEP_KHZ, ""
        if base is None:
            why = "no base_frequency (HWP off?) and no usable turbo_pct/num_pstates"
        else:
            why = f"base_frequency {base} kHz is outside {low + 1}-{high} kHz"
        nominal_mhz = self.read_opt_int(f"{CPU_DIR}/cpu{cpu}/acpi_cppc/nominal_freq")
        if nominal_mhz and low < nominal_mhz * 1000 <= high:
            note = f"no usable base: {why}; non-turbo maximum from acpi_cppc/nominal_freq"
            nominal = nominal_mhz * 1000
        else:
            note = f"no usable base: {why}; turbo range unknown, whole range non-turbo"
            nominal = high
        self.report(
            f"base_frequency:{self.driver}",
            f"{self.driver}: some CPUs have no usable base frequency (first: cpu {cpu}: {why});"
            " their turbo range is taken from acpi_cppc or treated as non-turbo (show_cpus"
            " names them)",
        )
        return nominal, note

    def priority_values(self, cpus: Iterable[int]) -> dict[int, int]:
        values = {}
        for cpu in cpus:
            d = self.dir(cpu)
            base = self.read_opt_int(f"{d}/base_frequency")
            low = self.read_opt_int(f"{d}/cpuinfo_min_freq")
            if base is not None and (low is None or base > low):
                values[cpu] = base
        return values

    def turbo_switches(self, cpu: int) -> tuple[str, ...]:
        return (NO_TURBO,) if self.sysfs.exists(NO_TURBO) else ()
