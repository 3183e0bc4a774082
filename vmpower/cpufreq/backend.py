"""What every cpufreq backend provides, and the helpers they share.

A backend knows one scaling driver's files, per policy (the ``cpu`` it is given is a
policy's number, ``vmpower.cpufreq.topology``; ``dir(cpu)`` is where its files are):
how to build a CPU's frequency table and turbo facts (``probe``), which switch turns
its turbo range on, how to read what is requested now, and how to write a new
frequency. It keeps the little per-CPU state
the writes need (whether the governor is already ours, the limits last written);
``forget`` drops it when the journal has put the original files back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vmpower.cpufreq.model import CpuInfo
from vmpower.errors import SysfsError, UnsupportedError
from vmpower.sysfs import Sysfs

CPU_DIR = "devices/system/cpu"
BOOST = f"{CPU_DIR}/cpufreq/boost"  # the cpufreq core's global boost switch

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
        # cpu → the directory of its policy (``CpuFreq`` hands in its topology's)
        self.dir: Callable[[int], str] = policy_dir

    # -- facts ---------------------------------------------------------------------

    def probe(self, cpu: int, priority: bool) -> CpuInfo:
        """Read the static files of an online CPU into a CpuInfo."""
        raise NotImplementedError

    def prepare(self, cpu: int) -> None:
        """Open ahead the files a first write of ``cpu`` uses, writing nothing
        (``Sysfs.keep_open``): called once the CPU is probed, which the daemon does for
        every CPU while it warms up, so a CPU's first request opens nothing."""

    def priority_values(self, cpus: Iterable[int]) -> dict[int, int]:
        """Per-CPU figure that is higher on priority cores (empty: no such notion)."""
        return {}

    def turbo_switches(self, cpu: int) -> tuple[str, ...]:
        """Relative paths of the files that must all be on for ``cpu``'s turbo range, in
        the order they are switched on (empty: nothing switches it off)."""
        return ()

    def switch_is_global(self, rel: str) -> bool:
        """Whether switching ``rel`` on affects every CPU."""
        return True

    def switch_follows_writes(self, cpu: int) -> bool:
        """True when ``write_khz`` itself switches ``cpu``'s turbo (per-policy boost on
        acpi-cpufreq whose boost range lies above the table): the facade re-reads it."""
        return False

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

    def boost_switches(self, cpu: int) -> tuple[str, ...]:
        """The cpufreq core's boost switches for ``cpu``: the global ``cpufreq/boost``
        and, on kernels that have it, the policy's own ``boost``. cpufreq.c: a policy
        boosts only while both are on; the policy's file refuses a write (EINVAL) while
        the global one is off, and switching the global one sets every policy's."""
        return tuple(rel for rel in (BOOST, f"{self.dir(cpu)}/boost") if self.sysfs.exists(rel))
