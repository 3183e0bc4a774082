"""What happens to channels and wishes when a VM comes, goes or is re-pinned.

The hypervisor layer reports what libvirt says (``VmEvent``s, ``VmInfo``s); the
channel registry opens and closes sockets; the request handler keeps wishes. This
module is the one place that joins them: a running, tracked VM gets its channels
opened; a VM that stops or leaves gets them closed and its wishes dropped (CPUs nobody
wishes for any more are restored); a VM whose pinning changed keeps only the wishes
on host CPUs it still owns. Runs on the monitor thread, like everything it touches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from vmpower.channels import ChannelRegistry
from vmpower.errors import VmpowerError
from vmpower.hypervisor import Hypervisor, VmEvent, VmState
from vmpower.power import PowerManager

log = logging.getLogger("vmpower.lifecycle")


class VmLifecycle:
    """Keeps channels and wishes in step with the VMs libvirt reports."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        channels: ChannelRegistry,
        power: PowerManager,
        kept: Callable[[], None] | None = None,
    ) -> None:
        self.hypervisor = hypervisor
        self.channels = channels
        self.power = power
        # Called when a VM's channels were opened: what they are built of lasts as long
        # as the VM (heap.HeapKeeper keeps it out of the collector's passes).
        self.kept = kept

    def on_event(self, event: VmEvent) -> None:
        log.info("libvirt: %s %s %s", event.kind, event.vm or "", event.detail)
        if event.kind in ("stopped", "undefined") and event.vm:
            self.vm_gone(event.vm)
        elif event.kind in ("started", "defined", "resumed") and event.vm:
            self.sync_vm(event.vm)
        elif event.kind == "pinning" and event.vm:
            self.pinning_changed(event.vm)
        elif event.kind == "connection_restored":
            for name in sorted(self.hypervisor.vms()):
                self.sync_vm(name)
                self.pinning_changed(name)
            for vm in self.channels.vms() - set(self.hypervisor.vms()):
                self.vm_gone(vm)

    def sync_vm(self, name: str, only: set[int] | None = None) -> list[int]:
        """Open the channels of a running, tracked VM; returns the indexes newly opened."""
        try:
            info = self.hypervisor.vm(name)
        except VmpowerError:
            return []
        if info.state is not VmState.RUNNING or not self.hypervisor.tracked(name):
            return []
        opened = self.channels.open_vm(name, ((ch.index, ch.path) for ch in info.channels), only)
        if opened and self.kept is not None:
            self.kept()
        return opened

    def sync_all(self) -> None:
        for name in sorted(self.hypervisor.vms()):
            self.sync_vm(name)

    def vm_gone(self, name: str) -> None:
        """A VM stopped or left: close its channels, free its CPUs."""
        self.channels.close_vm(name)
        self.power.requester_gone(name)

    def pinning_changed(self, name: str) -> None:
        try:
            info = self.hypervisor.vm(name)
        except VmpowerError:
            return
        self.power.pinning_changed(info)
