"""Issue #11 point 4: a hung libvirtd holds neither the guests nor the operator.

vmpowerd talks to the real libvirtd the e2e set-up starts, through its remote driver:
``test+unix:///<node file>`` makes libvirtd serve libvirt's test driver with the VMs of
tests/data/node.xml (the daemon reads the node file), so every libvirt call is an RPC
to that libvirtd and hangs while it is SIGSTOPped, as on a host whose libvirtd hangs.
No QEMU runs: the test binds the VMs' channel sockets itself (``RunningAgent``).

While libvirtd is stopped: guests' requests keep their replies (vmpowerd uses the last
known vCPU map), ``status`` answers and says libvirt is unresponsive, and an
``add_channels`` (which needs libvirt) does not hold the loop. After SIGCONT: status says
responsive again and a pinning change made through libvirt (``set_pcpu``) is followed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from agent_support import RunningAgent

from e2e.e2e_env import E2eHost, Libvirtd
from vmpower import control, protocol
from vmpower.devtools import make_request, wait_for
from vmpower.errors import ControlError
from vmpower.protocol import Command, ReplyCode, Unit

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

ACK = int(ReplyCode.ACK)
STALL_S = 15.0  # the bench holds libvirtd longer; the test needs only "many map periods"
STATUS_TIMEOUT_S = 5.0  # a status that takes longer than this is a held loop
REPLY_TIMEOUT_S = 10.0  # generous: a loaded 2-core host, not vmpowerd, sets the pace


def _reply_code(agent: RunningAgent, channel: str, unit: Unit, vcpu: int) -> int:
    """One guest request on ``channel``; its reply code (a held loop raises TimeoutError)."""
    reply = agent.hosts[channel].request(
        make_request(Command.CPU_POWER, unit, vcpu), timeout_s=REPLY_TIMEOUT_S
    )
    return protocol.peek_header(reply)[2]


def _libvirt_status(agent: RunningAgent) -> dict[str, Any]:
    """``status``'s libvirt part; ControlError if vmpowerd did not answer in time."""
    status = control.request(agent.socket, "status", timeout_s=STATUS_TIMEOUT_S)
    libvirt_side: dict[str, Any] = status["libvirt"]
    return libvirt_side


def test_a_stopped_libvirtd_holds_neither_guests_nor_operators(
    e2e_host: E2eHost, libvirtd: Libvirtd, tmp_path: Path
) -> None:
    if libvirtd.pid is None:
        pytest.fail(
            "a libvirtd this session did not start serves qemu:///system: "
            "the test will not SIGSTOP it",
            pytrace=False,
        )
    pid = libvirtd.pid
    agent = RunningAgent(
        tmp_path,
        settings={
            "libvirt": {
                # The remote driver over libvirtd's default socket; the daemon opens the
                # test driver on this node file (rendered by RunningAgent at this path).
                "uri": f"test+unix://{tmp_path / 'node.xml'}",
                "map_refresh_s": 0.2,
                "reconnect_min_s": 0.2,
                "reconnect_max_s": 2.0,
            }
        },
    )
    stopped = False
    try:
        agent.start()
        assert _reply_code(agent, "vm1.0", Unit.SCALE_MIN, 0) == ACK  # vCPU 0 → host CPU 2
        assert agent.setspeed(2) == agent.table(2)[-1]
        before = _libvirt_status(agent)
        assert before["connected"] is True, before

        os.kill(pid, signal.SIGSTOP)
        stopped = True
        answered = 0
        seen_unresponsive: dict[str, Any] | None = None
        add_channels_error = ""
        end = time.monotonic() + STALL_S
        while time.monotonic() < end:
            # Guests keep their replies, on the last known map.
            assert _reply_code(agent, "vm1.0", Unit.SCALE_MIN, 0) == ACK
            assert _reply_code(agent, "vm2.0", Unit.SCALE_MIN, 1) == ACK  # host CPU 4
            answered += 2
            if seen_unresponsive is None:
                side = _libvirt_status(agent)  # answers although libvirtd hangs
                if side.get("responsive") is False:
                    seen_unresponsive = side
            elif not add_channels_error:
                # An operator command that needs libvirt: refused at once, loop not held.
                with pytest.raises(ControlError) as refused:
                    control.request(
                        agent.socket, "add_channels", vm="vm1", timeout_s=STATUS_TIMEOUT_S
                    )
                add_channels_error = str(refused.value)
            time.sleep(0.05)
        assert seen_unresponsive is not None, "status never said libvirt is unresponsive"
        assert seen_unresponsive["connected"] is True
        assert seen_unresponsive["stalled_s"] > 0
        assert "libvirt is not responding" in add_channels_error, add_channels_error
        assert answered >= 20
        print(f"during the stall: {answered} guest requests answered; status {seen_unresponsive}")
        print(f"add_channels during the stall: {add_channels_error}")
        # Answering during the stall is not the end of it: the guests are still served.
        assert _reply_code(agent, "vm1.0", Unit.SCALE_MAX, 0) == ACK

        os.kill(pid, signal.SIGCONT)
        stopped = False
        assert wait_for(lambda: _libvirt_status(agent)["responsive"] is True, 60)
        # Maps are read again: the last read is recent.
        assert wait_for(lambda: _libvirt_status(agent)["last_map_read_age_s"] < 5, 30)

        # A pinning change through libvirt (on vmpowerd's own connection: the test
        # driver keeps private state per connection) is followed by the next request.
        pinned = control.request(agent.socket, "set_pcpu", vm="vm1", vcpu=0, cpus="5")
        assert pinned["pcpus"] == "5"
        assert _reply_code(agent, "vm1.0", Unit.SCALE_MIN, 0) == ACK
        assert wait_for(lambda: agent.setspeed(5) == agent.table(5)[-1], 10)
        # vm1 no longer owns host CPU 2: its wish there is dropped and the CPU restored.
        assert wait_for(lambda: agent.read(2, "scaling_governor") != "userspace", 10)
        assert agent.stop() == 0
    finally:
        if stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        agent.close()
        if Path(agent.log_path).exists():
            print("--- vmpowerd log, last lines ---")
            print("\n".join(agent.log().splitlines()[-40:]))
