"""What every cpufreq backend provides, and the helpers they share.

A backend knows one scaling driver's files: how to build a CPU's frequency table and
turbo facts (``probe``), which switch turns its turbo range on, how to read what is
requested now, and how to write a new frequency. It keeps the little per-CPU state
the writes need (whether the governor is already ours, the limits last written);
``forget`` drops it when the journal has put the original files back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmpower.cpufreq.model import CpuInfo
from vmpower.errors import SysfsError, UnsupportedError
from vmpower.sysfs import Sysfs

CPU_DIR = "devices/system/cpu"

# report(key, reason) logs ``reason`` once per key and returns the error to raise
Report = Callable[[str, str], UnsupportedError]


def policy_dir(cpu: int) -> str:
    """``cpuN/cpufreq``: a link to the CPU's policy directory while the CPU is online."""
    return f"{CPU_DIR}/cpu{cpu}/cpufreq"


class Backend:
    """Base of the per-driver backends."""

    # the switch whose "1" allows the turbo range (or "0", when ``switch_inverted``)
    switch_inverted = False

    def __init__(self, sysfs: Sysfs, driver: str, report: Report) -> None:
        self.sysfs = sysfs
        self.driver = driver
        self.report = report

    # -- facts ---------------------------------------------------------------------

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        """Read the static files of an online CPU into a CpuInfo."""
        raise NotImplementedError

    def priority_values(self, cpus: Iterable[int]) -> dict[int, int]:
        """Per-CPU figure that is higher on priority cores (empty: no such notion)."""
        return {}

    def turbo_switch(self, cpu: int) -> str | None:
        """Relative path of the file that allows turbo for ``cpu`` (None: there is none)."""
        return None

    def switch_is_global(self, cpu: int) -> bool:
        return True

    # -- requests ------------------------------------------------------------------

    def read_requested(self, cpu: int) -> int | None:
        """The frequency pinned now by the files, or None when nothing is pinned."""
        raise NotImplementedError

    def write_khz(self, cpu: int, freq_khz: int) -> None:
        """Make ``freq_khz`` the CPU's frequency (already validated)."""
        raise NotImplementedError

    def forget(self, cpu: int) -> None:
        """The CPU's files were put back (or it went offline): drop per-CPU state."""

    # -- shared readers ------------------------------------------------------------

    def read_int(self, rel: str) -> int:
        return self.sysfs.read_int(rel)

    def read_opt_int(self, rel: str) -> int | None:
        try:
            return self.sysfs.read_int(rel)
        except SysfsError:
            return None
