"""Which CPUs share a cpufreq policy, and where each policy's files are.

The cpufreq core groups the CPUs whose frequency moves together into one policy
(Documentation/admin-guide/pm/cpufreq.rst, "Policy Objects"): the directory
``devices/system/cpu/cpufreq/policyM/`` (M: the CPU that created it), whose
``related_cpus`` lists every CPU of the policy, online or not, and ``affected_cpus``
the online ones; each CPU's ``cpuN/cpufreq`` is a symbolic link to its policy. A write
to any of them is a write to the one policy, for all its CPUs.

So vmpower controls *policies*, named here by their number M (the "leader"; CPU M is
always one of them), and writes each policy's files through one path:

* a policy of one CPU N: ``cpuN/cpufreq/`` (the paths journals have always recorded);
* a policy shared by several CPUs: ``cpufreq/policyM/``, which stays put while any of
  its CPUs, M included, is offline (the kernel removes the policy only with its last
  CPU's device), so its journal entries keep one name whichever CPU asked.

CPUs under no ``policyM`` (kernels before the policy directories, or a CPU without
cpufreq) are their own policy, at ``cpuN/cpufreq``. The map is read at start and again
for a CPU that comes online (a policy may be created then: cpufreq_online()).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from vmpower.cpufreq.backend import CPU_DIR, policy_dir
from vmpower.cpuset import parse_cpu_list
from vmpower.errors import CpuListError, SysfsError
from vmpower.sysfs import Sysfs

POLICIES_DIR = f"{CPU_DIR}/cpufreq"
_POLICY_NAME = re.compile(r"^policy(\d+)$")


class Topology:
    """CPU → policy number, policy → its CPUs and its directory (relative to the root)."""

    def __init__(self, sysfs: Sysfs, present: Iterable[int]) -> None:
        self._sysfs = sysfs
        self._present = frozenset(present)
        self._leader: dict[int, int] = {}
        self._members: dict[int, frozenset[int]] = {}
        self._dirs: dict[int, str] = {}
        self.reload()

    def reload(self) -> None:
        """Read every ``policyM/related_cpus`` again (at start; a CPU whose policy is new)."""
        leader: dict[int, int] = {}
        members: dict[int, frozenset[int]] = {}
        try:
            names = self._sysfs.listdir(POLICIES_DIR)
        except SysfsError:
            names = []
        numbers = sorted(int(m.group(1)) for m in map(_POLICY_NAME.match, names) if m)
        for num in numbers:
            if num not in self._present or num in leader:
                continue
            cpus = self._related(num) - leader.keys()  # a CPU claimed twice: the first wins
            cpus = frozenset(c for c in cpus if c in self._present) | {num}
            members[num] = cpus
            for cpu in cpus:
                leader[cpu] = num
        dirs = {}
        for num, cpus in members.items():
            # One CPU: its own link, as journals recorded it before policies were shared.
            dirs[num] = f"{POLICIES_DIR}/policy{num}" if len(cpus) > 1 else policy_dir(num)
        self._leader, self._members, self._dirs = leader, members, dirs

    def refresh(self, cpu: int) -> None:
        """``cpu`` changed (hotplug): re-read the map if its policy is new or changed."""
        num = self._leader.get(cpu)
        if num is None or self._related(num) | {num} != self._members.get(num):
            self.reload()

    def leader(self, cpu: int) -> int:
        """The number of ``cpu``'s policy (the CPU itself when it is under none)."""
        return self._leader.get(cpu, cpu)

    def members(self, cpu: int) -> frozenset[int]:
        """Every CPU of ``cpu``'s policy, ``cpu`` included."""
        num = self._leader.get(cpu)
        return self._members[num] if num is not None else frozenset({cpu})

    def shared(self, cpu: int) -> bool:
        return len(self.members(cpu)) > 1

    def dir(self, cpu: int) -> str:
        """The directory vmpower reads and writes ``cpu``'s policy through."""
        num = self._leader.get(cpu)
        return self._dirs[num] if num is not None else policy_dir(cpu)

    def name(self, cpu: int) -> str:
        """The policy's name for show_cpus: "policyM" (``cpuN`` under no policy directory)."""
        num = self._leader.get(cpu)
        return f"policy{num}" if num is not None else f"cpu{cpu}"

    def _related(self, num: int) -> frozenset[int]:
        try:
            text = self._sysfs.read(f"{POLICIES_DIR}/policy{num}/related_cpus")
            return parse_cpu_list(",".join(text.split()))
        except (SysfsError, CpuListError):
            return frozenset({num})
