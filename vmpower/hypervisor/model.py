"""The value types of the libvirt side: VM state, power channels, VM info, registry events.

Plain frozen data with no libvirt import, so that code which only reads the registry
(power, policies, the admin commands) does not depend on libvirt's bindings. The rule that
tells a pinned vCPU from an unpinned one lives here, in ``VmInfo``, and nowhere else.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal

from vmpower.errors import HypervisorError

# A vCPU's host CPU where a read does not say (virConnectGetAllDomainStats gives vCPU
# times only): the energy books then go by the vCPU's pins (vmpower.energy).
CPU_NOT_REPORTED = -1

_NO_CPUS: frozenset[int] = frozenset()


class VmState(enum.Enum):
    """A domain's run state, folded from libvirt's virDomainState."""

    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"
    CRASHED = "crashed"
    OTHER = "other"


@dataclass(frozen=True)
class ChannelInfo:
    """One host-side power channel socket of a VM.

    ``source`` is ``"xml"`` when the domain's XML lists it, ``"dir"`` when only the
    channels directory scan found it.
    """

    vm: str
    index: int
    path: str
    source: str


def _affinity_pinned(affinity: frozenset[int], host_cpus: int | frozenset[int]) -> bool:
    """Whether a vCPU with this affinity is pinned: not empty and not every host CPU.

    ``host_cpus`` is the host CPU count or the set of every host CPU.
    """
    if not affinity:
        return False
    if isinstance(host_cpus, int):
        # Same answer as ``not frozenset(range(host_cpus)) <= affinity`` without building
        # that set per call: an affinity smaller than the host cannot cover it (the usual
        # pinned case, O(1)); issuperset() walks the range in C without allocating.
        return len(affinity) < host_cpus or not affinity.issuperset(range(host_cpus))
    return not host_cpus <= affinity


@dataclass(frozen=True)
class VmInfo:
    """What the agent knows of one VM, as of ``map_read_at`` (the owner's clock).

    ``vcpu_pcpus[i]`` is the full set of host CPUs vCPU ``i`` may run on. It and
    ``channels`` are empty while the domain is not active (shut off, or crashed and gone):
    a VM that is not running owns no CPU and has no socket to connect to.
    ``host_cpus`` is the host CPU count the map was read against (0: unknown); it tells a
    pinned vCPU from an unpinned one (affinity = every host CPU).
    """

    name: str
    uuid: str
    state: VmState
    vcpu_count: int
    vcpu_pcpus: tuple[frozenset[int], ...]
    channels: tuple[ChannelInfo, ...]
    map_read_at: float
    host_cpus: int = 0

    @property
    def active(self) -> bool:
        """True while the domain has live vCPUs (running or paused)."""
        return bool(self.vcpu_pcpus)

    def pcpus(self, host_cpus: int | frozenset[int] | None = None) -> frozenset[int]:
        """Union of the affinity sets of the VM's pinned vCPUs: the host CPUs it owns.

        Unpinned vCPUs (affinity = every host CPU) are left out: an unpinned VM owns no
        host CPU, it merely may run anywhere (docs/protocol.md, host rule 4). ``host_cpus``
        (a count, or the set of every host CPU) overrides the field; when neither is known
        every vCPU counts.
        """
        known = host_cpus if host_cpus is not None else (self.host_cpus or None)
        if known is None:
            return _NO_CPUS.union(*self.vcpu_pcpus)
        return _NO_CPUS.union(*(c for c in self.vcpu_pcpus if _affinity_pinned(c, known)))

    def is_pinned(self, vcpu: int, host_cpus: int | frozenset[int] | None = None) -> bool:
        """Whether ``vcpu`` is pinned: its affinity is not empty and not every host CPU.

        ``host_cpus`` is the host CPU count or the set of every host CPU (default: the
        field). A vCPU index the VM does not have (or any vCPU of a VM that is not running)
        is not pinned.
        """
        if host_cpus is None:
            if not self.host_cpus:
                raise HypervisorError(f"{self.name}: host CPU count unknown")
            host_cpus = self.host_cpus
        if not 0 <= vcpu < len(self.vcpu_pcpus):
            return False
        return _affinity_pinned(self.vcpu_pcpus[vcpu], host_cpus)

    def pinned_pcpus(self, vcpu: int, host_cpus: int) -> frozenset[int]:
        """The host CPUs ``vcpu`` is pinned to; empty when it is unpinned or does not exist.

        The same rule as ``is_pinned()``, for callers that want the CPUs themselves.
        """
        if not 0 <= vcpu < len(self.vcpu_pcpus):
            return _NO_CPUS
        affinity = self.vcpu_pcpus[vcpu]
        return affinity if _affinity_pinned(affinity, host_cpus) else _NO_CPUS


EventKind = Literal[
    "defined",
    "undefined",
    "started",
    "stopped",
    "paused",
    "resumed",
    "pinning",
    "connection_lost",
    "connection_restored",
]


@dataclass(frozen=True)
class VmEvent:
    """Something that happened, as returned by ``Hypervisor.process_events()``.

    ``vm`` is None for the connection events. ``detail`` is libvirt's reason in words
    ("booted", "destroyed", ...) or where vmpower learnt it ("refresh", "set_pcpu",
    "add_vm", "while disconnected", ...).
    """

    kind: EventKind
    vm: str | None
    detail: str
