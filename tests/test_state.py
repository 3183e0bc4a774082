"""Correct state under change (issue #12): libvirt events handled in the turn they arrive,
rm_vm + add_vm, operator wishes released, one owner per cpufreq file, no stale cache.

libvirt's test driver keeps its state per connection, so a VM can only be stopped
through the agent's own connection: the libvirt event test runs the real Agent with its
real monitor loop in a thread. Every other test runs the real vmpowerd subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_support import AgentThread, RunningAgent

from vmpower import daemon, protocol
from vmpower.devtools import ChannelHost, make_request, wait_for
from vmpower.errors import ControlError
from vmpower.protocol import Command, ReplyCode, Unit
from vmpower.restore import RestoreJournal

ACK, NACK = int(ReplyCode.ACK), int(ReplyCode.NACK)


def power(host: ChannelHost, unit: Unit, resource_id: int) -> int:
    reply = host.request(make_request(Command.CPU_POWER, unit, resource_id))
    return protocol.peek_header(reply)[2]


# -- point 1: libvirt events are handled in the turn libvirt wakes the loop ------------


def test_vm_stop_is_handled_without_waiting_for_the_liveness_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The liveness check of the connection comes once an hour here: only the event
    # itself can make the agent notice that vm1 stopped.
    monkeypatch.setattr(daemon, "HYPERVISOR_CHECK_S", 3600.0)
    running = AgentThread(tmp_path, map_refresh_s=0.0)
    try:
        original = running.read(2, "scaling_governor")
        assert power(running.hosts["vm1.0"], Unit.SCALE_MAX, 0) == ACK  # host CPU 2
        assert running.read(2, "scaling_governor") == "userspace"
        conn = running.agent.parts.hypervisor.conn
        assert conn is not None
        conn.lookupByName("vm1").destroy()  # libvirt queues STOPPED on its event thread
        assert wait_for(lambda: running.read(2, "scaling_governor") == original, 10), (
            "vm1 stopped but host CPU 2 was not restored: the event waited for a timer"
        )
    finally:
        running.stop()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path)
    try:
        yield running.start()
    finally:
        running.close()


# -- point 4: operator wishes are released ---------------------------------------------


def test_operator_release_leaves_the_cpu_to_the_other_wishes_or_restores_it(
    agent: RunningAgent,
) -> None:
    originals = agent.originals()  # every file of the tree (policy directories included)
    table = agent.table(2)
    assert agent.control("set_cpu_freq", cpu=2, op="max")["freq_khz"] == table[1]
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0) == ACK  # vm1 on host CPU 2
    row = agent.control("show_cpus", cpu=2)[0]
    assert row["wishers"] == ["operator", "vm1"]
    assert agent.setspeed(2) == table[1]  # the highest wish: the operator's

    assert agent.control("set_cpu_freq", cpu=2, op="release")["released"] == [2]
    assert agent.setspeed(2) == table[-1]  # vm1's wish is the one left
    assert agent.control("show_cpus", cpu=2)[0]["wishers"] == ["vm1"]

    before = {cpu: cpufreq_files(agent, cpu) for cpu in (5, 6)}
    agent.control("set_cpu_freq", cpu=5, op="min")
    agent.control("set_cpu_freq", cpu=6, op="max")
    assert agent.read(5, "scaling_governor") == "userspace"
    assert agent.control("set_cpu_freq", cpu="all", op="release")["released"] == [5, 6]
    # nobody else wishes for them: back to their originals
    assert {cpu: cpufreq_files(agent, cpu) for cpu in (5, 6)} == before
    assert agent.control("show_cpus", cpu=5)[0]["wishers"] == []

    # The same from the operator's shell, one-shot.
    def shell(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "vmpower.shell", "--socket", str(agent.socket), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    governor_7 = agent.read(7, "scaling_governor")
    shell("set_cpu_freq", "7", "max")
    assert agent.read(7, "scaling_governor") == "userspace"
    assert "released host CPU 7" in shell("set_cpu_freq", "7", "release")
    assert agent.read(7, "scaling_governor") == governor_7
    assert agent.stop() == 0
    assert agent.originals() == originals


# -- point 5: one owner per cpufreq file ------------------------------------------------

MAX_CONTROL = "CPU_FREQUENCY_MAX_CONTROL"


def cpufreq_files(agent: RunningAgent, cpu: int) -> dict[str, str]:
    names = ("scaling_min_freq", "scaling_max_freq", "scaling_governor")
    return {name: agent.read(cpu, name) for name in names}


@pytest.fixture
def pstate(tmp_path: Path) -> Iterator[RunningAgent]:
    running = RunningAgent(tmp_path, driver="intel_pstate")
    try:
        yield running.start()
    finally:
        running.close()


def test_session_then_vm_on_intel_pstate_ends_with_every_file_original(
    pstate: RunningAgent,
) -> None:
    from vmpower.telemetry import BatchClient

    agent = pstate
    originals = agent.originals()
    original_max = agent.read(2, "scaling_max_freq")
    lowest = int(agent.read(2, "cpuinfo_min_freq"))
    session_max_khz = 2_000_000
    # `vmpower write CPU_FREQUENCY_MAX_CONTROL cpu 2 2e9 --hold-s 30`: the session writes
    # first, then vm1 (vCPU 0 on host CPU 2) asks for its minimum.
    batch = BatchClient(agent.socket, controls=[(MAX_CONTROL, "cpu", 2)]).start()
    try:
        batch.write([session_max_khz * 1000.0])
        assert int(agent.read(2, "scaling_max_freq")) == session_max_khz
        assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0) == ACK
        assert agent.read(2, "scaling_max_freq") == agent.read(2, "scaling_min_freq")
        assert int(agent.read(2, "scaling_min_freq")) == lowest
        row = agent.control("show_cpus", cpu=2)[0]
        assert row["wishers"] == [f"session:{batch.server_key}", "vm1"]
        # One journal, with the true original (not the session's value).
        pending = RestoreJournal(agent.state_dir).pending()
        assert [v for p, v in pending.items() if p.endswith("scaling_max_freq")] == [original_max]
    finally:
        batch.stop()
        batch.close()
    # The session's limit is gone; vm1's wish holds, and is still applied (not skipped).
    assert wait_for(lambda: agent.control("show_cpus", cpu=2)[0]["wishers"] == ["vm1"], 10)
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0) == ACK
    assert int(agent.read(2, "scaling_max_freq")) == lowest
    assert agent.stop() == 0
    assert agent.originals() == originals


def test_session_limits_only_restore_when_the_session_ends(pstate: RunningAgent) -> None:
    from vmpower.telemetry import BatchClient

    agent = pstate
    before = cpufreq_files(agent, 6)
    batch = BatchClient(agent.socket, controls=[(MAX_CONTROL, "cpu", 6)]).start()
    try:
        batch.write([1.9e9])
        assert agent.read(6, "scaling_max_freq") == "1900000"
        assert agent.control("show_cpus", cpu=6)[0]["limits"] == {
            f"session:{batch.server_key}": {"min_khz": None, "max_khz": 1_900_000}
        }
        # Only the session's own server may speak for it (the peer's pid is checked).
        with pytest.raises(ControlError, match="own server"):
            agent.control(
                "session_limits", server_key=batch.server_key, limits=[[6, None, 1_500_000]]
            )
        assert agent.read(6, "scaling_max_freq") == "1900000"
    finally:
        batch.stop()
        batch.close()
    assert cpufreq_files(agent, 6) == before  # stop() returned: already restored
    assert agent.stop() == 0


def test_session_refused_on_reserved_cpus(tmp_path: Path) -> None:
    from vmpower.errors import VmpowerError
    from vmpower.telemetry import BatchClient

    agent = RunningAgent(tmp_path, settings={"cpufreq": {"reserved_cpus": "7"}})
    try:
        agent.start()
        with pytest.raises(VmpowerError, match="host CPU 7 is reserved"):
            BatchClient(agent.socket, controls=[(MAX_CONTROL, "cpu", 7)]).start()
        assert agent.stop() == 0
    finally:
        agent.close()


# -- point 2: rm_vm + add_vm in one turn ---------------------------------------------------


def control_lines(socket_path: Path, *requests: dict[str, object]) -> list[dict[str, object]]:
    """Send several commands in one write (the daemon handles them in one turn)."""
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path))
        sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        buf = b""
        while buf.count(b"\n") < len(requests):
            chunk = sock.recv(65536)
            assert chunk, "the daemon closed the control connection"
            buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def test_rm_vm_then_add_vm_at_once_connects_each_channel_once(agent: RunningAgent) -> None:
    assert power(agent.hosts["vm1.0"], Unit.SCALE_MIN, 0) == ACK
    replies = control_lines(
        agent.socket, {"cmd": "rm_vm", "vm": "vm1"}, {"cmd": "add_vm", "vm": "vm1"}
    )
    assert all(r.get("ok", True) and "error" not in r for r in replies), replies
    host = agent.hosts["vm1.0"]
    host.accept(timeout_s=10)  # the first connection after add_vm must be the one served
    assert power(host, Unit.SCALE_MIN, 0) == ACK
    assert agent.read(2, "scaling_governor") == "userspace"
    assert agent.control("show_cpus", cpu=2)[0]["wishers"] == ["vm1"]
    assert agent.stop() == 0


# -- point 6: no cache skips a write after a write outside the request path ---------------


def test_every_write_path_in_turn_leaves_no_stale_cache(pstate: RunningAgent) -> None:
    """Guest, session, operator, VM leaving, operator release, guest again: after each,
    host CPU 2's files say what the wishes left say (a skipped write would show)."""
    from vmpower.telemetry import BatchClient

    agent = pstate
    originals = agent.originals()
    before = cpufreq_files(agent, 2)
    vm1 = agent.hosts["vm1.0"]
    top = int(agent.read(2, "base_frequency"))  # vm1 has no turbo: its max is nominal
    lowest = int(agent.read(2, "cpuinfo_min_freq"))

    def pinned() -> int | tuple[int, int]:
        """min = max (the one frequency asked for), else both limits."""
        lo, hi = int(agent.read(2, "scaling_min_freq")), int(agent.read(2, "scaling_max_freq"))
        return lo if lo == hi else (lo, hi)

    assert power(vm1, Unit.SCALE_MAX, 0) == ACK  # request path
    assert pinned() == top
    batch = BatchClient(agent.socket, controls=[(MAX_CONTROL, "cpu", 2)]).start()
    try:
        batch.write([2.0e9])  # a session: vm1's wish is held under its maximum
        assert pinned() == 2_000_000
    finally:
        batch.stop()
        batch.close()
    assert pinned() == top  # the session went: vm1's wish again, written (not skipped)
    agent.control("set_cpu_freq", cpu=2, op="min")  # the operator: below vm1, no change
    assert pinned() == top
    agent.control("rm_vm", vm="vm1")  # vm1 leaves: the operator's minimum is written
    assert wait_for(lambda: pinned() == lowest, 10)
    agent.control("set_cpu_freq", cpu=2, op="release")  # nobody left: restored
    assert cpufreq_files(agent, 2) == before
    agent.control("add_vm", vm="vm1")
    vm1.accept(timeout_s=10)
    assert power(vm1, Unit.SCALE_MAX, 0) == ACK  # same value as before the restore
    assert pinned() == top
    assert agent.stop() == 0
    assert agent.originals() == originals
