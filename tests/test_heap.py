"""VMs arriving after the start are kept out of the cyclic collector's passes (heap.py).

The daemon freezes what its start built; before HeapKeeper, a VM re-added later stayed
in the young generation, and since every VM leaving frees as many objects as one arriving
builds, the young pass never came due while they piled up: the scale bench's churn ended
in one pass over 18 000 objects, 7-18 ms inside a loop turn (issue #16).
"""

from __future__ import annotations

import gc
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmpower import control
from vmpower.config import config_from_dict
from vmpower.cpufreq.simulate import build_tree
from vmpower.daemon import Agent
from vmpower.devtools import ChannelHost
from vmpower.heap import HeapKeeper

VMS = 48


@pytest.fixture
def frozen_start() -> Iterator[None]:
    """The daemon's start, as main() leaves it: no garbage, everything frozen; undone after."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _collectable() -> int:
    """Objects in the collector's generations (not frozen)."""
    return sum(len(gc.get_objects(generation)) for generation in range(3))


def _node(tmp_path: Path, channels_dir: Path) -> Path:
    domains = []
    for i in range(VMS):
        path = channels_dir / f"vm{i}.0"
        domains.append(
            f"""<domain type='test'><name>vm{i}</name>
  <uuid>6a1c5a0e-00b0-4c1e-9a5e-0000000000{i:02d}</uuid>
  <memory unit='KiB'>1048576</memory><vcpu placement='static'>1</vcpu>
  <cputune><vcpupin vcpu='0' cpuset='{i % 8}'/></cputune>
  <os><type arch='x86_64'>hvm</type></os>
  <devices><channel type='unix'><source mode='bind' path='{path}'/>
  <target type='virtio' name='virtio.serial.port.poweragent.0'/></channel></devices>
</domain>"""
        )
    node = tmp_path / "node.xml"
    node.write_text(f"<node>{''.join(domains)}</node>")
    return node


def _churn_every_vm(tmp_path: Path, heap: HeapKeeper | None) -> tuple[int, int]:
    """Start an agent on VMS VMs (main()'s freeze after the start), take every VM away
    and add it again through the control socket; (objects left to the collector, cyclic
    garbage a full collection then finds)."""
    channels_dir = tmp_path / "channels"
    channels_dir.mkdir()
    sysfs_root = tmp_path / "sysfs"
    build_tree(sysfs_root, "acpi-cpufreq", 8, turbo=False)
    hosts = [ChannelHost(channels_dir / f"vm{i}.0") for i in range(VMS)]
    sock = tmp_path / "control.sock"
    config = config_from_dict(
        {
            "libvirt": {"uri": f"test://{_node(tmp_path, channels_dir)}"},
            "channels": {"dir": str(channels_dir)},
            "cpufreq": {"sysfs_root": str(sysfs_root)},
            "state": {"dir": str(tmp_path / "state")},
            "control": {"socket": str(sock)},
        }
    )
    agent = Agent(config, heap=heap)
    gc.disable()
    try:
        agent.start()
    finally:
        gc.freeze()
        gc.enable()
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        for i in range(VMS):
            control.request(sock, "rm_vm", vm=f"vm{i}")
            opened = control.request(sock, "add_vm", vm=f"vm{i}")["opened"]
            assert opened == [0], f"vm{i}: channels opened {opened}"
        control.request(sock, "status")  # a turn after the last arrival's
        left = _collectable()
        gc.unfreeze()
        found = gc.collect()
    finally:
        agent.request_stop()
        thread.join(30)
        agent.shutdown()
        for host in hosts:
            host.close()
    return left, found


def test_vms_added_after_the_start_are_not_left_to_the_collector(
    tmp_path: Path, frozen_start: None
) -> None:
    left, found = _churn_every_vm(tmp_path, HeapKeeper())
    # Without the keeper, every re-added VM's objects stay (over 20 each, 48 VMs).
    assert left < 300, f"{left} objects left to the collector after {VMS} VMs re-added"
    # Frozen objects that turn into cyclic garbage are never freed: a VM's make none.
    assert found < VMS // 2, f"{found} objects of cyclic garbage after {VMS} VMs re-added"


def test_without_the_keeper_the_re_added_vms_pile_up(tmp_path: Path, frozen_start: None) -> None:
    """The mechanism the keeper answers (in process, where no keeper is given)."""
    left, _ = _churn_every_vm(tmp_path, None)
    assert left > VMS * 10


def test_settle_frees_young_cycles_and_freezes_what_lives(frozen_start: None) -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    garbage = Node()
    gone = weakref.ref(garbage)
    del garbage
    kept = [{"vm": i} for i in range(500)]
    keeper = HeapKeeper()
    keeper.end_of_turn()  # nothing noted this turn: no pass, nothing frozen
    assert gone() is not None
    keeper.note_kept()
    keeper.end_of_turn()
    assert gone() is None  # freed by the young pass, not frozen for good
    young = {id(o) for generation in range(3) for o in gc.get_objects(generation)}
    assert not any(id(o) in young for o in kept)
    keeper.end_of_turn()  # once per noted turn
