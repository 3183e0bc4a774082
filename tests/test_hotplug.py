"""CPU hotplug through the kernel's own uevents, against the real daemon (issue #13).

Writing ``offline``/``online`` to the REAL /sys/devices/system/cpu/cpu1/uevent (root)
makes the kernel emit that uevent for cpu1 without touching the CPU; the test first
flips cpu1 in the daemon's simulated tree, as the kernel changes the CPU before it
announces it. The daemon sees the uevent on its netlink socket and re-reads cpu1 in
its own tree.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import RunningAgent

from vmpower import protocol
from vmpower.cpufreq.simulate import set_cpu_online
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.protocol import Command, ReplyCode, Unit

UEVENT = Path("/sys/devices/system/cpu/cpu1/uevent")
ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)
POLICY1 = "devices/system/cpu/cpufreq/policy1"


def _uevents_writable() -> str | None:
    if os.geteuid() != 0:
        return "writing a CPU's uevent file needs root"
    try:
        UEVENT.write_text("change")  # the kernel emits a "change" uevent; nothing else
    except OSError as exc:
        return f"cannot write {UEVENT}: {exc}"
    return None


SKIP = _uevents_writable()
pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")


def kernel_says(action: str) -> None:
    UEVENT.write_text(action)


def power(host: ChannelHost, unit: Unit, vcpu: int = 0) -> int:
    return protocol.peek_header(host.request(make_request(Command.CPU_POWER, unit, vcpu)))[2]


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        running.start()
        # vm1's vCPU 0 onto host CPU 1, the CPU the real kernel can announce here
        running.control("set_pcpu", vm="vm1", vcpu=0, cpus="1")
        yield running
    finally:
        running.close()


def _kernel_restarts_policy(root: Path) -> None:
    """What cpufreq_online() leaves: the policy's own governor, not vmpower's setting."""
    policy = root / POLICY1
    (policy / "scaling_governor").write_text("schedutil\n")
    (policy / "scaling_setspeed").write_text("<unsupported>\n")


def test_offline_refuses_online_reapplies_in_the_same_turn(agent: RunningAgent) -> None:
    vm1 = agent.hosts["vm1.0"]
    assert power(vm1, Unit.SCALE_MAX) == ACK
    nominal = agent.table(1)[1]  # the entry below the _PSS turbo entry
    assert agent.setspeed(1) == nominal

    set_cpu_online(agent.sysfs_root, 1, False)
    kernel_says("offline")
    assert wait_for(lambda: "host CPU 1 offline" in agent.log(), 10), agent.log()
    assert power(vm1, Unit.SCALE_MAX) == NACK
    assert power(vm1, Unit.SCALE_MIN) == NACK  # the wish stays as it was: max

    _kernel_restarts_policy(agent.sysfs_root)
    set_cpu_online(agent.sysfs_root, 1, True)
    kernel_says("online")
    assert wait_for(
        lambda: agent.read(1, "scaling_governor") == "userspace" and agent.setspeed(1) == nominal,
        10,
    ), agent.log()
    assert power(vm1, Unit.SCALE_DOWN) == ACK
    assert agent.stop() == 0


def test_offline_at_exit_is_restored_when_it_returns(agent: RunningAgent) -> None:
    original = agent.read(1, "scaling_governor")
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN) == ACK
    assert agent.read(1, "scaling_governor") == "userspace"
    set_cpu_online(agent.sysfs_root, 1, False)
    kernel_says("offline")
    assert wait_for(lambda: "host CPU 1 offline" in agent.log(), 10)
    assert agent.stop() == 1  # cpu1's originals could not be written: kept
    journal = (agent.state_dir / "restore-journal.json").read_text()
    assert "cpu1/cpufreq/scaling_governor" in journal

    for host in agent.hosts.values():  # a second run, the CPU still offline
        host.close()
    agent.hosts = {n: ChannelHost(agent.channels_dir / n) for n in agent.hosts}
    agent.start()
    set_cpu_online(agent.sysfs_root, 1, True)
    kernel_says("online")
    governor = agent.sysfs_root / POLICY1 / "scaling_governor"
    assert wait_for(lambda: governor.read_text().strip() == original, 10), agent.log()
    assert agent.control("status")["pending_restore"] == 0
    assert agent.stop() == 0


# -- no periodic re-read ------------------------------------------------------------------

IN_ACCESS = 0x1
IN_NONBLOCK = os.O_NONBLOCK


def _inotify_access(path: Path) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(IN_NONBLOCK)
    assert fd >= 0
    assert libc.inotify_add_watch(fd, str(path).encode(), IN_ACCESS) >= 0
    return fd


def test_idle_daemon_reads_no_cpu_state(agent: RunningAgent) -> None:
    """Before issue #13 each known CPU's online file was read every second."""
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MAX) == ACK  # cpu1 is known now
    fd = _inotify_access(agent.sysfs_root / "devices/system/cpu/cpu1/online")
    try:
        # three reconnect ticks (1 s each) go by
        readable, _, _ = select.select([fd], [], [], 3.5)
        events = os.read(fd, 4096) if readable else b""
        assert not events, f"online read {len(events) // struct.calcsize('iIII')} times"
    finally:
        os.close(fd)
    assert agent.stop() == 0
