"""The policy limits scaling_min_freq / scaling_max_freq: the one rule for writing them.

``write_limits`` sets both limits of one CPU in the order the kernel needs, and is used
by every writer of these files (the limits backend below, the telemetry controls).
Before 5.3 the kernel refuses (EINVAL) a minimum above the current maximum and a
maximum below the current minimum; later kernels keep both as frequency QoS requests
and clamp the minimum to the maximum (cpufreq_verify_within_limits), so a crossed pair
in between would still briefly run the CPU at a frequency nobody asked for. Hence the
order: the minimum goes first exactly when the new maximum is below the current
minimum (going down), otherwise the maximum goes first (going up, or within the
current range). Given new min <= new max and current min <= current max, the policy
never holds min > max between the two writes.

Drivers that choose P-states themselves (intel_pstate in active mode, amd-pstate-epp)
have no ``scaling_setspeed``; the only way to ask for one frequency is to pin both
limits to it (DPDK's pstate backend does the same): ``LimitsBackend``. The governor is
left alone: with min == max every governor lands on that frequency.
"""

from __future__ import annotations

from vmpower.cpufreq.backend import Backend, Report, policy_dir
from vmpower.sysfs import Sysfs

MIN_FREQ = "scaling_min_freq"
MAX_FREQ = "scaling_max_freq"


def write_limits(
    sysfs: Sysfs,
    cpu: int,
    min_khz: int,
    max_khz: int,
    current_min_khz: int,
    current_max_khz: int,
    directory: str | None = None,
) -> int:
    """Set ``cpu``'s limits to ``min_khz``..``max_khz``; returns how many files it wrote.

    ``current_*_khz`` are the limits in force now (as read from the files, or as last
    written); a limit already at its new value is not written. Writes go through
    ``sysfs`` (and its journal, when one is attached); a ``SysfsError`` from the second
    write leaves the first one done. ``directory``: the policy's directory when it is
    not ``cpuN/cpufreq`` (a policy shared by several CPUs, ``vmpower.cpufreq.topology``).
    """
    if min_khz > max_khz:
        raise ValueError(f"cpu {cpu}: minimum {min_khz} kHz above maximum {max_khz} kHz")
    d = directory or policy_dir(cpu)
    min_first = max_khz < current_min_khz
    written = 0
    if not min_first and max_khz != current_max_khz:
        sysfs.write(f"{d}/{MAX_FREQ}", max_khz)
        written += 1
    if min_khz != current_min_khz:
        sysfs.write(f"{d}/{MIN_FREQ}", min_khz)
        written += 1
    if min_first and max_khz != current_max_khz:
        sysfs.write(f"{d}/{MAX_FREQ}", max_khz)
        written += 1
    return written


class LimitsBackend(Backend):
    """Frequency through scaling_min_freq / scaling_max_freq (both set to the value)."""

    def __init__(self, sysfs: Sysfs, driver: str, report: Report) -> None:
        super().__init__(sysfs, driver, report)
        # (min, max) as last written or read: spares two reads per step on the hot path
        self._limits: dict[int, tuple[int, int]] = {}

    def read_requested(self, cpu: int) -> int | None:
        d = self.dir(cpu)
        lo = self.read_int(f"{d}/{MIN_FREQ}")
        hi = self.read_int(f"{d}/{MAX_FREQ}")
        return hi if lo == hi else None

    def write_khz(self, cpu: int, freq_khz: int) -> None:
        limits = self._limits.get(cpu)
        if limits is None:
            d = self.dir(cpu)
            limits = (self.read_int(f"{d}/{MIN_FREQ}"), self.read_int(f"{d}/{MAX_FREQ}"))
        # Until both writes are done the cached limits are unknown: a failure in
        # between leaves nothing cached, so the next call reads the files again.
        self._limits.pop(cpu, None)
        write_limits(self.sysfs, cpu, freq_khz, freq_khz, limits[0], limits[1], self.dir(cpu))
        self._limits[cpu] = (freq_khz, freq_khz)

    def forget(self, cpu: int) -> None:
        self._limits.pop(cpu, None)
