"""Finding the CPUs, the scaling driver and its backend, and the priority cores.

The cpufreq core registers one scaling driver for the whole system, so the driver is
read once from the first online CPU that has a policy. Priority cores are the CPUs
whose driver-specific figure (base frequency, preferred-core ranking, CPPC highest
performance) stands in the upper half of the spread between the slowest and the
fastest CPU; when every CPU has the same figure there are none.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vmpower.cpufreq.acpi import SetspeedBackend
from vmpower.cpufreq.amd_pstate import AmdPstateBackend
from vmpower.cpufreq.backend import CPU_DIR, Backend, Report, policy_dir
from vmpower.cpufreq.cppc import CppcBackend
from vmpower.cpufreq.intel_pstate import IntelPstateBackend
from vmpower.cpuset import parse_cpu_list
from vmpower.errors import CpuListError, SysfsError
from vmpower.sysfs import Sysfs

BACKENDS: dict[str, type[Backend]] = {
    "acpi-cpufreq": SetspeedBackend,
    "intel_pstate": IntelPstateBackend,
    "intel_cpufreq": IntelPstateBackend,  # intel_pstate in passive mode
    "amd-pstate": AmdPstateBackend,
    "amd-pstate-epp": AmdPstateBackend,
    "cppc_cpufreq": CppcBackend,
}

_CPU_NAME = re.compile(r"^cpu(\d+)$")


def read_cpu_list(sysfs: Sysfs, rel: str) -> frozenset[int] | None:
    """A kernel CPU list file ("0-3,8"), or None when it is missing or unreadable."""
    try:
        return parse_cpu_list(sysfs.read(rel))
    except (SysfsError, CpuListError):
        return None


def present_cpus(sysfs: Sysfs) -> list[int]:
    """Every present CPU: the ``present`` list, else the ``cpuN`` directories."""
    present = read_cpu_list(sysfs, f"{CPU_DIR}/present")
    if present is not None:
        return sorted(present)
    try:
        names = sysfs.listdir(CPU_DIR)
    except SysfsError:
        return []
    return sorted(int(m.group(1)) for m in map(_CPU_NAME.match, names) if m)


def system_driver(sysfs: Sysfs, cpus: Iterable[int]) -> str:
    """The registered scaling driver ("" when no CPU has a cpufreq policy)."""
    for cpu in cpus:
        try:
            return sysfs.read(f"{policy_dir(cpu)}/scaling_driver")
        except SysfsError:
            continue
    return ""


def make_backend(sysfs: Sysfs, driver: str, cpus: Iterable[int], report: Report) -> Backend | None:
    """The backend for ``driver``; a driver vmpower does not know still works when it
    offers a frequency table and the userspace governor (cpufreq-dt and the like)."""
    cls = BACKENDS.get(driver)
    if cls is not None:
        return cls(sysfs, driver, report)
    if not driver:
        return None
    for cpu in cpus:
        if sysfs.exists(f"{policy_dir(cpu)}/scaling_available_frequencies"):
            return SetspeedBackend(sysfs, driver, report)
    return None


def priority_cpus(values: dict[int, int]) -> frozenset[int]:
    """CPUs whose figure lies strictly above the midpoint of the lowest and highest."""
    if not values:
        return frozenset()
    lo, hi = min(values.values()), max(values.values())
    if lo == hi:
        return frozenset()
    return frozenset(cpu for cpu, v in values.items() if 2 * v > lo + hi)
