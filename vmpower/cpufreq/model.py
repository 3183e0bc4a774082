"""Value types of the cpufreq facade: capabilities, per-CPU state and static facts.

Also the frequency-table arithmetic every backend shares (tables are kHz, high→low,
turbo entries first). Stepping through a table (up, down, min, max, medium) is not
here: the request path (``vmpower.power``) owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

STEP_KHZ = 100_000  # the 100 MHz bus clock: P-state granularity on intel_pstate and CPPC


@dataclass(frozen=True)
class Capabilities:
    """What the guest protocol's CAPS_LIST reports for one host CPU."""

    turbo: bool  # the CPU has a turbo (boost) range
    priority: bool  # the CPU can run faster than the others (a priority / preferred core)


@dataclass(frozen=True)
class CpuState:
    """One CPU as the kernel shows it now (read from sysfs, not from caches)."""

    cpu: int
    driver: str  # the system's scaling driver ("" when there is none)
    governor: str | None
    online: bool
    cur_khz: int | None  # scaling_cur_freq (hardware's view)
    target_khz: int | None  # what is requested now: setspeed under userspace, or max when min==max
    min_khz: int | None
    max_khz: int | None
    turbo_enabled: bool | None  # None: the CPU has no turbo range
    epp: str | None


@dataclass(frozen=True)
class CpuInfo:
    """Static facts about one CPU, read once: the kernel does not change them while it runs."""

    cpu: int
    driver: str
    table_khz: tuple[int, ...]  # high → low; entries above nominal_khz are the turbo range
    ascending_khz: tuple[int, ...]  # the same, low → high, for bisection
    nominal_khz: int  # highest non-turbo frequency (the cap while turbo is off)
    has_turbo: bool
    priority: bool
    continuous: bool  # any kHz between the bounds is settable (not only table entries)
    # why the turbo range is unknown or the nominal frequency is a fallback ("": known)
    note: str = ""

    @property
    def min_khz(self) -> int:
        return self.table_khz[-1]

    @property
    def max_khz(self) -> int:
        return self.table_khz[0]


def make_info(
    cpu: int,
    driver: str,
    table: list[int] | tuple[int, ...],
    nominal_khz: int,
    *,
    priority: bool,
    continuous: bool,
    note: str = "",
) -> CpuInfo:
    """A CpuInfo from a table in any order (duplicates dropped)."""
    desc = tuple(sorted(set(table), reverse=True))
    if not desc or desc[-1] <= 0:
        raise ValueError(f"cpu {cpu}: empty or non-positive frequency table {table!r}")
    nominal = min(max(nominal_khz, desc[-1]), desc[0])  # firmware figures can be off-range
    return CpuInfo(
        cpu=cpu,
        driver=driver,
        table_khz=desc,
        ascending_khz=tuple(reversed(desc)),
        nominal_khz=nominal,
        has_turbo=desc[0] > nominal,
        priority=priority,
        continuous=continuous,
        note=note,
    )


def stepped_table(
    low_khz: int, nominal_khz: int, turbo_khz: int | None = None, step_khz: int = STEP_KHZ
) -> list[int]:
    """nominal, nominal-step, … down to low (always included); the turbo entry first."""
    table = [*range(nominal_khz, low_khz, -step_khz), low_khz]
    if turbo_khz is not None and turbo_khz > nominal_khz:
        table.insert(0, turbo_khz)
    return table


def full_range_table(low_khz: int, nominal_khz: int, high_khz: int) -> list[int]:
    """high down to low in 100 MHz steps, nominal and low always included."""
    table = [*range(high_khz, low_khz, -STEP_KHZ), low_khz]
    if low_khz <= nominal_khz <= high_khz:
        table.append(nominal_khz)
    return table
