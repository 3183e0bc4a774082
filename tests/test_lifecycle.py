"""VM lifecycle and pinning under a running agent (in-process, real test driver).

libvirt's test driver keeps private state per connection, so lifecycle changes are
made through the agent's own connection (``agent.parts.hypervisor.conn``), as a libvirtd
would see them from virsh. The agent runs its real monitor loop in a thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import AgentThread

from vmpower.devtools import wait_for
from vmpower.protocol import ReplyCode, Unit

ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[AgentThread]:
    agent = AgentThread(tmp_path, map_refresh_s=0.0)
    try:
        yield agent
    finally:
        agent.stop()


def test_vm_stop_restores_the_cpus_it_alone_held_and_start_reconnects(running: AgentThread) -> None:
    original_governor = running.read(2, "scaling_governor")
    table = running.table(3)
    assert running.power("vm1.0", Unit.SCALE_MAX, 0) == ACK  # host CPU 2: vm1 alone
    assert running.power("vm1.0", Unit.SCALE_MIN, 1) == ACK  # host CPU 3: shared with vm2
    assert running.power("vm2.0", Unit.SCALE_MAX, 0) == ACK
    assert running.power("vm2.0", Unit.SCALE_DOWN, 0) == ACK
    assert running.read(3, "scaling_setspeed") == str(table[2])  # vm2's wish is the highest

    running.domain("vm1").destroy()
    assert wait_for(lambda: running.read(2, "scaling_governor") == original_governor, 10)
    assert running.read(2, "scaling_setspeed") == "<unsupported>"
    # CPU 3 is still held by vm2: it keeps vm2's wish, not restored.
    assert running.read(3, "scaling_governor") == "userspace"
    assert running.read(3, "scaling_setspeed") == str(table[2])
    host = running.hosts["vm1.0"]
    assert host.conn is not None
    assert wait_for(lambda: host.conn.recv(1) == b"", 10)  # the agent closed vm1's channel

    running.domain("vm1").create()
    host.accept(timeout_s=10)  # reconnected with no operator
    assert running.power("vm1.0", Unit.SCALE_MIN, 0) == ACK
    assert running.read(2, "scaling_setspeed") == str(running.table(2)[-1])


def test_pinning_changed_outside_vmpower_is_followed(running: AgentThread) -> None:
    assert running.power("vm1.0", Unit.SCALE_MIN, 0) == ACK  # vCPU0 → host CPU 2
    assert running.read(2, "scaling_governor") == "userspace"
    # virsh vcpupin vm1 0 5: from now on vCPU0 is host CPU 5.
    running.domain("vm1").pinVcpu(0, tuple(cpu == 5 for cpu in range(8)))
    # The request path never waits for libvirt: a stale map serves while the worker
    # re-reads it, so within moments the request lands on host CPU 5.
    assert wait_for(
        lambda: (
            running.power("vm1.0", Unit.SCALE_MIN, 0) == ACK
            and running.read(5, "scaling_setspeed") == str(running.table(5)[-1])
        ),
        10,
    )
    # vm1 no longer owns CPU 2: its wish there is gone and CPU 2 is restored.
    assert wait_for(lambda: running.read(2, "scaling_governor") != "userspace", 10)


def test_set_pcpu_through_the_agent_moves_requests(running: AgentThread) -> None:
    from vmpower.control import request

    socket = running.agent.config.control.socket
    assert request(socket, "set_pcpu", vm="vm2", vcpu=1, cpus="6")["pcpus"] == "6"
    shown = request(socket, "show_vm", vm="vm2")
    assert shown["vcpus"][1]["pcpus"] == "6" and shown["vcpus"][1]["pinned"]
    assert running.power("vm2.0", Unit.SCALE_MIN, 1) == ACK
    assert running.read(6, "scaling_setspeed") == str(running.table(6)[-1])
    assert running.read(4, "scaling_governor") != "userspace"


def test_rm_vm_stops_serving_and_add_vm_resumes(running: AgentThread) -> None:
    from vmpower.control import request

    socket = running.agent.config.control.socket
    assert running.power("vm1.0", Unit.SCALE_MIN, 0) == ACK
    request(socket, "rm_vm", vm="vm1")
    assert wait_for(lambda: running.read(2, "scaling_governor") != "userspace", 10)
    assert "vm1" not in [row["name"] for row in request(socket, "list_vms")]
    request(socket, "add_vm", vm="vm1")
    running.hosts["vm1.0"].accept(timeout_s=10)
    assert running.power("vm1.0", Unit.SCALE_MIN, 0) == ACK
