"""The libvirt side of the agent: connection, events, VM registry, vCPU→pCPU map, channels.

Which module owns what:

* ``model`` — the value types, no libvirt import: ``VmState``, ``ChannelInfo``, ``VmInfo``
  (with the one rule for a pinned vCPU: ``is_pinned()``, ``pinned_pcpus()``, ``pcpus()``),
  ``VmEvent`` and ``EventKind``;
* ``domain_xml`` — a domain's power channels and NICs from its XML, merged with a scan of
  the channels directory; no libvirt call;
* ``libvirt_events`` — libvirt's process-wide event loop thread and the raw callbacks,
  which only queue a record and wake the owner;
* ``session`` — ``LibvirtSession``: the one connection and every libvirt call made on it
  (open, read VMs and maps, pin, NIC counters); returns plain data, touches no registry;
* ``worker`` — ``LibvirtWorker``: the thread the session's calls run on, so that a hung
  libvirtd never holds the monitor thread; each outcome is handed back to the owner;
* ``registry`` — ``Hypervisor``: the VM registry, kept on the owner thread from the
  session's answers; reconnection (backoff), event processing, whether libvirt responds,
  and the per-VM operations.

Import from here (``from vmpower.hypervisor import Hypervisor, VmInfo``); the submodules
are the package's own layout.
"""

from __future__ import annotations

from vmpower.hypervisor.model import ChannelInfo, EventKind, VmEvent, VmInfo, VmState
from vmpower.hypervisor.registry import Hypervisor

__all__ = ["ChannelInfo", "EventKind", "Hypervisor", "VmEvent", "VmInfo", "VmState"]
