"""Value types of the cpufreq facade: operations, capabilities, per-CPU state and facts.

Also the frequency-table arithmetic every backend shares (tables are kHz, high→low,
turbo entries first) and the pure stepping rule behind ``CpuFreq.target_khz``.
"""

from __future__ import annotations

import bisect
import enum
from dataclasses import dataclass

STEP_KHZ = 100_000  # the 100 MHz bus clock: P-state granularity on intel_pstate and CPPC


class FreqOp(enum.Enum):
    """A frequency move, as the guest protocol and the policies ask for it."""

    UP = "up"
    DOWN = "down"
    MIN = "min"
    MAX = "max"
    MEDIUM = "medium"


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


def step(info: CpuInfo, cap_khz: int, op: FreqOp, from_khz: int) -> int:
    """Where ``op`` lands from ``from_khz`` on this CPU's table, never above ``cap_khz``.

    UP is the next entry above ``from_khz`` and DOWN the next below (a value between
    two entries moves to its neighbour in that direction); MIN is the lowest entry,
    MAX the cap (the turbo entry only while turbo is enabled), MEDIUM the middle of the
    table (DPDK's ``num_freqs / 2`` index, turbo entry included).
    """
    table = info.table_khz
    asc = info.ascending_khz
    if op is FreqOp.MAX:
        result = cap_khz
    elif op is FreqOp.MIN:
        result = table[-1]
    elif op is FreqOp.MEDIUM:
        result = table[len(table) // 2]
    elif op is FreqOp.UP:
        i = bisect.bisect_right(asc, from_khz)
        result = asc[i] if i < len(asc) else asc[-1]
    else:  # DOWN
        i = bisect.bisect_left(asc, from_khz)
        result = asc[i - 1] if i > 0 else asc[0]
    return min(result, cap_khz)
